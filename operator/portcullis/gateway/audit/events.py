"""The audit event: one per call and one per denial, and the words it is written in.

An event says who (user, token `jti`, the agent run the token was minted for), what
(server, method, tool, connection), the decision and the rule that decided, how it
ended, and how long it took (the gateway's own time kept apart from the upstream's).
It never carries argument values, results, credentials or tokens: the type has no
field for them. What it carries instead are keyed digests (HMAC-SHA-256 under the
tenant's audit key) of the arguments and of the result, so a disputed call can be
matched to a payload held elsewhere, while the store alone reveals nothing of it.

Reasons and outcomes are declared once, here; the call path, the metrics, the query
filters and the docs all use these names.
"""

from __future__ import annotations

import os
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from portcullis.gateway.audit.encoding import Fields, canonical_text, line_json

Decision = Literal["allow", "deny"]
Outcome = Literal["ok", "tool_error", "upstream_error", "denied", "unauthenticated", "error"]
DECISIONS: Final = ("allow", "deny")
OUTCOMES: Final = ("ok", "tool_error", "upstream_error", "denied", "unauthenticated", "error")

KIND: Final = "portcullis.audit/v1"


class Reason:
    """Why a call was allowed or denied, or how it failed. Values are stable API."""

    ALLOWLISTED: Final = "allowlisted"
    NOT_EXPOSED: Final = "not_exposed"
    OUTSIDE_TOKEN_SCOPE: Final = "outside_token_scope"
    READ_ONLY_TOKEN: Final = "read_only_token"
    """A read-only token and a tool that is not marked read-only (hidden from it, too)."""
    ARGUMENT_RULE: Final = "argument_rule"
    """An argument rule of the tool did not hold (or could not be evaluated: fail closed)."""
    APPROVAL_PENDING: Final = "approval_pending"
    """The tool needs a person's approval of these exact arguments, and none is granted yet."""
    APPROVAL_DENIED: Final = "approval_denied"
    """A person denied the approval of this exact call."""
    RATE_LIMITED: Final = "rate_limited"
    """A per-user limit of the server or the tool is used up for the current window."""
    UNKNOWN_TASK: Final = "unknown_task"
    """A task id this server did not sign, or one created by another user."""
    NO_CREDENTIAL: Final = "no_credential"
    CREDENTIAL_UNREADABLE: Final = "credential_unreadable"
    """The user's sealed credential does not open (moved, altered, or the tenant key changed)."""
    VAULT_UNAVAILABLE: Final = "vault_unavailable"
    GRANT_LOST: Final = "grant_lost"
    """The user's OAuth grant cannot be used (refused at refresh, or by the upstream): reconnect."""
    AUTHORIZATION_UNAVAILABLE: Final = "authorization_unavailable"
    """An OAuth token is due and its authorization server cannot refresh it right now."""
    UPSTREAM_FAILED: Final = "upstream_failed"
    UPSTREAM_RPC_ERROR: Final = "upstream_rpc_error"
    AUDIT_UNAVAILABLE: Final = "audit_unavailable"
    """`onStoreFailure: refuse` and the audit queue is full: the call is not made."""
    AUTH_UNAVAILABLE: Final = "auth_unavailable"
    """The token or revocation store failed while checking the caller."""
    INTERNAL_ERROR: Final = "internal_error"
    """An exception nobody anticipated; the event still gets written, with this reason."""
    STALE_ANSWER: Final = "stale_answer"
    """A 2026-07-28 retry answering a question no call of this user waits for any more (bridge.py)."""
    CANCELLED: Final = "cancelled"
    """The agent disconnected or cancelled while the call ran."""
    RETENTION: Final = "retention"
    """The event recording a pruning of old events."""


NOT_EXPOSED_LABEL: Final = "(not exposed)"
"""The metric label for a denied name: agents choose those, so they must not become label values."""


_IDS_PER_DRAW: Final = 256
_drawn_ids: list[str] = []
os.register_at_fork(after_in_child=_drawn_ids.clear)  # a forked child must not hand out its parent's


def new_request_id() -> str:
    """128 bits from OpenSSL's CSPRNG, as hex: unguessable, like `secrets.token_hex(16)`.

    Not `secrets`/`os.urandom`: their getrandom() syscall releases the GIL, and taking it
    back from the audit store's writer thread, busy on another core, cost 12 µs of CPU per
    request in benchmarks/audit_micro.py --no-pin (under 1 µs pinned to one core; end to end
    at 3,000 calls/s too small to see). This one keeps the GIL. Drawn 256 at a time: each
    `RAND_bytes` also asks the kernel for the process id (OpenSSL's fork check), the last
    `getpid` left on a call's path (benchmarks/results/instructions-2026-12-02.md). Each id is
    handed out once (`list.pop` is atomic under the GIL), and a forked child starts a new draw.
    """
    try:
        return _drawn_ids.pop()
    except IndexError:
        drawn = ssl.RAND_bytes(16 * _IDS_PER_DRAW).hex()
        _drawn_ids.extend([drawn[at:at + 32] for at in range(0, len(drawn), 32)])
        return _drawn_ids.pop()


