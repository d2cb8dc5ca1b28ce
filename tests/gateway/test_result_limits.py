"""An upstream's answer is bounded while it is read, and an upstream's requests in flight are bounded too.

One hand-written upstream serves every shape of answer the upstream client reads: a
JSON body with a Content-Length, a chunked JSON body, a response stream of many
events, and one endless event line; plus a call that hangs. Four connections point
at it with different bounds (`maxResultBytes`, `maxConnections`), so each test reads
as "this connection, this shape, this size".

The upstream streams its large answers from one reused 1 MiB chunk, so the memory
measured in this process (gateway, upstream and agents share it) is the gateway's.
"""

from __future__ import annotations

import gc
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from portcullis.gateway.audit import MemoryAuditSink
from portcullis.gateway.local import admin_secret
from portcullis.serve import LocalGateway, local_gateway
from tests.support.agent import MODES, Mode, result_text
from tests.support.servers import run_asgi

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
BOUNDED_LIMIT = 4 * MiB  # above the size parsed off the event loop (1 MiB)
TINY_LIMIT = 2048
DEFAULT_LIMIT = 16 * MiB  # MCPConnection.spec.maxResultBytes when not set
HUGE = 50_000_000
ALPHABET = b"abcdefghijklmnopqrstuvwxyz0123456789"
CHUNK = ALPHABET * (MiB // len(ALPHABET))  # whole periods, so any run of chunks reads like `filler`
TOOLS = ["json", "sse_events", "sse_line", "hang", "small"]


def filler(n: int) -> bytes:
    """`n` bytes of text that shows any lost or moved byte."""
    return (ALPHABET * (n // len(ALPHABET) + 1))[:n]


def envelope(rid: Any) -> tuple[bytes, bytes]:
    """The bytes before and after the text of a one-text tool result."""
    prefix = b'{"jsonrpc":"2.0","id":' + json.dumps(rid).encode() + b',"result":{"content":[{"type":"text","text":"'
    return prefix, b'"}],"isError":false,"resultType":"complete"}}'


def sized_body(rid: Any, size: int) -> Iterator[bytes]:
    """A JSON-RPC response of exactly `size` bytes, in pieces of at most 1 MiB (the big one is reused)."""
    prefix, suffix = envelope(rid)
    left = size - len(prefix) - len(suffix)
    assert left >= 0, size
    yield prefix
    while left >= len(CHUNK):
        yield CHUNK
        left -= len(CHUNK)
    yield filler(left)
    yield suffix


def event(message: dict[str, Any]) -> bytes:
    return b"event: message\ndata: " + json.dumps(message, separators=(",", ":")).encode() + b"\n\n"


def upstream() -> Starlette:
    async def mcp(request: Request) -> Response:
        body = json.loads(await request.body())
        rid, method = body.get("id"), body.get("method")
        if method == "server/discover":
            result: dict[str, Any] = {"supportedVersions": ["2026-07-28"], "capabilities": {"tools": {}}, "resultType": "complete"}
            return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": result})
        if method == "tools/list":
            tools = [{"name": name, "inputSchema": {"type": "object"}} for name in TOOLS]
            return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": {"tools": tools, "resultType": "complete", "ttlMs": 0, "cacheScope": "private"}})
        if method != "tools/call":
            return JSONResponse({"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": "Method not found"}})
        name, args = body["params"]["name"], body["params"].get("arguments") or {}
        size = int(args.get("size", 0))
        if name == "small":
            return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": {"content": [{"type": "text", "text": "small"}], "resultType": "complete"}})
        if name == "json":
            if args.get("chunked"):
                return StreamingResponse(_pieces(sized_body(rid, size)), media_type="application/json")
            return Response(b"".join(sized_body(rid, size)), media_type="application/json")
        if name == "sse_events":
            return StreamingResponse(_events(rid, size), media_type="text/event-stream")
        if name == "sse_line":
            return StreamingResponse(_pieces(iter([b"event: message\ndata: ", *sized_body(rid, size), b"\n\n"])), media_type="text/event-stream")
        await anyio.sleep(30)  # "hang": far beyond every connection's timeout
        return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": {"content": []}})

    return Starlette(routes=[Route("/mcp", mcp, methods=["POST"])])


async def _pieces(pieces: Iterator[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


async def _events(rid: Any, size: int) -> AsyncIterator[bytes]:
    """Log notifications of 64 KiB each until about `size` bytes went out, then the result."""
    log_event = event({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": filler(64 * 1024).decode()}})
    sent = 0
    while sent + len(log_event) <= size:
        yield log_event
        sent += len(log_event)
    yield event({"jsonrpc": "2.0", "id": rid, "result": {"content": [{"type": "text", "text": "after the events"}], "resultType": "complete"}})


MANIFESTS = """
apiVersion: portcullis.dev/v1alpha1
kind: MCPConnection
metadata: {{name: bounded, namespace: acme}}
spec: {{url: "{url}", timeoutSeconds: 20, maxResultBytes: {bounded}, credential: {{source: none}}}}
---
apiVersion: portcullis.dev/v1alpha1
kind: MCPConnection
metadata: {{name: tiny, namespace: acme}}
spec: {{url: "{url}", timeoutSeconds: 20, maxResultBytes: {tiny}, credential: {{source: none}}}}
---
apiVersion: portcullis.dev/v1alpha1
kind: MCPConnection
metadata: {{name: default, namespace: acme}}
spec: {{url: "{url}", timeoutSeconds: 20, credential: {{source: none}}}}
---
apiVersion: portcullis.dev/v1alpha1
kind: MCPConnection
metadata: {{name: narrow, namespace: acme}}
spec: {{url: "{url}", timeoutSeconds: 2, maxConnections: 2, credential: {{source: none}}}}
---
apiVersion: portcullis.dev/v1alpha1
kind: VirtualMCPServer
metadata: {{name: s, namespace: acme}}
{mappings}
"""

MAPPING = """---
apiVersion: portcullis.dev/v1alpha1
kind: ToolMapping
metadata: {{name: {connection}, namespace: acme}}
spec:
  serverRef: {{name: s}}
  connectionRef: {{name: {connection}}}
  tools: [{tools}]
"""
CONNECTIONS = ("bounded", "tiny", "default", "narrow")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalGateway, str, str]]:
    directory = tmp_path_factory.mktemp("limits")
    state = directory / "state"
    mappings = "".join(
        MAPPING.format(connection=c, tools=", ".join(f"{{name: {t}, as: {c}_{t}}}" for t in TOOLS)) for c in CONNECTIONS
    )
    with run_asgi(upstream()) as url:
        (directory / "m.yaml").write_text(MANIFESTS.format(url=url, bounded=BOUNDED_LIMIT, tiny=TINY_LIMIT, mappings=mappings))
        with local_gateway([directory / "m.yaml"], state_dir=state, port=0, admin_port=0, audit=MemoryAuditSink()) as gw:
            token = httpx2.post(
                gw.admin_url + "/v1/tokens", json={"user": "u"}, headers={"Authorization": f"Bearer {admin_secret(state)}"}, timeout=10
            ).json()["token"]
            with anyio.from_thread.start_blocking_portal() as portal:
                portal.call(_wait_listed, gw)
            yield gw, token, url


async def _wait_listed(gw: LocalGateway) -> None:
    with anyio.fail_after(20):
        while len(gw.gateway.exposure.by_name) < len(CONNECTIONS) * len(TOOLS):
            await anyio.sleep(0.02)


def audit_events(gw: LocalGateway, tool: str) -> list[Any]:
    memory = next(s for s in gw.gateway.audit.sinks if isinstance(s, MemoryAuditSink))
    return [e for e in memory.events if e.tool == tool]


def too_large(limit: int, connection: str) -> str:
    return f"upstream {connection!r}: answered more than {limit} bytes (maxResultBytes of connection {connection})"


@asynccontextmanager
async def agent(url: str, token: str, mode: Mode) -> AsyncIterator[Client]:
    """`tests.support.agent.agent`, but taking SSE events of any size: the SDK client's own cap
    (1 MiB per event, which a session-protocol result arrives in) is the agent's choice, not under test."""
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        async with Client(streamable_http_client(url, http_client=http, max_sse_event_size=None), mode=mode) as client:
            yield client


async def call(gw: LocalGateway, token: str, mode: Mode, tool: str, arguments: dict[str, Any]) -> tuple[bool, str]:
    async with agent(gw.url, token, mode) as client:
        with anyio.fail_after(30):  # a bound against a hang, not a measurement
            result = await client.call_tool(tool, arguments)
    return bool(result.is_error), result_text(result)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("mode", MODES)
async def test_a_json_result_of_exactly_the_limit_is_relayed_intact(gateway: tuple[LocalGateway, str, str], mode: Mode, chunked: bool) -> None:
    gw, token, _ = gateway
    is_error, text = await call(gw, token, mode, "bounded_json", {"size": BOUNDED_LIMIT, "chunked": chunked})
    assert not is_error, text[:300]
    prefix, suffix = envelope(0)  # the upstream's envelope, but for the id, which the gateway chose
    assert BOUNDED_LIMIT - len(prefix) - len(suffix) - 20 < len(text) <= BOUNDED_LIMIT - len(prefix) - len(suffix)
    assert text.encode() == filler(len(text)), "the text came back changed"


@pytest.mark.parametrize(
    ("tool", "arguments"),
    [
        ("bounded_json", {"size": BOUNDED_LIMIT + 1}),  # declared in Content-Length: refused unread
        ("bounded_json", {"size": HUGE, "chunked": True}),  # no length: cut off while read
        ("bounded_sse_events", {"size": HUGE}),  # many events of one response, counted together
    ],
    ids=["json-one-byte-over", "json-50MB-chunked", "sse-50MB-of-events"],
)
@pytest.mark.parametrize("mode", MODES)
async def test_an_answer_over_the_limit_is_a_tool_error_naming_it_and_the_next_call_works(
    gateway: tuple[LocalGateway, str, str], mode: Mode, tool: str, arguments: dict[str, Any]
) -> None:
    gw, token, _ = gateway
    before = len(audit_events(gw, tool))
    is_error, text = await call(gw, token, mode, tool, arguments)
    assert is_error
    assert too_large(BOUNDED_LIMIT, "bounded") in text, text
    [recorded] = audit_events(gw, tool)[before:]
    assert (recorded.outcome, recorded.reason, recorded.detail) == ("upstream_error", "upstream_failed", "result too large")
    assert await call(gw, token, mode, "bounded_small", {}) == (False, "small")


@pytest.mark.parametrize("mode", MODES)
async def test_a_stream_of_events_under_the_limit_is_relayed(gateway: tuple[LocalGateway, str, str], mode: Mode) -> None:
    gw, token, _ = gateway
    assert await call(gw, token, mode, "bounded_sse_events", {"size": BOUNDED_LIMIT - 200_000}) == (False, "after the events")


@pytest.mark.parametrize("mode", MODES)
async def test_a_tiny_max_result_bytes_in_the_manifest_is_honoured(gateway: tuple[LocalGateway, str, str], mode: Mode) -> None:
    gw, token, _ = gateway
    assert gw.gateway.config.connections["tiny"].max_result_bytes == TINY_LIMIT
    is_error, text = await call(gw, token, mode, "tiny_json", {"size": TINY_LIMIT})
    assert not is_error and len(text) > TINY_LIMIT // 2, text
    assert (await call(gw, token, mode, "tiny_sse_line", {"size": TINY_LIMIT - 100}))[0] is False
    for tool, size in (("tiny_json", TINY_LIMIT + 1), ("tiny_sse_line", 10 * TINY_LIMIT)):  # one event line over the limit
        is_error, text = await call(gw, token, mode, tool, {"size": size, "chunked": True})
        assert is_error and too_large(TINY_LIMIT, "tiny") in text, (tool, text)
    # A connection that names no limit has the default, far above these answers.
    assert (await call(gw, token, mode, "default_json", {"size": 10 * TINY_LIMIT}))[0] is False


@pytest.mark.parametrize("mode", MODES)
async def test_an_event_line_over_the_readers_own_line_limit_is_still_refused(gateway: tuple[LocalGateway, str, str], mode: Mode) -> None:
    gw, token, _ = gateway
    # 2 MB in one `data:` line: within maxResultBytes (16 MiB), beyond aiohttp's line limit (128 KiB).
    is_error, text = await call(gw, token, mode, "default_sse_line", {"size": 2_000_000})
    assert is_error and "upstream 'default': sent an event line longer than the gateway reads" in text, text


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.M)
    assert match is not None, field
    return int(match.group(1))


async def test_six_concurrent_50_mb_answers_leave_the_gateways_memory_bounded(gateway: tuple[LocalGateway, str, str]) -> None:
    gw, token, _ = gateway
    arguments = {"size": HUGE, "chunked": True}
    assert (await call(gw, token, "2026-07-28", "default_json", arguments))[0]  # warm: pools, threads, first allocations
    gc.collect()
    before = _rss_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset VmHWM, the peak, to now
        peak_known = True
    except OSError:
        peak_known = False
    async with anyio.create_task_group() as tg:
        answers: list[tuple[bool, str]] = []

        async def one() -> None:
            answers.append(await call(gw, token, "2026-07-28", "default_json", arguments))

        for _ in range(6):
            tg.start_soon(one)
    gc.collect()
    after = _rss_kib("VmRSS")
    assert len(answers) == 6 and all(e and too_large(DEFAULT_LIMIT, "default") in t for e, t in answers), answers
    # Six answers of 50 MB read whole, parsed and re-serialized took about 390 MiB more (and kept 250).
    assert after - before < 150 * 1024, f"RSS grew by {(after - before) // 1024} MiB"
    if peak_known:
        assert _rss_kib("VmHWM") - before < 250 * 1024, f"RSS peaked {(_rss_kib('VmHWM') - before) // 1024} MiB above the start"


@pytest.mark.parametrize("mode", MODES)
async def test_a_hung_upstream_fills_its_max_connections_then_calls_fail_saying_so(
    gateway: tuple[LocalGateway, str, str], mode: Mode, caplog: pytest.LogCaptureFixture
) -> None:
    """maxConnections 2, timeout 2 s, six calls at once to a hanging tool.

    Two take the slots and time out at 2 s; two more wait for those slots, get them
    at 2 s, and time out at 4 s; the last two cannot get a slot within their 2 s and
    are told that every slot is busy. (Which of the middle two gets a slot is a race
    with their own deadline; the last two have 2 s to spare.)
    """
    gw, token, url = gateway
    answers: list[tuple[bool, str]] = []
    with caplog.at_level(logging.WARNING, logger="portcullis.gateway.upstream"):
        async with agent(gw.url, token, mode) as client:

            async def one() -> None:
                with anyio.fail_after(15):
                    result = await client.call_tool("narrow_hang", {})
                answers.append((bool(result.is_error), result_text(result)))

            async with anyio.create_task_group() as tg:
                for _ in range(6):
                    tg.start_soon(one)
        assert await call(gw, token, mode, "narrow_small", {}) == (False, "small")  # free again
    busy = [t for e, t in answers if e and "upstream 'narrow': its maxConnections slots are all busy (2 requests in flight" in t]
    timed_out = [t for e, t in answers if e and "upstream 'narrow': sent nothing for 2s" in t]
    assert len(busy) + len(timed_out) == 6, answers
    assert len(busy) >= 2 and len(timed_out) >= 2, answers
    warnings = [r.getMessage() for r in caplog.records if r.name == "portcullis.gateway.upstream" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "'narrow'" in warnings[0] and url in warnings[0] and "all 2 of its maxConnections are busy" in warnings[0]
    events = audit_events(gw, "narrow_hang")[-6:]
    assert sorted(e.detail for e in events) == sorted(["slots busy"] * len(busy) + ["transport"] * len(timed_out))


def test_the_bounds_are_checked_where_the_manifest_is_parsed() -> None:
    from pydantic import ValidationError

    from portcullis.api.resources import MCPConnectionSpec

    spec = MCPConnectionSpec.model_validate({"url": "http://u"})
    assert (spec.max_result_bytes, spec.max_connections) == (DEFAULT_LIMIT, 100)
    for field_name, value in (("maxResultBytes", 1023), ("maxResultBytes", 2**30 + 1), ("maxConnections", 0), ("maxConnections", 10001)):
        with pytest.raises(ValidationError, match=field_name):
            MCPConnectionSpec.model_validate({"url": "http://u", field_name: value})
