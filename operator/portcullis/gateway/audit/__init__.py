"""The audit trail: events, where they go, how they are kept, chained, queried and verified.

    events.py    the event and the reasons, declared once
    recorder.py  one record per request, written in one `finally`
    trail.py     the process's trail: sinks, metrics, bounded queue, writer, retention
    sinks.py     stdout JSON lines, files, memory
    store.py     the durable store interface; sqlite.py and postgres.py implement it
    chain.py     per-writer keyed hash chains and their verification
    keys.py      the tenant's audit key (digests and chain)
    metrics.py   Prometheus
"""

from portcullis.gateway.audit.events import AuditEvent, Decision, Outcome, Reason
from portcullis.gateway.audit.sinks import AuditSink, FanoutAuditSink, FileAuditSink, JsonLinesAuditSink, MemoryAuditSink

__all__ = [
    "AuditEvent", "AuditSink", "Decision", "FanoutAuditSink", "FileAuditSink", "JsonLinesAuditSink",
    "MemoryAuditSink", "Outcome", "Reason",
]
