"""What an upstream sends on a call's response stream reaches the agent, and keeps the call alive.

The upstream is an ordinary SDK `MCPServer`. Its connection has a 1 s idle timeout
(`timeoutSeconds`) and a 3 s cap (`maxDurationSeconds`), so each clock is seen
running out, or not, in about a second:

- a call that reports progress every 0.2 s for 2 s finishes (it is never idle for
  1 s), and the agent gets every progress message;
- a call that says nothing for 2 s fails at the idle timeout, naming it;
- a call that reports progress for ever fails at the cap, naming it;
- log messages sent during a call reach the agent: on 2026-07-28 only at or above
  the level the agent opted in to, on the session era all of them;
- a `tools/list_changed` sent on a call's own stream (not the change stream) makes
  the gateway refetch, so a tool allowlisted before it existed appears at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import Context, MCPServer

from portcullis.serve import LocalGateway
from tests.support.agent import MODES, Mode, agent, result_text
from tests.support.one_upstream import one_upstream
from tests.support.servers import run_asgi

pytestmark = pytest.mark.anyio

IDLE_SECONDS = 1
MAX_SECONDS = 3
LEVELS: tuple[types.LoggingLevel, ...] = ("debug", "info", "warning", "error")


def upstream() -> MCPServer:
    server = MCPServer("streams")

    @server.tool()
    async def lively(ctx: Context) -> str:
        """Twice the idle timeout in all, never idle for a fifth of it."""
        for step in range(10):
            await ctx.report_progress(step, 10, f"step {step}")
            await anyio.sleep(IDLE_SECONDS / 5)
        return "done"

    @server.tool()
    async def silent() -> str:
        await anyio.sleep(IDLE_SECONDS * 2)
        return "too late"

    @server.tool()
    async def endless(ctx: Context) -> str:
        step = 0
        while True:
            await ctx.report_progress(step)
            step += 1
            await anyio.sleep(IDLE_SECONDS / 5)

    @server.tool()
    async def chatty(ctx: Context) -> str:
        for level in LEVELS:
            notice = types.LoggingMessageNotification(
                params=types.LoggingMessageNotificationParams(level=level, data={"said": level}, logger="chatty")
            )
            await ctx.session.send_notification(notice, related_request_id=ctx.request_id)
        return "said everything"

    @server.tool()
    async def grow(name: str, ctx: Context) -> str:
        """Add tool `name` and say so on this call's stream only (not to `subscriptions/listen` or GET streams)."""
        server.add_tool(lambda: "late answer", name=name, description="Added while running.")
        await ctx.session.send_notification(types.ToolListChangedNotification(), related_request_id=ctx.request_id)
        return "grown"

    return server


TOOLS = ["lively", "silent", "endless", "chatty", "grow", "late-2026-07-28", "late-legacy"]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalGateway, str]]:
    directory = tmp_path_factory.mktemp("streams")
    with run_asgi(upstream().streamable_http_app()) as url:
        with one_upstream(url, TOOLS, directory, timeoutSeconds=IDLE_SECONDS, maxDurationSeconds=MAX_SECONDS) as stack:
            yield stack.gw, stack.token


@pytest.mark.parametrize("mode", MODES)
async def test_progress_keeps_a_call_alive_past_the_idle_timeout(gateway: tuple[LocalGateway, str], mode: Mode) -> None:
    gw, token = gateway
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async with agent(gw.url, token, mode) as client:
        with anyio.fail_after(10):
            result = await client.call_tool("lively", {}, progress_callback=on_progress)
    assert not result.is_error, result_text(result)
    assert result_text(result) == "done"
    assert seen == [float(step) for step in range(10)]


@pytest.mark.parametrize("mode", MODES)
async def test_a_silent_call_fails_at_the_idle_timeout(gateway: tuple[LocalGateway, str], mode: Mode) -> None:
    gw, token = gateway
    async with agent(gw.url, token, mode) as client:
        started = time.monotonic()
        with anyio.fail_after(10):
            result = await client.call_tool("silent", {})
        took = time.monotonic() - started
        assert result.is_error
        assert f"sent nothing for {IDLE_SECONDS}s (timeoutSeconds of connection up)" in result_text(result)
        assert took < IDLE_SECONDS * 2, took  # at the idle timeout, not when the upstream would have answered
        assert result_text(await client.call_tool("chatty", {})) == "said everything"  # and the gateway serves on


@pytest.mark.parametrize("mode", MODES)
async def test_endless_progress_stops_at_the_maximum_duration(gateway: tuple[LocalGateway, str], mode: Mode) -> None:
    gw, token = gateway
    async with agent(gw.url, token, mode) as client:
        started = time.monotonic()
        with anyio.fail_after(15):
            result = await client.call_tool("endless", {}, progress_callback=_ignore)
        took = time.monotonic() - started
    assert result.is_error
    assert f"did not finish within {MAX_SECONDS}s (maxDurationSeconds of connection up)" in result_text(result)
    assert MAX_SECONDS - 0.5 < took < MAX_SECONDS + 2, took


async def _ignore(progress: float, total: float | None, message: str | None) -> None:
    pass


@pytest.mark.parametrize(
    ("mode", "log_level", "expected"),
    [
        ("2026-07-28", "warning", ["warning", "error"]),
        ("2026-07-28", "debug", list(LEVELS)),
        ("2026-07-28", None, []),  # no opt-in: the protocol forbids sending any
        ("legacy", None, list(LEVELS)),  # the session era sends every level
    ],
)
async def test_log_messages_reach_the_agent_at_the_level_it_asked_for(
    gateway: tuple[LocalGateway, str], mode: Mode, log_level: types.LoggingLevel | None, expected: list[str]
) -> None:
    gw, token = gateway
    received: list[types.LoggingMessageNotificationParams] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        received.append(params)

    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        async with Client(streamable_http_client(gw.url, http_client=http), mode=mode, logging_callback=on_log, log_level=log_level) as client:
            with anyio.fail_after(10):
                result = await client.call_tool("chatty", {})
    assert result_text(result) == "said everything"
    assert [r.level for r in received] == expected
    assert all(r.logger == "chatty" and r.data == {"said": r.level} for r in received)


@pytest.mark.parametrize("mode", MODES)
async def test_a_list_change_on_a_calls_stream_is_acted_on(gateway: tuple[LocalGateway, str], mode: Mode) -> None:
    gw, token = gateway
    late = f"late-{mode}"  # one per mode: each run adds its own tool
    async with agent(gw.url, token, mode) as client:
        with anyio.fail_after(10):
            assert late not in {t.name for t in (await client.list_tools()).tools}
            assert result_text(await client.call_tool("grow", {"name": late})) == "grown"
            while late not in {t.name for t in (await client.list_tools()).tools}:
                await anyio.sleep(0.05)  # the refetch runs beside the call; well within the deadline
            assert result_text(await client.call_tool(late, {})) == "late answer"
