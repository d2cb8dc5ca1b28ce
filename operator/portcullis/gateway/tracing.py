"""Optional OpenTelemetry traces of the call path: off unless configured, free when off.

When tracing is off (the default) nothing of OpenTelemetry is imported or touched
here: `span()` and `request()` return one shared do-nothing context manager, and
`audit()`, `refused()` and `inject()` return at their first line. The hooks on the
call path are a handful of function calls, well under a microsecond against the
~0.7 ms the gateway adds to a call. (The MCP SDK itself imports `opentelemetry-api`;
this module adds no import of its own until tracing is switched on.)

Switching it on uses the standard OpenTelemetry environment, read once at start
(`configure_from_env`, called by `portcullis serve` and the cluster entry point):

- on when `OTEL_TRACES_EXPORTER` names `otlp` and/or `console`, or, with it unset,
  when an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
  `OTEL_EXPORTER_OTLP_ENDPOINT`, e.g. what the OpenTelemetry Operator injects);
- off otherwise, and always with `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.

Unlike the SDK's own default (export over OTLP to localhost whenever nothing says
otherwise), nothing at all means off: a gateway on a laptop must not try to reach a
collector that is not there. The exporter is OTLP over HTTP/protobuf
(`pip install 'portcullis[tracing]'`), configured by its own standard variables
(endpoint, headers, timeout, certificate); the sampler is `OTEL_TRACES_SAMPLER`
(the SDK's default: parent-based, always on); the service is `OTEL_SERVICE_NAME`,
else `portcullis-gateway`. The provider is the gateway's own, not the global one, so
switching it on does not also switch on the MCP SDK's internal instrumentation.

The spans of one request:

    mcp <method>      SERVER  the whole /mcp request, opened in `endpoint.BearerAuth`
      authenticate            the session token check
      authorize               tools/call: allowlist and token scope
      credential              the user's credential for the connection, from the vault
      upstream        CLIENT  the forwarded request; its `traceparent` names this span

The request span opens in `BearerAuth` because authentication runs there, before
the SDK or the short path ever sees the request; everything after it runs in the
same task, or in tasks that copied its context, so context variables carry the
span down to the core and the upstream client as they carry the session claims.
An agent's W3C `traceparent`/`tracestate` headers make it a continuation of the
agent's trace; without them it is a new trace. Its name comes from the
`Mcp-Method` header when that names a known method (2026-07-28 requests carry
one), and the core renames it when it learns the method of an audited request
(the session-based wire carries the method only in the body). Every /mcp request
past the Origin check gets one, a change stream (`subscriptions/listen`, the
session-era GET stream) for as long as it stays open; the audited ones (calls,
prompts, resources, completions, refusals) also carry their audit event's words.
Prompts, resources and completions get no `authorize` span: their callers check
the allowlist before the forward step.

What spans carry, and what they never do: the request span has the server, the
method, the tool or prompt name as exposed (`(not exposed)` for a name the
allowlist does not know, as in the metrics: agents choose those), and, for an
audited request, the audit event's decision, reason, outcome, connection and
request id, which joins a trace to its audit event. Never arguments, results,
users, session tokens, credentials or headers; an exception is recorded by its
class name only, since its text may carry an upstream's bytes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, MutableMapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final, Protocol

from portcullis import __version__
from portcullis.gateway.audit.events import NOT_EXPOSED_LABEL, Reason

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider as SDKTracerProvider
    from opentelemetry.trace import Span, TracerProvider

log = logging.getLogger("portcullis.gateway")

SERVICE_NAME: Final = "portcullis-gateway"
EXPORTERS: Final = ("otlp", "console")
_TRUE: Final = ("true", "1", "yes")
# Agent-chosen header values must not become span names (names should be few); only these do.
_KNOWN_METHODS: Final = frozenset({
    "initialize", "ping", "server/discover", "subscriptions/listen", "logging/setLevel",
    "tools/list", "tools/call", "prompts/list", "prompts/get", "resources/list", "resources/read",
    "resources/templates/list", "resources/subscribe", "resources/unsubscribe", "completion/complete",
})
# Which attribute names the request's target, per method (OpenTelemetry's MCP conventions);
# resource URIs are left out: a templated one carries values much like arguments do.
_TARGET_ATTRIBUTE: Final = {"tools/call": "gen_ai.tool.name", "prompts/get": "gen_ai.prompt.name"}
_FAILED_OUTCOMES: Final = frozenset({"error", "upstream_error"})


class AuditedRecord(Protocol):
    """What the request span reads of an audit record (`audit.recorder.CallRecord`)."""

    @property
    def request_id(self) -> str: ...
    @property
    def method(self) -> str: ...
    @property
    def name(self) -> str | None: ...
    @property
    def connection(self) -> str | None: ...
    @property
    def decision(self) -> str | None: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def outcome(self) -> str | None: ...


class _NoSpan:
    """The one stand-in for every span while tracing is off."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


