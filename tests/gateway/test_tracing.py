"""Traces of the call path: off and free by default, and when on, one agent trace end to end.

A real gateway runs in front of two hand-written upstreams, one per protocol era, that
record the headers of every call they get; the agent sends a W3C `traceparent`. The
SDK's OpenTelemetry imports are made inside the fixtures, not at the top of this
module: the tracing-off test imports this module in a subprocess and checks that
nothing of the SDK was loaded.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from portcullis.gateway import tracing
from portcullis.gateway.audit import MemoryAuditSink
from portcullis.gateway.local import admin_secret
from portcullis.serve import LocalGateway, local_gateway
from tests.support.agent import MODES, Mode, result_text
from tests.support.servers import run_asgi

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
USER = "alice@example.com"
UPSTREAM_SECRET = "alice-upstream-secret-do-not-trace"
SERVER = "acme/traced"


# --- the upstreams: one per era, recording the headers of every call --------------------


@dataclass
class Upstreams:
    calls: list[dict[str, str]] = field(default_factory=list)
    """Headers of every tools/call and prompts/get either upstream received, in order."""


def recording_upstreams(seen: Upstreams) -> Starlette:
    def answer(rid: Any, result: dict[str, Any]) -> Response:
        return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": result})

    async def serve(request: Request, modern: bool) -> Response:
        body = json.loads(await request.body())
        rid, method = body.get("id"), body.get("method")
        complete = {"resultType": "complete"} if modern else {}
        if rid is None:
            return Response(status_code=202)
        if method == "server/discover":
            if not modern:  # a session-era server: the gateway falls back to initialize
                return JSONResponse({"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": "Method not found"}})
            return answer(rid, {"supportedVersions": ["2026-07-28"], "capabilities": {"tools": {}, "prompts": {}}, **complete})
        if method == "initialize":
            info = {"name": "recording", "version": "1"}
            return answer(rid, {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}}, "serverInfo": info})
        if method == "tools/list":
            return answer(rid, {"tools": [{"name": "echo", "inputSchema": {"type": "object"}}], **complete})
        if method in ("tools/call", "prompts/get"):
            seen.calls.append(dict(request.headers))
            if method == "prompts/get":
                return answer(rid, {"messages": [{"role": "user", "content": {"type": "text", "text": "hello"}}], **complete})
            return answer(rid, {"content": [{"type": "text", "text": "echoed"}], **complete})
        return JSONResponse({"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": "Method not found"}})

    async def modern(request: Request) -> Response:
        return await serve(request, modern=True)

    async def legacy(request: Request) -> Response:
        return await serve(request, modern=False)

    return Starlette(routes=[Route("/modern", modern, methods=["POST"]), Route("/legacy", legacy, methods=["POST"])])


MANIFESTS = """
apiVersion: portcullis.dev/v1alpha1
kind: MCPConnection
metadata: {{name: modern, namespace: acme}}
spec: {{url: "{base}/modern", timeoutSeconds: 5, credential: {{source: user, header: Authorization, scheme: Bearer}}}}
---
apiVersion: portcullis.dev/v1alpha1
kind: MCPConnection
metadata: {{name: legacy, namespace: acme}}
spec: {{url: "{base}/legacy", timeoutSeconds: 5, credential: {{source: user, header: Authorization, scheme: Bearer}}}}
---
apiVersion: portcullis.dev/v1alpha1
kind: VirtualMCPServer
metadata: {{name: traced, namespace: acme}}
---
apiVersion: portcullis.dev/v1alpha1
kind: ToolMapping
metadata: {{name: traced-modern, namespace: acme}}
spec:
  serverRef: {{name: traced}}
  connectionRef: {{name: modern}}
  tools: [{{name: echo, as: modern_echo}}]
  prompts: [{{name: greet}}]
