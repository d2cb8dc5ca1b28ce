"""Prometheus metrics of the gateway, fed by the audit events and by the audit writer.

Call metrics are derived from the same events the audit log gets, so the two never
disagree and the call path has one recording step, not two. Label values are bounded:
a name the agent chose that is not exposed is counted under `(not exposed)`, and
resource URIs (unbounded through templates) are not a label at all.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any, Final

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from portcullis.gateway.audit.events import NOT_EXPOSED_LABEL, AuditEvent, Reason

_LATENCY_BUCKETS: Final = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_NAMED_METHODS: Final = frozenset({"tools/call", "prompts/get"})


class _Tally:
    """One labelled series of a counter or a histogram, kept in plain numbers (see `CallMetric`)."""

    __slots__ = ("buckets", "created", "total")

    def __init__(self, bucket_count: int):
        self.buckets = [0] * bucket_count  # per bucket, not cumulative; the last is +Inf
        self.total = 0.0  # a counter's value, a histogram's sum
        self.created = time.time()


class CallMetric:
    """A counter or histogram that every call moves, as prometheus_client would expose it.

    prometheus_client's `Counter.inc` and `Histogram.observe` take a lock per value and run
    several Python frames (a histogram: its sum, then a scan of its buckets). Four such
    updates per call cost 4.7% of a call's instructions
    (`benchmarks/results/instructions-2026-12-03.md`). These are only updated on the event
    loop, and the metrics endpoint reads them on that loop too (an `async` route), so plain
    numbers do: a counter is one addition, a histogram a `bisect` and two. A registered
    collector turns them into the same samples a `Counter` or `Histogram` would give:
    `_total` and `_created`, or `_bucket` (cumulative, `le` spelled as prometheus_client
    spells it), `_count`, `_sum` and `_created`.
    """

    def __init__(
        self, name: str, documentation: str, labelnames: list[str], buckets: tuple[float, ...] | None = None,
        registry: CollectorRegistry = REGISTRY,
    ):
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.histogram = buckets is not None
        self.bounds = [float(b) for b in buckets or ()]
        self._les = [floatToGoString(b) for b in [*self.bounds, float("inf")]]  # type: ignore[no-untyped-call]
        self._series: dict[tuple[str, ...], _Tally] = {}
        registry.register(self)

    def _tally(self, labels: tuple[str, ...]) -> _Tally:
        tally = self._series.get(labels)
        if tally is None:
            tally = self._series[labels] = _Tally(len(self.bounds) + 1 if self.histogram else 0)
        return tally

    def inc(self, *labels: str) -> None:
        self._tally(labels).total += 1.0

    def observe(self, value: float, *labels: str) -> None:
        tally = self._tally(labels)
        tally.buckets[bisect_left(self.bounds, value)] += 1  # the first bound >= value: its `le`
        tally.total += value

    def value(self, *labels: str) -> float:
        """A counter's value, a histogram's count (tests)."""
        tally = self._series.get(labels)
        if tally is None:
            return 0.0
        return sum(tally.buckets) if self.histogram else tally.total

    # --- the collector --------------------------------------------------------------------

    def describe(self) -> Iterator[Metric]:
        yield self._counter() if not self.histogram else self._histogram()

    def collect(self) -> Iterator[Metric]:
        series = list(self._series.items())  # new series may come while this runs: a copy
        if not self.histogram:
            counter = self._counter()
            for labels, tally in series:
                counter.add_metric(labels, tally.total, created=tally.created)
            yield counter
            return
        histogram = self._histogram()
        for labels, tally in series:
            cumulative, buckets = 0, []
            for le, count in zip(self._les, list(tally.buckets)):
                cumulative += count
                buckets.append((le, float(cumulative)))
            histogram.add_metric(labels, buckets, tally.total)
            histogram.add_sample(self.name + "_created", dict(zip(self.labelnames, labels)), tally.created)
        yield histogram

    def _counter(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _histogram(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)


CALLS = CallMetric(
    "portcullis_calls_total",
    "MCP requests recorded by the gateway, by method, tool, decision and outcome.",
    ["server", "method", "tool", "decision", "outcome"],
)
CALL_DURATION = CallMetric(
    "portcullis_call_duration_seconds",
    "Time from the request's arrival at the call path to its answer, for allowed calls.",
    ["server", "method"],
    buckets=_LATENCY_BUCKETS,
)
GATEWAY_DURATION = CallMetric(
    "portcullis_gateway_duration_seconds",
    "The gateway's own share of an allowed call: its duration minus the time spent waiting on the upstream.",
    ["server", "method"],
    buckets=_LATENCY_BUCKETS,
)
UPSTREAM_DURATION = CallMetric(
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
    CALLS.inc(server, event.method, tool, event.decision, event.outcome)
    if event.outcome == "unauthenticated":
        _child(AUTH_FAILURES, server, event.reason).inc()
    elif event.decision == "deny":
        _child(DENIALS, server, event.reason).inc()
    else:
        seconds = event.latency_ms / 1000
        CALL_DURATION.observe(seconds, server, event.method)
        upstream = (event.upstream_ms or 0.0) / 1000
        GATEWAY_DURATION.observe(max(seconds - upstream, 0.0), server, event.method)
        if event.connection is not None and event.upstream_ms is not None:
            UPSTREAM_DURATION.observe(upstream, server, event.connection)
        if event.outcome in ("upstream_error", "error") and event.connection is not None:
            _child(UPSTREAM_ERRORS, server, event.connection, event.reason).inc()


def set_exposure(server: str, *, exposed: int, upstream: int, exposed_tokens: int, upstream_tokens: int) -> None:
    TOOLS_EXPOSED.labels(server).set(exposed)
    TOOLS_UPSTREAM.labels(server).set(upstream)
    SCHEMA_TOKENS.labels(server, "exposed").set(exposed_tokens)
    SCHEMA_TOKENS.labels(server, "upstream").set(upstream_tokens)
