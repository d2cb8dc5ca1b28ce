"""One record per request, written once on the way out, whatever happened on the way.

The call path opens a `recording(...)` around everything it does for one request and
fills the record in as it learns things (the connection, the decision, the upstream's
time, the outcome). The event is emitted when that one block exits, so a branch
that forgets to record, or an exception nobody anticipated, cannot produce a request
without an event: an unfinished record is written as `outcome: error` with the
exception's class as its detail (never its text, which may carry payload).

`CallRecord` is its own context manager, as is its upstream timer, rather than
`contextlib.contextmanager` generators: this runs on every request, and a generator's
frame and wrapper cost more than the few lines they would save.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Any, Self

from portcullis.gateway.audit.events import (
    AuditEvent,
    Decision,
    Outcome,
    Reason,
    new_request_id,
)
from portcullis.gateway.audit.trail import AuditTrail
from portcullis.gateway.identity.tokens import SessionClaims


class CallRecord:
    """The audit event of one request, in the making."""

    __slots__ = (
        "request_id", "method", "name", "claims", "connection", "decision", "reason", "outcome", "detail",
        "upstream_ms", "args_digest", "result_digest", "reserved", "_trail", "_started",
    )

    def __init__(self, trail: AuditTrail, claims: SessionClaims | None, method: str, name: str | None):
        self._trail = trail
        self._started = time.perf_counter()
        self.request_id = new_request_id()
        self.claims = claims
        self.method = method
        self.name = name
        self.connection: str | None = None
        self.decision: Decision | None = None
        self.reason: str | None = None
        self.outcome: Outcome | None = None
        self.detail: str | None = None
        self.upstream_ms: float | None = None
        self.args_digest: str | None = None
        self.result_digest: str | None = None
        self.reserved = False

    def deny(self, reason: str, *, outcome: Outcome = "denied", detail: str | None = None) -> None:
        self.decision, self.reason, self.outcome, self.detail = "deny", reason, outcome, detail

    def allow(self, connection: str) -> None:
        self.decision, self.reason, self.connection = "allow", Reason.ALLOWLISTED, connection

    def admit(self) -> bool:
        """Reserve the event's place in the audit queue before the upstream sees anything."""
        if not self._trail.admit():
            self.deny(Reason.AUDIT_UNAVAILABLE)
            return False
        self.reserved = True
        return True

    def arguments(self, value: Any) -> None:
        self.args_digest = self._trail.digest(value)

    def result(self, value: Any, outcome: Outcome) -> None:
        self.result_digest = self._trail.digest(value)
        self.outcome = outcome

    def failed(self, reason: str, outcome: Outcome = "upstream_error", detail: str | None = None) -> None:
        self.reason, self.outcome, self.detail = reason, outcome, detail

    def upstream(self) -> _UpstreamTimer:
        """Time the upstream's share of the call (`with record.upstream(): ...`)."""
        return _UpstreamTimer(self)

    def event(self) -> AuditEvent:
        claims = self.claims
        return AuditEvent(
            time_us=time.time_ns() // 1000,
            request_id=self.request_id,
            server=self._trail.server,
            tenant=self._trail.tenant,
            user=claims.sub if claims else None,
            method=self.method,
            tool=self.name,
            connection=self.connection,
            decision=self.decision or "deny",
            reason=self.reason or Reason.INTERNAL_ERROR,
            outcome=self.outcome or "error",
            latency_ms=round((time.perf_counter() - self._started) * 1000, 3),
            upstream_ms=self.upstream_ms,
            jti=claims.jti if claims else None,
            agent_run_id=claims.agent_run_id if claims else None,
            args_digest=self.args_digest,
            result_digest=self.result_digest,
            detail=self.detail,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        """The one place a request's audit event is written; whatever was raised goes on up."""
        if kind is not None and self.outcome is None:
            if issubclass(kind, asyncio.CancelledError):
                self.failed(Reason.CANCELLED, "error", "the agent went away or the call was cancelled")
            else:
                self.failed(Reason.INTERNAL_ERROR, "error", kind.__name__)
        self._trail.emit(self.event(), reserved=self.reserved)


class _UpstreamTimer:
    """Sets the record's `upstream_ms` when the block it times exits, however it exits."""

    __slots__ = ("_record", "_started")

    def __init__(self, record: CallRecord):
        self._record = record
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        self._record.upstream_ms = round((time.perf_counter() - self._started) * 1000, 3)


def recording(trail: AuditTrail, claims: SessionClaims | None, method: str, name: str | None) -> CallRecord:
    """`with recording(...) as record:` around everything done for one request; see `CallRecord.__exit__`."""
    return CallRecord(trail, claims, method, name)