---
apiVersion: portcullis.dev/v1alpha1
kind: ToolMapping
metadata: {{name: traced-legacy, namespace: acme}}
spec:
  serverRef: {{name: traced}}
  connectionRef: {{name: legacy}}
  tools: [{{name: echo, as: legacy_echo}}]
"""


@dataclass
class Stack:
    gw: LocalGateway
    upstreams: Upstreams
    token: str


@contextmanager
def traced_stack(directory: Path) -> Iterator[Stack]:
    """A gateway in front of both recording upstreams, with a token for USER and USER's credentials stored."""
    seen = Upstreams()
    state = directory / "state"
    with run_asgi(recording_upstreams(seen), path="") as base:
        (directory / "m.yaml").write_text(MANIFESTS.format(base=base))
        with local_gateway([directory / "m.yaml"], state_dir=state, port=0, admin_port=0, audit=MemoryAuditSink()) as gw:
            for connection in ("modern", "legacy"):
                asyncio.run(gw.gateway.vault.put("acme", USER, connection, UPSTREAM_SECRET))
            answer = httpx2.post(
                gw.admin_url + "/v1/tokens", json={"user": USER}, headers={"Authorization": f"Bearer {admin_secret(state)}"}, timeout=10
            )
            assert answer.status_code == 201, answer.text
            yield Stack(gw, seen, answer.json()["token"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with traced_stack(tmp_path_factory.mktemp("tracing")) as running:
        yield running


@asynccontextmanager
async def agent(url: str, token: str, mode: Mode, **headers: str) -> AsyncIterator[Client]:
    """The MCP SDK client, as tests.support.agent builds it, plus the agent's own trace headers."""
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}", **headers}, timeout=30) as http:
        async with Client(streamable_http_client(url, http_client=http), mode=mode) as client:
            yield client


# --- spans, in memory ---------------------------------------------------------------------


class Spans:
    """Every span the gateway ends, and a bounded wait for the one that ends last."""

    def __init__(self, exporter: Any):
        self.exporter = exporter
        self.ended = threading.Condition()

    def of_trace(self, trace_id: int) -> list[Any]:
        return [s for s in self.exporter.get_finished_spans() if s.context.trace_id == trace_id]

    async def request(self, trace_id: int, name: str) -> Any:
        """The request span `name` of the trace, once it has ended (it ends after the answer is sent)."""

        def found() -> list[Any]:
            return [s for s in self.of_trace(trace_id) if s.name == name]

        def wait() -> bool:
            with self.ended:
                return self.ended.wait_for(lambda: bool(found()), timeout=10)

        assert await anyio.to_thread.run_sync(wait), f"no span {name!r} in trace {trace_id:032x}"
        [span] = found()
        return span

    def children(self, parent: Any) -> dict[str, Any]:
        kids = [s for s in self.of_trace(parent.context.trace_id) if s.parent is not None and s.parent.span_id == parent.context.span_id]
        by_name = {s.name: s for s in kids}
        assert len(by_name) == len(kids), [s.name for s in kids]
        return by_name


@pytest.fixture
def spans() -> Iterator[Spans]:
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    recorded = Spans(InMemorySpanExporter())

    class Signal(SpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:  # after the exporter above has it
            with recorded.ended:
                recorded.ended.notify_all()

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(recorded.exporter))
    provider.add_span_processor(Signal())
    previous = tracing.install(provider)
    try:
        yield recorded
    finally:
        tracing.install(previous)
        provider.shutdown()


def agent_trace() -> tuple[int, int, str]:
    trace_id, span_id = secrets.randbits(128) | 1, secrets.randbits(64) | 1
    return trace_id, span_id, f"00-{trace_id:032x}-{span_id:016x}-01"


def assert_nothing_secret(recorded: list[Any], *secret_values: str) -> None:
    """No span says anything of the session token, the upstream credential or the Authorization header."""
    for span in recorded:
        said = [span.name, *span.attributes.keys(), *(str(v) for v in span.attributes.values())]
        said += [str(e.attributes) for e in span.events]
        for value in [*secret_values, "Bearer", "authorization"]:
            assert not any(value.lower() in s.lower() for s in said), (span.name, value, dict(span.attributes))


# --- tracing on ------------------------------------------------------------------------------


@pytest.mark.parametrize("tool", ["modern_echo", "legacy_echo"])
@pytest.mark.parametrize("mode", MODES)
async def test_a_call_continues_the_agents_trace_through_every_step_and_on_to_the_upstream(
    stack: Stack, spans: Spans, mode: Mode, tool: str
) -> None:
    trace_id, agent_span, traceparent = agent_trace()
    fast_before = stack.gw.endpoint.fast.served if stack.gw.endpoint.fast else 0
    calls_before = len(stack.upstreams.calls)
    async with agent(stack.gw.url, stack.token, mode, traceparent=traceparent, tracestate="agent=1") as client:
        result = await client.call_tool(tool, {"q": "a secret argument"})
    assert not result.is_error and result_text(result) == "echoed"
    if mode == "2026-07-28":  # the short path was the one traced, not the SDK's
        assert stack.gw.endpoint.fast is not None and stack.gw.endpoint.fast.served == fast_before + 1

    request = await spans.request(trace_id, "mcp tools/call")
    assert request.kind.name == "SERVER"
    assert request.parent is not None and request.parent.span_id == agent_span and request.parent.is_remote
    assert request.context.trace_state.get("agent") == "1"
    assert dict(request.attributes) == {
        "portcullis.server": SERVER,
        "mcp.method.name": "tools/call",
        "gen_ai.tool.name": tool,
        "portcullis.decision": "allow",
        "portcullis.reason": "allowlisted",
        "portcullis.outcome": "ok",
        "portcullis.connection": tool.removesuffix("_echo"),
        "portcullis.request_id": request.attributes["portcullis.request_id"],
    }
    events = [e for e in stack.gw.gateway.audit.sinks[0].events if e.request_id == request.attributes["portcullis.request_id"]]
    assert [(e.tool, e.outcome) for e in events] == [(tool, "ok")]  # the trace joins its audit event

    steps = spans.children(request)
    assert set(steps) == {"authenticate", "authorize", "credential", "upstream"}
    assert steps["upstream"].kind.name == "CLIENT"
    assert steps["authenticate"].end_time <= steps["authorize"].start_time
    assert steps["authorize"].end_time <= steps["credential"].start_time <= steps["upstream"].start_time

    # The upstream was told the gateway's upstream span, in the agent's trace, not the agent's own span.
    [headers] = stack.upstreams.calls[calls_before:]
    version, upstream_trace, upstream_parent, flags = headers["traceparent"].split("-")
    assert (version, int(upstream_trace, 16), int(upstream_parent, 16), flags) == ("00", trace_id, steps["upstream"].context.span_id, "01")
    assert headers["tracestate"] == "agent=1"
    assert headers["authorization"] == f"Bearer {UPSTREAM_SECRET}"

    assert_nothing_secret(spans.of_trace(trace_id), stack.token, UPSTREAM_SECRET, "a secret argument", USER)


async def test_a_prompt_is_traced_through_its_credential_and_upstream_steps(stack: Stack, spans: Spans) -> None:
    trace_id, agent_span, traceparent = agent_trace()
    async with agent(stack.gw.url, stack.token, "2026-07-28", traceparent=traceparent) as client:
        await client.get_prompt("greet")
    request = await spans.request(trace_id, "mcp prompts/get")
    assert request.parent is not None and request.parent.span_id == agent_span
    assert request.attributes["gen_ai.prompt.name"] == "greet"
    assert request.attributes["portcullis.outcome"] == "ok"
    # The allowlist check of a prompt is its caller's, before the forward step: no authorize span.
    assert set(spans.children(request)) == {"authenticate", "credential", "upstream"}
    assert stack.upstreams.calls[-1]["traceparent"].split("-")[1] == f"{trace_id:032x}"
    assert_nothing_secret(spans.of_trace(trace_id), stack.token, UPSTREAM_SECRET, USER)


@pytest.mark.parametrize("mode", MODES)
async def test_a_denied_call_is_traced_with_its_decision_and_never_reaches_an_upstream_span(
    stack: Stack, spans: Spans, mode: Mode
) -> None:
    trace_id, _, traceparent = agent_trace()
    async with agent(stack.gw.url, stack.token, mode, traceparent=traceparent) as client:
        with pytest.raises(Exception, match="Unknown tool"):
            await client.call_tool("a-name-the-agent-made-up", {})
    request = await spans.request(trace_id, "mcp tools/call")
    assert request.attributes["portcullis.decision"] == "deny"
    assert request.attributes["portcullis.reason"] == "not_exposed"
    assert request.attributes["portcullis.outcome"] == "denied"
    assert request.attributes["gen_ai.tool.name"] == "(not exposed)"  # agents choose those names
    assert request.status.is_unset  # a denial is the gateway working, not failing
    steps = spans.children(request)
    assert set(steps) == {"authenticate", "authorize"}
    assert steps["authorize"].attributes["error.type"] == "RPCError"
    assert_nothing_secret(spans.of_trace(trace_id), stack.token, "a-name-the-agent-made-up")


async def test_a_refused_token_is_traced_as_unauthenticated_without_the_token(stack: Stack, spans: Spans) -> None:
    trace_id, agent_span, traceparent = agent_trace()
    forged = stack.token[:-8] + "AAAAAAAA"
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "modern_echo", "arguments": {}, "_meta": {}}}
    headers = {
        "Authorization": f"Bearer {forged}",
        "traceparent": traceparent,
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call",
        "Mcp-Name": "modern_echo",
        "Accept": "application/json, text/event-stream",
    }
    async with httpx2.AsyncClient(timeout=10) as http:
        answer = await http.post(stack.gw.url, json=call, headers=headers)
    assert answer.status_code == 401
    request = await spans.request(trace_id, "mcp tools/call")  # named by the Mcp-Method header: no core saw it
    assert request.parent is not None and request.parent.span_id == agent_span
    assert request.attributes["portcullis.decision"] == "deny"
    assert request.attributes["portcullis.outcome"] == "unauthenticated"
    assert spans.children(request)["authenticate"].attributes["error.type"] == "Unauthenticated"
    assert_nothing_secret(spans.of_trace(trace_id), forged, stack.token)


