"""What the admin API accepts: every path, query and body field checked before it is used.

Each check raises `AdminError` with the HTTP status, a stable error code and a message
naming the field, so bad input is always a 400/404/409/413/422 JSON answer and never a
500. The handlers in `admin.py` take only values that came through here.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Collection, Mapping
from typing import Any, Final

from starlette.requests import Request

from portcullis.api.resources import DNS_SUBDOMAIN_PATTERN
from portcullis.gateway.audit.chain import StoredEvent
from portcullis.gateway.audit.events import DECISIONS, OUTCOMES
from portcullis.gateway.audit.store import MAX_PAGE, AuditQuery, decode_cursor, parse_time
from portcullis.gateway.identity.revocation import check_jti

MAX_ADMIN_BODY: Final = 64 * 1024
MAX_SECRET: Final = 16 * 1024
# Kubernetes object names (DNS-1123 subdomain): what connection names are.
_K8S_NAME: Final = re.compile(DNS_SUBDOMAIN_PATTERN)
_RUN_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_MAX_USER: Final = 256
_TEN_YEARS: Final = 10 * 365 * 86400


class AdminError(Exception):
    def __init__(self, status: int, error: str, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.error, self.message, self.extra = status, error, message, extra


def bad(field: str, message: str, status: int = 400) -> AdminError:
    return AdminError(status, "bad_request", message, field=field)


async def json_body(request: Request, allowed: Collection[str]) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_ADMIN_BODY:
        raise AdminError(413, "too_large", f"request body over {MAX_ADMIN_BODY} bytes")
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, RecursionError):
        raise AdminError(400, "bad_json", "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise AdminError(400, "bad_json", "request body must be a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        takes = ", ".join(f"`{a}`" for a in sorted(allowed)) or "no fields"
        raise bad(unknown[0], f"unknown field `{unknown[0]}` (this call takes {takes})")
    return body


def user_id(value: Any, field: str = "user") -> str:
    """A user id: what the application calls its user (an email, an opaque id); no control characters."""
    if not isinstance(value, str) or not value.strip():
        raise bad(field, f"`{field}` (a non-empty string) is required")
    if len(value) > _MAX_USER:
        raise bad(field, f"`{field}` is longer than {_MAX_USER} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value) or value != value.strip():
        raise bad(field, f"`{field}` must not contain control characters or surrounding spaces")
    return value


def connection_name(value: str, used: Collection[str]) -> str:
    """A connection this server needs users' own credentials for (400 for a bad name, 404 for another)."""
    if not _K8S_NAME.fullmatch(value) or len(value) > 253:
        raise bad("connection", f"connection {value[:80]!r} is not a valid name (lowercase letters, digits, '-' and '.', at most 253)")
    if value not in used:
        known = ", ".join(sorted(used)) or "none"
        raise AdminError(
            404, "unknown_connection",
            f"this server takes no per-user credential for connection {value!r} (its user connections: {known})",
            field="connection",
        )
    return value


def jti(value: Any) -> str:
    try:
        check_jti(value if isinstance(value, str) else "")
    except ValueError:
        raise bad("jti", "`jti` must be 1-200 characters of A-Z a-z 0-9 _ - (the jti a mint answered)") from None
    return str(value)


def expires_at(value: Any, default: int) -> int:
    if value is None:
        return default
    now = int(time.time())
    if isinstance(value, bool) or not isinstance(value, int) or not now - 86400 <= value <= now + _TEN_YEARS:
        raise bad("expiresAt", "`expiresAt` must be the token's exp: an integer time in seconds, not long past nor years ahead")
    return value


def run_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _RUN_ID.fullmatch(value):
        raise bad("agentRunId", "`agentRunId` must be 1-128 characters of A-Z a-z 0-9 . _ : -")
    return value


def secret(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise bad("secret", "`secret` (a non-empty string) is required")
    if len(value) > MAX_SECRET:
        raise bad("secret", f"`secret` is longer than {MAX_SECRET} characters")
    return value


_AUDIT_FILTERS = ("user", "tool", "connection", "outcome", "decision", "method")


def time_param(value: str | None, name: str) -> int | None:
    """`30d`-style ages or RFC 3339 times, as epoch microseconds."""
    if value is None or value == "":
        return None
    try:
        return parse_time(value)
    except ValueError as exc:
        raise bad(name, f"`{name}`: {exc}") from None


def audit_query_from(params: Mapping[str, str], *, server: str) -> AuditQuery:
    """An AuditQuery from GET /v1/audit's query string, every field checked."""
    unknown = set(params) - {*_AUDIT_FILTERS, "runId", "since", "until", "limit", "cursor"}
    if unknown:
        raise AdminError(400, "bad_request", f"unknown query parameters: {', '.join(sorted(unknown))}", field=sorted(unknown)[0])
    for name in _AUDIT_FILTERS:
        if len(params.get(name, "")) > 512:
            raise AdminError(400, "bad_request", f"`{name}` is too long", field=name)
    outcome, decision = params.get("outcome"), params.get("decision")
    if outcome is not None and outcome not in OUTCOMES:
        raise AdminError(400, "bad_request", f"`outcome` must be one of {', '.join(OUTCOMES)}", field="outcome")
    if decision is not None and decision not in DECISIONS:
        raise AdminError(400, "bad_request", f"`decision` must be one of {', '.join(DECISIONS)}", field="decision")
    limit_text = params.get("limit", "100")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_PAGE:
        raise AdminError(400, "bad_request", f"`limit` must be an integer from 1 to {MAX_PAGE}", field="limit")
    cursor = params.get("cursor") or None
    if cursor is not None:
        try:
            decode_cursor(cursor)
        except ValueError as exc:
            raise AdminError(400, "bad_request", str(exc), field="cursor") from None
    return AuditQuery(
        server=server,
        user=params.get("user"), tool=params.get("tool"), connection=params.get("connection"),
        outcome=outcome, decision=decision, method=params.get("method"), agent_run_id=params.get("runId"),
        since_us=time_param(params.get("since"), "since"), until_us=time_param(params.get("until"), "until"),
        limit=int(limit_text), cursor=cursor,
    )


def audit_row(row: StoredEvent) -> dict[str, Any]:
    """One stored event as the API and `portcullis audit query --json` show it."""
    return {**row.event.to_dict(), "writer": row.writer, "seq": row.seq, "hash": row.hash}


