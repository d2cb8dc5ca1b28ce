"""Where events go besides the durable store: stdout JSON lines, a file, memory.

`AuditSink` is the one-method plug point. Writing never blocks a call: the JSON-lines
sink buffers and writes once per loop iteration, and a sink that fails counts the
failure and says so once on stderr instead of failing the call.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import deque
from typing import Protocol, TextIO

from portcullis.gateway.audit.events import AuditEvent


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
