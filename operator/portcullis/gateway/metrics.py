"""Prometheus metrics, derived from audit events.

Metrics are fed by the same events the audit log gets, so the two can never
disagree and the call path has one recording step, not two.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from portcullis.gateway.audit import AuditEvent

CALLS = Counter(
    "portcullis_calls_total",
    "MCP calls handled by the gateway, by method, decision and outcome.",
    ["server", "method", "decision", "outcome"],
)
LATENCY = Histogram(
    "portcullis_call_duration_seconds",
    "Time from authorization to relayed result, for allowed calls.",
    ["server", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


class MetricsAuditSink:
    def emit(self, event: AuditEvent) -> None:
        CALLS.labels(event.server, event.method, event.decision, event.outcome).inc()
        if event.decision == "allow":
            LATENCY.labels(event.server, event.method).observe(event.latency_ms / 1000)