_last_second: list[Any] = [None, ""]  # (whole second, its formatted form): strftime runs per event otherwise


def iso_time(epoch: float) -> str:
    second = int(epoch // 1)
    if _last_second[0] != second:
        _last_second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_last_second[1]}.{int(epoch * 1_000_000) % 1_000_000:06d}Z"


@dataclass(frozen=True, slots=True)
class AuditEvent:
    time_us: int
    """When the request was answered, in microseconds since the epoch (exact in every store)."""
    request_id: str
    server: str
    """`<namespace>/<name>` of the virtual MCP server."""
    tenant: str
    user: str | None
    method: str
    tool: str | None
    """The tool, prompt or resource URI the request named (as the agent named it)."""
    connection: str | None
    decision: Decision
    reason: str
    outcome: Outcome
    latency_ms: float
    upstream_ms: float | None = None
    """Time spent waiting on the upstream; the gateway's own time is latency_ms minus this."""
    jti: str | None = None
    agent_run_id: str | None = None
    args_digest: str | None = None
    result_digest: str | None = None
    detail: str | None = None
    """A short, safe note for operators (an exception class, an upstream HTTP status); never payload."""
    kind: str = KIND
    _json: tuple[str, str] | None = field(default=None, init=False, repr=False, compare=False)
    """Both JSON forms, once made: the line is written when the event is emitted and the
    canonical form hashed when it is linked, moments later, and one pass makes both. Not an
    init field, so `dataclasses.replace` (a corrected time) starts without it."""

    @property
    def time(self) -> float:
        return self.time_us / 1_000_000

    def _values(self) -> tuple[Any, ...]:
        """The values of the JSON form, in JSON_KEYS order."""
        return (
            self.kind, iso_time(self.time), self.time_us, self.request_id, self.server, self.tenant, self.user,
            self.method, self.tool, self.connection, self.decision, self.reason, self.outcome, self.latency_ms,
            self.upstream_ms, self.jti, self.agent_run_id, self.args_digest, self.result_digest, self.detail,
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(zip(JSON_KEYS, self._values()))  # not dataclasses.asdict: a deep copy, and other keys

    def _forms(self) -> tuple[str, str] | None:
        """(line, canonical text), or None for an event with a value `Fields` does not write (a NaN)."""
        forms = self._json
        if forms is None:
            forms = _FIELDS.encode(self._values())
            object.__setattr__(self, "_json", forms)  # a cache: frozen is about the fields
        return forms

    def to_json(self) -> str:
        """The JSON line: `json.dumps(self.to_dict(), separators=(",", ":"))`."""
        forms = self._forms()
        return forms[0] if forms is not None else line_json(self.to_dict())

    def to_canonical_json(self) -> str:
        """`keys.canonical_json(self.to_dict())` before its UTF-8 encoding: what a chain link covers."""
        forms = self._forms()
        return forms[1] if forms is not None else canonical_text(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditEvent:
        return cls(
            time_us=int(data["time_us"]),
            request_id=str(data["request_id"]),
            server=str(data["server"]),
            tenant=str(data["tenant"]),
            user=data.get("user"),
            method=str(data["method"]),
            tool=data.get("tool"),
            connection=data.get("connection"),
            decision=data["decision"],
            reason=str(data["reason"]),
            outcome=data["outcome"],
            latency_ms=float(data["latency_ms"]),
            upstream_ms=None if data.get("upstream_ms") is None else float(data["upstream_ms"]),
            jti=data.get("jti"),
            agent_run_id=data.get("agent_run_id"),
            args_digest=data.get("args_digest"),
            result_digest=data.get("result_digest"),
            detail=data.get("detail"),
            kind=str(data.get("kind", KIND)),
        )


JSON_KEYS: Final = (
    "kind", "time", "time_us", "request_id", "server", "tenant", "user", "method", "tool", "connection", "decision",
    "reason", "outcome", "latency_ms", "upstream_ms", "jti", "agent_run_id", "args_digest", "result_digest", "detail",
)
"""The keys of an event's JSON form (`to_dict`), in the order its JSON line writes them."""
_FIELDS: Final = Fields(JSON_KEYS)

FIELDS: Final = (
    "time_us", "request_id", "server", "tenant", "user", "method", "tool", "connection", "decision", "reason",
    "outcome", "latency_ms", "upstream_ms", "jti", "agent_run_id", "args_digest", "result_digest", "detail", "kind",
)
"""Every field of an event, in the order the stores and the hash chain use."""