async def test_a_request_without_trace_context_starts_a_trace_of_its_own(stack: Stack, spans: Spans) -> None:
    before = {s.context.span_id for s in spans.exporter.get_finished_spans()}
    calls_before = len(stack.upstreams.calls)
    async with agent(stack.gw.url, stack.token, "2026-07-28") as client:
        await client.call_tool("modern_echo", {})
    [headers] = stack.upstreams.calls[calls_before:]
    trace_id = int(headers["traceparent"].split("-")[1], 16)
    request = await spans.request(trace_id, "mcp tools/call")
    assert request.parent is None and request.context.span_id not in before


# --- tracing off -------------------------------------------------------------------------------

OFF_SCRIPT = r"""
import builtins, json, sys, tempfile
from pathlib import Path

real_import = builtins.__import__
imported_by_portcullis = []


def spy(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and name.partition(".")[0] == "opentelemetry" and str((globals or {}).get("__name__", "")).startswith("portcullis"):
        imported_by_portcullis.append(name)
    return real_import(name, globals, locals, fromlist, level)


builtins.__import__ = spy  # every import statement, even of a module already loaded

import anyio
import portcullis.gateway.cluster, portcullis.gateway.endpoint, portcullis.gateway.fastpath, portcullis.serve
from portcullis.gateway import tracing
from tests.gateway.test_tracing import agent, traced_stack


async def calls(stack):
    for mode in ("2026-07-28", "legacy"):
        async with agent(stack.gw.url, stack.token, mode, traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01") as client:
            for tool in ("modern_echo", "legacy_echo"):
                assert not (await client.call_tool(tool, {})).is_error
            await client.get_prompt("greet")


with tempfile.TemporaryDirectory() as directory, traced_stack(Path(directory)) as stack:
    anyio.run(calls, stack)
    print(json.dumps({
        "enabled": tracing.enabled(),
        "configured": tracing.configure_from_env(),
        "no_op": tracing.span("a") is tracing.span("b") is tracing.request({"headers": []}, "s") is tracing.NO_SPAN,
        "imported_by_portcullis": imported_by_portcullis,
        "sdk_modules": sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter"))),
        "forwarded": sorted({k for call in stack.upstreams.calls for k in call if k in ("traceparent", "tracestate")}),
        "calls": len(stack.upstreams.calls),
    }))
"""


