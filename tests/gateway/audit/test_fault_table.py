"""Exactly one audit event per request, whatever fails on the way, on both wires.

Each row of the table is one way a request can go wrong, from the upstream (refuses,
hangs, answers garbage, sends one oversized line, closes mid-stream), from the vault
(unreadable, or a sealed value that does not open), from the token store, or from code
nobody expected to fail. Every row asserts: the agent gets a prompt, well-formed
answer with no internals in it; exactly one new event is recorded with the expected
outcome and reason; and the next good call still works.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.shared.exceptions import MCPError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from portcullis.gateway.audit import AuditEvent, MemoryAuditSink
from portcullis.gateway.local import admin_secret
from portcullis.serve import LocalGateway, local_gateway
from portcullis.vault.sealing import SealError
from tests.support.agent import MODES, Mode, agent, result_text
from tests.support.servers import run_asgi

pytestmark = pytest.mark.anyio
TOOLS = ["ok", "garbage", "hang", "oversized_line", "close_midstream"]
USER, BROKEN_USER, UNREADABLE_USER = "ada@example.com", "vault-down@example.com", "moved@example.com"


def upstream() -> Starlette:
    async def mcp(request: Request) -> Response:
        body = json.loads(await request.body())
        rid, method = body.get("id"), body.get("method")
        if method == "server/discover":
            result: dict[str, Any] = {"supportedVersions": ["2026-07-28"], "capabilities": {"tools": {}, "prompts": {}}, "resultType": "complete"}
            return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": result})
        if method == "tools/list":
            tools = [{"name": n, "inputSchema": {"type": "object"}} for n in TOOLS]
            return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": {"tools": tools, "resultType": "complete", "ttlMs": 0, "cacheScope": "private"}})
        if method == "prompts/get":
            return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": {"messages": [], "resultType": "complete"}})
        if rid is None:
            return Response(status_code=202)
        if method != "tools/call":
            return JSONResponse({"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": "Method not found"}})
        name = body["params"]["name"]
        if name == "ok":
            return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": {"content": [{"type": "text", "text": "fine"}], "resultType": "complete"}})
        if name == "garbage":
            return PlainTextResponse("SECRET-PAYLOAD not JSON", media_type="application/json")
        if name == "oversized_line":
            line = b"data: " + json.dumps({"jsonrpc": "2.0", "id": rid, "result": {"content": [{"type": "text", "text": "x" * 2_000_000}]}}).encode()
            return Response(line + b"\n\n", media_type="text/event-stream")
        if name == "close_midstream":
            async def broken() -> AsyncIterator[bytes]:
                yield b'data: {"jsonrpc": "2.0", "method": "notifications/message"'
                raise RuntimeError("upstream died mid-stream")

            return StreamingResponse(broken(), media_type="text/event-stream")
        await anyio.sleep(30)  # hang
        return Response(status_code=500)

    return Starlette(routes=[Route("/mcp", mcp, methods=["POST"])])


MANIFESTS = """
apiVersion: portcullis.dev/v1alpha1
kind: MCPConnection
metadata: {{name: faulty, namespace: acme}}
spec: {{url: "{url}", timeoutSeconds: 1, credential: {{source: user}}}}
---
apiVersion: portcullis.dev/v1alpha1
kind: MCPConnection
metadata: {{name: refusing, namespace: acme}}
spec: {{url: "{refusing}", timeoutSeconds: 1, credential: {{source: none}}}}
---
apiVersion: portcullis.dev/v1alpha1
kind: VirtualMCPServer
metadata: {{name: faults, namespace: acme}}
---
apiVersion: portcullis.dev/v1alpha1
kind: ToolMapping
metadata: {{name: faults, namespace: acme}}
spec:
  serverRef: {{name: faults}}
  connectionRef: {{name: faulty}}
  tools: [{tools}]
  prompts: [{{name: summarize}}]
---
apiVersion: portcullis.dev/v1alpha1
kind: ToolMapping
metadata: {{name: refusing, namespace: acme}}
spec:
  serverRef: {{name: faults}}
  connectionRef: {{name: refusing}}
  tools: [{{name: ok, as: refused}}]