NO_SPAN: Final = _NoSpan()


class _Otel:
    """What tracing uses of OpenTelemetry, imported only once tracing is switched on."""

    def __init__(self, provider: TracerProvider):
        from opentelemetry.trace import SpanKind, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer = provider.get_tracer("portcullis.gateway", __version__)
        # W3C Trace Context only: baggage is the agent's to send, not the gateway's to pass on.
        self.propagator = TraceContextTextMapPropagator()
        self.internal, self.client, self.server = SpanKind.INTERNAL, SpanKind.CLIENT, SpanKind.SERVER
        self.error = StatusCode.ERROR

    def failed(self, span: Span, exc: BaseException) -> None:
        span.set_attribute("error.type", type(exc).__name__)  # never str(exc): it may carry payload
        span.set_status(self.error)


class _Request:
    """The current request's span, and what the core and the auth layer tell it."""

    __slots__ = ("span", "record", "refusal")

    def __init__(self, span: Span):
        self.span = span
        self.record: AuditedRecord | None = None
        self.refusal: tuple[str, str] | None = None

    def finish(self, otel: _Otel) -> None:
        record, outcome = self.record, None
        attributes: dict[str, str] = {}
        if record is not None:
            reason = record.reason or Reason.INTERNAL_ERROR
            outcome = record.outcome or "error"  # as the audit event defaults them
            attributes.update({
                "mcp.method.name": record.method,
                "portcullis.request_id": record.request_id,
                "portcullis.decision": record.decision or "deny",
                "portcullis.reason": reason,
                "portcullis.outcome": outcome,
            })
            if record.connection is not None:
                attributes["portcullis.connection"] = record.connection
            target = _TARGET_ATTRIBUTE.get(record.method)
            if target is not None and record.name is not None:
                attributes[target] = NOT_EXPOSED_LABEL if reason == Reason.NOT_EXPOSED else record.name
        elif self.refusal is not None:
            reason, outcome = self.refusal
            attributes.update({"portcullis.decision": "deny", "portcullis.reason": reason, "portcullis.outcome": outcome})
        self.span.set_attributes(attributes)
        if outcome in _FAILED_OUTCOMES:
            self.span.set_status(otel.error)


_otel: _Otel | None = None
_current: ContextVar[_Request | None] = ContextVar("portcullis_trace_request", default=None)


# --- switching on and off ------------------------------------------------------------


def enabled() -> bool:
    return _otel is not None


def install(provider: TracerProvider | None) -> TracerProvider | None:
    """Trace with `provider` from now on (None: off); returns the provider it replaces.

    Tests install an SDK provider with an in-memory exporter; `configure_from_env`
    installs the one the environment asks for.
    """
    global _otel
    previous = _otel.provider if _otel is not None else None
    _otel = _Otel(provider) if provider is not None else None
    return previous


def configure_from_env() -> bool:
    """Switch tracing on if the environment asks for it (see above); True when it is on.

    Idempotent, and never switches tracing off: a provider already installed stays.
    Asked for but not installed (`portcullis[tracing]`), tracing stays off with a warning.
    """
    if _otel is not None:
        return True
    exporters = exporters_from_env(os.environ)
    if not exporters:
        return False
    try:
        provider = _provider(exporters)
    except ImportError as exc:
        log.warning("tracing is configured, but %s is not installed (pip install 'portcullis[tracing]'): no traces", exc.name)
        return False
    install(provider)
    log.info("tracing on: spans exported to %s", ", ".join(exporters))
    return True