def test_tracing_off_is_a_shared_no_op_and_the_gateway_imports_no_opentelemetry() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", OFF_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {
        "enabled": False,
        "configured": False,
        "no_op": True,
        "imported_by_portcullis": [],  # (the MCP SDK imports opentelemetry-api itself; portcullis adds nothing)
        "sdk_modules": [],
        "forwarded": [],  # off means off: not even the agent's traceparent is passed on
        "calls": 6,
    }


# --- switching on --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "exporters"),
    [
        ({}, ()),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ("otlp",)),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, ("otlp",)),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ("otlp",)),
        ({"OTEL_TRACES_EXPORTER": "console, otlp"}, ("console", "otlp")),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ()),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, ()),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, ()),
        ({"OTEL_METRICS_EXPORTER": "otlp"}, ()),
    ],
)
def test_only_the_opentelemetry_environment_switches_tracing_on(environ: dict[str, str], exporters: tuple[str, ...]) -> None:
    assert tracing.exporters_from_env(environ) == exporters


def test_tracing_asked_for_but_not_installed_stays_off(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.resources", None)  # as if the extra were not installed
    assert not tracing.configure_from_env()
    assert not tracing.enabled()
    assert "portcullis[tracing]" in caplog.text


def test_otlp_from_the_environment_exports_the_spans_to_the_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: list[tuple[str, str, bytes]] = []

    async def collect(request: Request) -> Response:
        received.append((request.url.path, request.headers.get("content-type", ""), await request.body()))
        return Response(b"", media_type="application/x-protobuf")

    collector = Starlette(routes=[Route("/v1/traces", collect, methods=["POST"])])
    for name in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    _, agent_span, traceparent = agent_trace()
    with run_asgi(collector, path="") as base:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", base)
        assert tracing.configure_from_env()
        try:
            with tracing.request({"headers": [(b"traceparent", traceparent.encode()), (b"mcp-method", b"tools/call")]}, SERVER):
                with tracing.span("authenticate"):
                    pass
        finally:
            provider = tracing.install(None)
            assert provider is not None
            provider.shutdown()  # the SDK's provider: flushes the batch
    [(path, content_type, body)] = received
    assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
    export = ExportTraceServiceRequest.FromString(body)
    [resource_spans] = export.resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "portcullis-gateway"
    exported = {s.name: s for scope in resource_spans.scope_spans for s in scope.spans}
    assert set(exported) == {"mcp tools/call", "authenticate"}
    assert exported["mcp tools/call"].parent_span_id == agent_span.to_bytes(8, "big")
    assert exported["authenticate"].parent_span_id == exported["mcp tools/call"].span_id


def test_spans_while_tracing_is_off_are_one_shared_no_op() -> None:
    assert not tracing.enabled()
    assert tracing.span("authorize") is tracing.span("upstream", client=True) is tracing.NO_SPAN
    assert tracing.request({"headers": [(b"traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01")]}, SERVER) is tracing.NO_SPAN
    headers: dict[str, str] = {}
    tracing.inject(headers)
    assert headers == {}
