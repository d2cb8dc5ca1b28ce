"""Prometheus metrics of the gateway, fed by the audit events and by the audit writer.

Call metrics are derived from the same events the audit log gets, so the two never
disagree and the call path has one recording step, not two. Label values are bounded:
a name the agent chose that is not exposed is counted under `(not exposed)`, and
resource URIs (unbounded through templates) are not a label at all.
"""

from __future__ import annotations

from typing import Any, Final

from prometheus_client import Counter, Gauge, Histogram

from portcullis.gateway.audit.events import NOT_EXPOSED_LABEL, AuditEvent, Reason

_LATENCY_BUCKETS: Final = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_NAMED_METHODS: Final = frozenset({"tools/call", "prompts/get"})

CALLS = Counter(
    "portcullis_calls_total",
    "MCP requests recorded by the gateway, by method, tool, decision and outcome.",
    ["server", "method", "tool", "decision", "outcome"],
)
CALL_DURATION = Histogram(
    "portcullis_call_duration_seconds",
    "Time from the request's arrival at the call path to its answer, for allowed calls.",
    ["server", "method"],
    buckets=_LATENCY_BUCKETS,
)
GATEWAY_DURATION = Histogram(
    "portcullis_gateway_duration_seconds",
    "The gateway's own share of an allowed call: its duration minus the time spent waiting on the upstream.",
    ["server", "method"],
    buckets=_LATENCY_BUCKETS,
)
UPSTREAM_DURATION = Histogram(
    "portcullis_upstream_duration_seconds",
    "Time spent waiting on the upstream, per connection.",
    ["server", "connection"],
    buckets=_LATENCY_BUCKETS,
)
AUTH_FAILURES = Counter(
    "portcullis_auth_failures_total", "Requests refused before any identity was established, by reason.", ["server", "reason"]
)
DENIALS = Counter("portcullis_denials_total", "Authenticated requests denied, by the rule that decided.", ["server", "reason"])
UPSTREAM_ERRORS = Counter(
    "portcullis_upstream_errors_total", "Allowed calls the upstream failed, by connection.", ["server", "connection", "reason"]
)
TOOLS_EXPOSED = Gauge("portcullis_tools_exposed", "Tools this virtual server exposes.", ["server"])
TOOLS_UPSTREAM = Gauge("portcullis_tools_upstream", "Tools its upstream connections list in all.", ["server"])
SCHEMA_TOKENS = Gauge(
    "portcullis_tool_schema_tokens", "Estimated tokens of the tool definitions, exposed vs upstream.", ["server", "scope"]
)

AUDIT_QUEUE_DEPTH = Gauge("portcullis_audit_queue_depth", "Audit events waiting for the durable store (including reserved).", ["server"])
AUDIT_QUEUE_CAPACITY = Gauge("portcullis_audit_queue_capacity", "Bound of the audit queue.", ["server"])
AUDIT_WRITE_DURATION = Histogram(
    "portcullis_audit_write_duration_seconds",
    "Time to store one batch of audit events.",
    ["server", "store"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
AUDIT_WRITTEN = Counter("portcullis_audit_events_written_total", "Audit events stored durably.", ["server", "store"])
AUDIT_WRITE_FAILURES = Counter(
    "portcullis_audit_write_failures_total", "Failed attempts to store a batch (retried).", ["server", "store"]
)
AUDIT_UNAUDITED = Counter(
    "portcullis_audit_unaudited_calls_total",
    "Calls served although their event could not be queued (onStoreFailure: allow).",
    ["server"],
)
AUDIT_REFUSED = Counter(
    "portcullis_audit_refused_calls_total",
    "Calls not made because their event could not be recorded (onStoreFailure: refuse).",
    ["server"],
)
AUDIT_DROPPED = Counter(
    "portcullis_audit_dropped_events_total", "Audit events that never reached the durable store (queue full).", ["server"]
)
AUDIT_PRUNED = Counter("portcullis_audit_pruned_events_total", "Audit events removed by retention.", ["server"])


_children: dict[tuple[Any, ...], Any] = {}
"""Labelled children already looked up: `labels()` validates and locks on every call, and this runs
per request. Label values are bounded (see above), so this holds what the registry holds anyway."""


def _child(metric: Any, *values: str) -> Any:
    key = (metric, *values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


def observe(event: AuditEvent) -> None:
    """Count one recorded request."""
    server = event.server
    if event.method in _NAMED_METHODS and event.reason != Reason.NOT_EXPOSED:
        tool = event.tool or ""
    else:
        tool = NOT_EXPOSED_LABEL if event.reason == Reason.NOT_EXPOSED else ""
    _child(CALLS, server, event.method, tool, event.decision, event.outcome).inc()
    if event.outcome == "unauthenticated":
        _child(AUTH_FAILURES, server, event.reason).inc()
    elif event.decision == "deny":
        _child(DENIALS, server, event.reason).inc()
    else:
        seconds = event.latency_ms / 1000
        _child(CALL_DURATION, server, event.method).observe(seconds)
        upstream = (event.upstream_ms or 0.0) / 1000
        _child(GATEWAY_DURATION, server, event.method).observe(max(seconds - upstream, 0.0))
        if event.connection is not None and event.upstream_ms is not None:
            _child(UPSTREAM_DURATION, server, event.connection).observe(upstream)
        if event.outcome in ("upstream_error", "error") and event.connection is not None:
            _child(UPSTREAM_ERRORS, server, event.connection, event.reason).inc()


def set_exposure(server: str, *, exposed: int, upstream: int, exposed_tokens: int, upstream_tokens: int) -> None:
    TOOLS_EXPOSED.labels(server).set(exposed)
    TOOLS_UPSTREAM.labels(server).set(upstream)
    SCHEMA_TOKENS.labels(server, "exposed").set(exposed_tokens)
    SCHEMA_TOKENS.labels(server, "upstream").set(upstream_tokens)
