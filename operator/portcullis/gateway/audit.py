"""Audit events: one per call and one per denial.

An event says who (user, token `jti`), what (server, tool, connection), the
decision and why, how it ended and how long it took. It never carries argument
values, credentials or tokens: the event type has no field for them, so no code
path can leak one by accident.

Writing an event never blocks a call: sinks buffer and write off the request
path, and a sink that fails counts the failure (a metric and a stderr line)
instead of failing the call silently.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal, Protocol, TextIO

Decision = Literal["allow", "deny"]
Outcome = Literal["ok", "tool_error", "upstream_error", "denied", "unauthenticated"]


@dataclass(frozen=True)
class AuditEvent:
    time: float
    request_id: str
    server: str
    tenant: str
    user: str | None
    tool: str | None
    connection: str | None
    decision: Decision
    reason: str
    outcome: Outcome
    latency_ms: float
    jti: str | None
    method: str = "tools/call"
    kind: str = "portcullis.audit/v1"

    def to_json(self) -> str:
        # Built by hand rather than with dataclasses.asdict (a deep copy): this runs per call.
        data = {
            "kind": self.kind,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.time)) + f".{int(self.time * 1000) % 1000:03d}Z",
            "request_id": self.request_id,
            "server": self.server,
            "tenant": self.tenant,
            "user": self.user,
            "method": self.method,
            "tool": self.tool,
            "connection": self.connection,
            "decision": self.decision,
            "reason": self.reason,
            "outcome": self.outcome,
            "latency_ms": round(self.latency_ms, 3),
            "jti": self.jti,
        }
        return json.dumps(data, separators=(",", ":"))


class AuditSink(Protocol):
    def emit(self, event: AuditEvent) -> None:
        """Record one event. Must not block or raise."""


class MemoryAuditSink:
    """Keeps events in memory, for tests and for `portcullis demo`'s summary."""

    def __init__(self, limit: int = 10_000):
        self.events: deque[AuditEvent] = deque(maxlen=limit)

    def emit(self, event: AuditEvent) -> None:
        self.events.append(event)


class JsonLinesAuditSink:
    """One JSON line per event on a text stream (stdout by default).

    Inside an event loop, lines are queued and written once per loop iteration, so
    calls finishing together share one write and one flush and no call waits on the
    stream. Lines are written whole, so events never interleave; a broken stream is
    counted, reported once, and skipped.
    """

    def __init__(self, stream: TextIO | None = None):
        self._stream = stream if stream is not None else sys.stdout
        self._pending: list[str] = []
        self._scheduled = False
        self.failures = 0

    def emit(self, event: AuditEvent) -> None:
        self._pending.append(event.to_json())
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        lines, self._pending = self._pending, []
        if not lines:
            return
        try:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        except (OSError, ValueError) as exc:
            self.failures += 1
            if self.failures == 1:
                print(f"portcullis: audit sink failed: {exc}", file=sys.stderr)


class FileAuditSink(JsonLinesAuditSink):
    """Appends JSON lines to a file (mode 0600), as the durable local sink."""

    def __init__(self, path: str):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        super().__init__(os.fdopen(fd, "a", buffering=1))


class FanoutAuditSink:
    def __init__(self, *sinks: AuditSink):
        self.sinks = sinks

    def emit(self, event: AuditEvent) -> None:
        for sink in self.sinks:
            sink.emit(event)
