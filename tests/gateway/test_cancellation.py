"""An agent that gives up on a call (or a prompt) stops it upstream, in both eras on both sides.

A 2026-07-28 agent cancels by closing the call's stream; a 2025-11-25 agent sends
`notifications/cancelled` on a separate POST and keeps listening. Either way the
upstream's tool must see the cancellation (its handler is cancelled), whether
the upstream speaks 2026-07-28 (the closed request is its signal) or only the
session protocol (the gateway sends it `notifications/cancelled`). The call is
audited as cancelled, and the next call works.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import anyio
import pytest
from mcp.server.mcpserver import Context, MCPServer
from starlette.types import ASGIApp

from portcullis.gateway.audit import MemoryAuditSink
from portcullis.serve import LocalGateway
from tests.support.agent import MODES, Mode, agent, result_text
from tests.support.eras import session_protocol_only
from tests.support.one_upstream import one_upstream
from tests.support.servers import run_asgi

pytestmark = pytest.mark.anyio
ERAS = ("2026-07-28", "session")


@dataclass
class Seen:
    started: int = 0
    cancelled: int = 0
    finished: int = 0
    discover: list[int] = field(default_factory=list)


def upstream(seen: Seen) -> MCPServer:
    server = MCPServer("cancellable")

    @server.tool()
    async def long(ctx: Context) -> str:
        seen.started += 1
        try:
            for step in range(100):  # 10 s, reporting progress so no idle timeout interferes
                await ctx.report_progress(step)
                await anyio.sleep(0.1)
        except anyio.get_cancelled_exc_class():
            seen.cancelled += 1
            raise
        seen.finished += 1
        return "ran to the end"

    @server.tool()
    async def quick() -> str:
        return "quick"

    @server.prompt()
    async def slow_prompt() -> str:
        seen.started += 1
        try:
            await anyio.sleep(10)
        except anyio.get_cancelled_exc_class():
            seen.cancelled += 1
            raise
        seen.finished += 1
        return "written at length"

    return server


@dataclass
class Stack:
    gw: LocalGateway
    token: str
    seen: Seen
    audit: MemoryAuditSink


@pytest.fixture(scope="module", params=ERAS)
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    seen = Seen()
    app: ASGIApp = upstream(seen).streamable_http_app()
    if request.param == "session":
        app = session_protocol_only(app)
    with run_asgi(app) as url, one_upstream(url, ["long", "quick"], tmp_path_factory.mktemp("cancel"), prompts=["slow_prompt"]) as served:
        yield Stack(served.gw, served.token, seen, served.audit)


async def _quiet(progress: float, total: float | None, message: str | None) -> None:
    pass


@pytest.mark.parametrize("mode", MODES)
async def test_a_cancelled_call_is_cancelled_upstream(stack: Stack, mode: Mode) -> None:
    before = Seen(stack.seen.started, stack.seen.cancelled, stack.seen.finished)
    async with agent(stack.gw.url, stack.token, mode) as client:
        with anyio.move_on_after(0.8) as waited:
            await client.call_tool("long", {}, progress_callback=_quiet)
        assert waited.cancelled_caught, "the call ended before the agent gave up on it"
        with anyio.fail_after(5):
            while stack.seen.cancelled == before.cancelled and stack.seen.finished == before.finished:
                await anyio.sleep(0.05)
        assert (stack.seen.started, stack.seen.cancelled, stack.seen.finished) == (
            before.started + 1, before.cancelled + 1, before.finished,
        )
        assert result_text(await client.call_tool("quick", {})) == "quick"
    with anyio.fail_after(5):
        while not any(e.tool == "long" and e.reason == "cancelled" for e in list(stack.audit.events)[-5:]):
            await anyio.sleep(0.05)


@pytest.mark.parametrize("mode", MODES)
async def test_a_cancelled_prompt_is_cancelled_upstream(stack: Stack, mode: Mode) -> None:
    """Not only tool calls: any request the gateway forwards stops when its agent gives up on it."""
    before = Seen(stack.seen.started, stack.seen.cancelled, stack.seen.finished)
    async with agent(stack.gw.url, stack.token, mode) as client:
        with anyio.move_on_after(0.8) as waited:
            await client.get_prompt("slow_prompt", {})
        assert waited.cancelled_caught, "the prompt came back before the agent gave up on it"
        with anyio.fail_after(5):
            while stack.seen.cancelled == before.cancelled and stack.seen.finished == before.finished:
                await anyio.sleep(0.05)
    assert (stack.seen.cancelled, stack.seen.finished) == (before.cancelled + 1, before.finished)