"""


class Stack:
    def __init__(self, gw: LocalGateway, memory: MemoryAuditSink, state: Path):
        self.gw, self.memory, self.state = gw, memory, state

    def admin(self, path: str) -> Any:
        request = urllib.request.Request(self.gw.admin_url + path, headers={"Authorization": f"Bearer {admin_secret(self.state)}"})
        with urllib.request.urlopen(request, timeout=20) as response:
            return json.loads(response.read())

    def mint(self, user: str) -> str:
        request = urllib.request.Request(
            self.gw.admin_url + "/v1/tokens", data=json.dumps({"user": user}).encode(), method="POST",
            headers={"Authorization": f"Bearer {admin_secret(self.state)}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(json.loads(response.read())["token"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("faults")
    memory = MemoryAuditSink()
    with run_asgi(upstream()) as url, contextlib.ExitStack() as later:
        # An upstream that lists its tools, then goes away: its calls are refused at connect.
        refusing = later.enter_context(run_asgi(upstream()))
        tools = ", ".join(f"{{name: {t}}}" for t in TOOLS)
        (directory / "m.yaml").write_text(MANIFESTS.format(url=url, refusing=refusing, tools=tools))
        with local_gateway([directory / "m.yaml"], state_dir=directory / "state", port=0, admin_port=0, audit=memory) as gw:
            with anyio.from_thread.start_blocking_portal() as portal:
                portal.call(_wait_ready, gw)
            later.close()
            stack = Stack(gw, memory, directory / "state")
            vault = gw.gateway.vault
            for user in (USER, BROKEN_USER, UNREADABLE_USER):
                asyncio.run(vault.put("acme", user, "faulty", "upstream-secret"))
            yield stack


async def _wait_ready(gw: LocalGateway) -> None:
    with anyio.fail_after(20):
        while not gw.gateway.ready or "refused" not in gw.gateway.exposure.by_name:
            await anyio.sleep(0.02)


def _faulty_vault(stack: Stack) -> Callable[[], None]:
    """Make the vault fail for two users, in the two ways a vault fails: unreadable, and not opening."""
    vault = stack.gw.gateway.vault
    real_get = vault.get

    async def get(tenant: str, user: str, connection: str) -> str | None:
        if user == BROKEN_USER:
            raise OSError("disk gone: /secret/path")
        if user == UNREADABLE_USER:
            raise SealError("sealed credential for tenant acme does not open")
        return await real_get(tenant, user, connection)

    vault.get = get  # type: ignore[method-assign]
    return lambda: setattr(vault, "get", real_get)


async def call(stack: Stack, mode: Mode, user: str, tool: str, token: str | None = None) -> tuple[str, list[AuditEvent]]:
    """Call one tool; return what the agent saw and the events recorded meanwhile."""
    token = token or stack.mint(user)
    before = len(stack.memory.events)
    async with agent(stack.gw.url, token, mode) as client:
        with anyio.fail_after(10):
            try:
                result = await client.call_tool(tool, {"q": "PRIVATE-ARGUMENT"})
                seen = ("tool_error: " if result.is_error else "ok: ") + result_text(result)
            except MCPError as exc:
                seen = f"rpc {exc.error.code}: {exc.error.message}"
        await asyncio.sleep(0)
    return seen, list(stack.memory.events)[before:]


# tool, user, expected outcome, expected reason, what the agent must be told
TABLE = [
    ("ok", USER, "ok", "allowlisted", "ok: fine"),
    ("refused", USER, "upstream_error", "upstream_failed", "unreachable"),
    ("hang", USER, "upstream_error", "upstream_failed", "sent nothing for 1s"),
    ("garbage", USER, "upstream_error", "upstream_failed", "not JSON"),
    ("oversized_line", USER, "upstream_error", "upstream_failed", "longer than the gateway reads"),
    ("close_midstream", USER, "upstream_error", "upstream_failed", "upstream 'faulty'"),
    ("ok", BROKEN_USER, "error", "vault_unavailable", "credential store is unavailable"),
    ("ok", UNREADABLE_USER, "error", "credential_unreadable", "reconnect faulty"),
    ("not_a_tool", USER, "denied", "not_exposed", "Unknown tool"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("tool", "user", "outcome", "reason", "told"), TABLE)
async def test_every_fault_gives_one_event_and_a_clean_answer(
    stack: Stack, mode: Mode, tool: str, user: str, outcome: str, reason: str, told: str
) -> None:
    token = stack.mint(user)  # before the fault: minting checks the vault too
    restore = _faulty_vault(stack)
    try:
        seen, events = await call(stack, mode, user, tool, token)
    finally:
        restore()
    calls = [e for e in events if e.method == "tools/call"]
    assert len(calls) == 1, calls
    assert (calls[0].outcome, calls[0].reason, calls[0].user) == (outcome, reason, user)
    assert calls[0].args_digest and calls[0].args_digest.startswith("hmac-sha256:")
    assert told in seen, seen
    for leaked in ("SECRET-PAYLOAD", "PRIVATE-ARGUMENT", "/secret/path", "upstream-secret", "Traceback"):
        assert leaked not in seen and leaked not in calls[0].to_json()
    assert (await call(stack, mode, USER, "ok"))[0] == "ok: fine"  # and the gateway keeps serving


@pytest.mark.parametrize("mode", MODES)
async def test_an_exception_nobody_anticipated_is_audited_and_answered_with_a_request_id(stack: Stack, mode: Mode) -> None:
    class Surprise(Exception):
        pass

    upstream_client = stack.gw.gateway._upstreams["faulty"]
    real_request = upstream_client.request

    async def explode(*args: Any, **kwargs: Any) -> Any:
        raise Surprise("internal detail: SECRET-PAYLOAD")

    upstream_client.request = explode  # type: ignore[method-assign]
    try:
        seen, events = await call(stack, mode, USER, "ok")
    finally:
        upstream_client.request = real_request  # type: ignore[method-assign]
    [event] = [e for e in events if e.method == "tools/call"]
    assert (event.outcome, event.reason, event.detail) == ("error", "internal_error", "Surprise")
    assert seen.startswith("rpc -32603") and event.request_id in seen and "SECRET-PAYLOAD" not in seen


@pytest.mark.parametrize("mode", MODES)
async def test_a_failing_token_store_fails_closed_and_is_audited(stack: Stack, mode: Mode) -> None:
    revocations = stack.gw.gateway.revocations
    real = revocations.is_revoked

    def broken(claims: Any) -> bool:
        raise OSError("revocation file unreadable")

    token = stack.mint(USER)
    before = len(stack.memory.events)
    revocations.is_revoked = broken  # type: ignore[method-assign]
    try:
        with pytest.raises(Exception):
            async with agent(stack.gw.url, token, mode) as client:
                with anyio.fail_after(10):
                    await client.call_tool("ok", {})
    finally:
        revocations.is_revoked = real  # type: ignore[method-assign]
    events = list(stack.memory.events)[before:]
    assert events and all((e.outcome, e.reason) == ("error", "auth_unavailable") for e in events)
    assert (await call(stack, mode, USER, "ok"))[0] == "ok: fine"


async def test_prompts_get_with_an_unreadable_credential_is_one_event(stack: Stack) -> None:
    token = stack.mint(UNREADABLE_USER)
    restore = _faulty_vault(stack)
    before = len(stack.memory.events)
    try:
        async with agent(stack.gw.url, token, "2026-07-28") as client:
            with pytest.raises(MCPError, match="reconnect faulty"):
                await client.get_prompt("summarize", {})
    finally:
        restore()
    [event] = [e for e in list(stack.memory.events)[before:] if e.method == "prompts/get"]
    assert (event.outcome, event.reason) == ("error", "credential_unreadable")


async def test_an_unauthenticated_request_is_one_event_naming_its_method(stack: Stack) -> None:
    before = len(stack.memory.events)
    request = urllib.request.Request(
        stack.gw.url, data=b"{}", method="POST",
        headers={"Content-Type": "application/json", "Mcp-Method": "tools/call", "Authorization": "Bearer nope"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401
    [event] = list(stack.memory.events)[before:]
    assert (event.outcome, event.method, event.user) == ("unauthenticated", "tools/call", None)


async def test_every_recorded_event_reaches_the_durable_store_and_verifies(stack: Stack) -> None:
    report = stack.admin("/v1/audit/verify")
    assert report["ok"] and report["events"] >= len(stack.memory.events), report
    stored: set[str] = set()
    cursor = ""
    while True:
        page = stack.admin("/v1/audit?limit=1000" + (f"&cursor={cursor}" if cursor else ""))
        stored |= {e["request_id"] for e in page["events"]}
        if not page["nextCursor"]:
            break
        cursor = page["nextCursor"]
    recorded = {e.request_id for e in stack.memory.events}
    assert recorded <= stored, recorded - stored


@pytest.mark.parametrize("mode", MODES)
async def test_an_exception_outside_the_call_path_never_reaches_the_agent_as_text(stack: Stack, mode: Mode) -> None:
    gateway = stack.gw.gateway
    real = gateway.list_tools

    async def broken(claims: Any) -> Any:
        raise KeyError("SECRET-PAYLOAD internal detail")

    gateway.list_tools = broken  # type: ignore[method-assign]
    try:
        async with agent(stack.gw.url, stack.mint(USER), mode) as client:
            with anyio.fail_after(10), pytest.raises(MCPError) as failed:
                await client.list_tools()
    finally:
        gateway.list_tools = real  # type: ignore[method-assign]
    assert failed.value.error.code == -32603
    assert "SECRET-PAYLOAD" not in failed.value.error.message and "incident" in failed.value.error.message