def exporters_from_env(environ: Mapping[str, str]) -> tuple[str, ...]:
    """The exporters the standard OpenTelemetry variables ask for; () means tracing off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return ()
    named = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not named:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ("otlp",) if endpoint else ()
    if "none" in named:
        return ()
    unsupported = [n for n in named if n not in EXPORTERS]
    if unsupported:
        log.warning("OTEL_TRACES_EXPORTER: %s not supported by the gateway (only %s)", ", ".join(unsupported), ", ".join(EXPORTERS))
    return tuple(dict.fromkeys(n for n in named if n in EXPORTERS))


def _provider(exporters: tuple[str, ...]) -> SDKTracerProvider:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    resource = Resource.create({"service.version": __version__})  # + OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "unknown_service")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    for name in exporters:
        exporter: SpanExporter
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            if protocol and protocol != "http/protobuf":
                log.warning("OTLP protocol %r is not supported by the gateway: spans are sent over http/protobuf", protocol)
            exporter = OTLPSpanExporter()
        else:
            exporter = ConsoleSpanExporter()
        # Batched in the SDK's own thread: exporting never runs on, or blocks, a call.
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


# --- the hooks on the call path ------------------------------------------------------


def request(scope: Mapping[str, Any], server: str) -> contextlib.AbstractContextManager[None]:
    """The span of one /mcp request (ASGI `scope`), continuing the agent's W3C trace context."""
    otel = _otel
    if otel is None:
        return NO_SPAN
    return _request_span(otel, scope, server)


def span(name: str, *, client: bool = False) -> contextlib.AbstractContextManager[None]:
    """A child span of the current one: a step of the call path (`client`: a request the gateway sends)."""
    otel = _otel
    if otel is None:
        return NO_SPAN
    return _child_span(otel, name, client)


def audit(record: AuditedRecord) -> None:
    """Tie the current request span to the request's audit record, which describes it on the way out."""
    if _otel is None:
        return
    state = _current.get()
    if state is not None and state.record is None:
        state.record = record
        state.span.update_name(f"mcp {record.method}")


def refused(reason: str, outcome: str) -> None:
    """The request was refused before any identity was established (audited as such)."""
    if _otel is None:
        return
    state = _current.get()
    if state is not None:
        state.refusal = (reason, outcome)


def inject(headers: MutableMapping[str, str]) -> None:
    """Add `traceparent` (and `tracestate`) for the current span to an upstream request's headers."""
    otel = _otel
    if otel is not None:
        otel.propagator.inject(headers)


@contextlib.contextmanager
def _request_span(otel: _Otel, scope: Mapping[str, Any], server: str) -> Iterator[None]:
    carrier: dict[str, list[str]] = {}
    method = None
    for key, value in scope["headers"]:
        if key == b"traceparent" or key == b"tracestate":
            carrier.setdefault(key.decode(), []).append(bytes(value).decode("latin-1"))
        elif key == b"mcp-method":
            method = bytes(value).decode("latin-1")
    parent = otel.propagator.extract(carrier)  # an empty context without a valid traceparent: a new trace
    attributes = {"portcullis.server": server}
    name = "mcp"
    if method in _KNOWN_METHODS:
        name = f"mcp {method}"
        attributes["mcp.method.name"] = method
    with otel.tracer.start_as_current_span(
        name, context=parent, kind=otel.server, attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as current:
        state = _Request(current)
        reset = _current.set(state)
        try:
            yield
        except BaseException as exc:
            otel.failed(current, exc)
            raise
        finally:
            _current.reset(reset)
            state.finish(otel)


@contextlib.contextmanager
def _child_span(otel: _Otel, name: str, client: bool) -> Iterator[None]:
    with otel.tracer.start_as_current_span(
        name, kind=otel.client if client else otel.internal, record_exception=False, set_status_on_exception=False
    ) as current:
        try:
            yield
        except BaseException as exc:
            otel.failed(current, exc)
            raise
