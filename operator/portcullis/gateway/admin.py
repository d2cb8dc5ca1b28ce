"""The admin API: minting, revocation, credentials and status, on its own port.

It is never the agent's port: an agent holds only a session token, and that
token opens nothing here. Callers authenticate with an `AdminAuth`: a client
secret locally, ServiceAccount tokens checked by TokenReview and a
SubjectAccessReview for the verb `mint` in a cluster.

    POST   /v1/tokens                                   mint a session token
    POST   /v1/revocations                              revoke by jti or by user
    PUT    /v1/users/{user}/connections/{connection}    store a user's credential (sealed)
    DELETE /v1/users/{user}/connections/{connection}    forget it (cuts access at the next call)
    GET    /v1/status                                   tool counts, schema tokens, readiness, audit queue
    GET    /v1/audit                                    query the audit log (filters, cursor paging)
    GET    /v1/audit/verify                             verify the hash chains of a time range
    GET    /metrics                                     Prometheus
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from portcullis.api.durations import format_duration, parse_duration
from portcullis.gateway.audit.chain import StoredEvent
from portcullis.gateway.audit.events import DECISIONS, OUTCOMES
from portcullis.gateway.audit.store import MAX_PAGE, AuditQuery, AuditStoreError, decode_cursor, parse_time
from portcullis.gateway.admission import AdminAuth
from portcullis.gateway.core import Gateway
from portcullis.gateway.credentials import VaultUnavailable
from portcullis.gateway.tokens import SigningKeys, mint_token

MAX_ADMIN_BODY = 64 * 1024
_RUN_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class AdminError(Exception):
    def __init__(self, status: int, error: str, message: str, **extra: Any):
        self.status, self.error, self.message, self.extra = status, error, message, extra


def _fail(exc: AdminError) -> JSONResponse:
    return JSONResponse({"error": exc.error, "message": exc.message, **exc.extra}, status_code=exc.status)


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_ADMIN_BODY:
        raise AdminError(413, "too_large", f"request body over {MAX_ADMIN_BODY} bytes")
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise AdminError(400, "bad_json", "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise AdminError(400, "bad_json", "request body must be a JSON object")
    return body


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def mint(gateway: Gateway, keys: SigningKeys, body: dict[str, Any]) -> dict[str, Any]:
    """Validate a mint request against the server's policy and sign the token (no I/O)."""
    user = body.get("user")
    if not isinstance(user, str) or not user.strip():
        raise AdminError(400, "bad_request", "`user` (a non-empty string) is required")
    policy = gateway.config.tokens
    ttl_text = body.get("ttl")
    try:
        ttl = policy.default_ttl_seconds if ttl_text is None else parse_duration(str(ttl_text))
    except ValueError as exc:
        raise AdminError(400, "bad_ttl", str(exc)) from None
    if ttl <= 0:
        raise AdminError(400, "bad_ttl", "ttl must be positive")
    if ttl > policy.max_ttl_seconds:
        raise AdminError(
            400,
            "ttl_too_long",
            f"ttl {format_duration(ttl)} exceeds this server's sessionTokens.maxTTL ({format_duration(policy.max_ttl_seconds)})",
        )
    tools = body.get("tools")
    scope: tuple[str, ...] | None = None
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
            raise AdminError(400, "bad_request", "`tools` must be a list of tool names")
        exposed = {t.name for t in gateway.config.tools}
        unknown = sorted(set(tools) - exposed)
        if unknown:
            raise AdminError(
                400, "unknown_tools", f"not exposed by this server: {', '.join(unknown)}", unknown=unknown
            )
        scope = tuple(sorted(set(tools)))
    run = body.get("agentRunId")
    if run is not None and (not isinstance(run, str) or not _RUN_ID.fullmatch(run)):
        raise AdminError(400, "bad_request", "`agentRunId` must be 1-128 characters of A-Z a-z 0-9 . _ : -", field="agentRunId")
    token, claims = mint_token(
        keys,
        issuer=gateway.config.server.issuer,
        audience=gateway.config.server.url,
        user=user,
        tenant=gateway.config.tenant,
        ttl_seconds=ttl,
        tools=scope,
        agent_run_id=run,
        after=gateway.revocations.revoked_at(user),
    )
    return {
        "token": token,
        "jti": claims.jti,
        "user": claims.sub,
        "audience": claims.aud,
        "expiresAt": claims.exp,
        "tools": list(claims.tools) if claims.tools is not None else None,
        "agentRunId": claims.agent_run_id,
    }


def status(gateway: Gateway) -> dict[str, Any]:
    exposure = gateway.exposure
    return {
        "server": gateway.config.server.name,
        "url": gateway.config.server.url,
        "ready": gateway.ready,
        "exposed": len(exposure.tools),
        "upstream": exposure.upstream_tool_count,
        "schemaTokens": {"exposed": exposure.exposed_tokens, "upstream": exposure.upstream_tokens},
        # Allowlisted tools the upstream does not list: the operator reports them on the
        # mapping as UnknownUpstreamTool (`name` is the upstream name the mapping used).
        "unknownTools": [
            {"mapping": t.mapping, "name": t.upstream_name, "exposedAs": t.name, "connection": t.connection}
            for t in exposure.missing
        ],
        "connections": {
            name: {
                "toolCount": None if listing.tools is None else len(listing.tools),
                "error": listing.error,
            }
            for name in gateway.config.connections
            for listing in [gateway.catalog.listing(name)]
        },
        "audit": gateway.audit.status(),
    }


_AUDIT_FILTERS = ("user", "tool", "connection", "outcome", "decision", "method")


def _time_param(value: str | None, name: str) -> int | None:
    """`30d`-style ages or RFC 3339 times, as epoch microseconds."""
    if value is None or value == "":
        return None
    try:
        return parse_time(value)
    except ValueError as exc:
        raise AdminError(400, "bad_request", f"`{name}`: {exc}", field=name) from None


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
        since_us=_time_param(params.get("since"), "since"), until_us=_time_param(params.get("until"), "until"),
        limit=int(limit_text), cursor=cursor,
    )


def audit_row(row: StoredEvent) -> dict[str, Any]:
    """One stored event as the API and `portcullis audit query --json` show it."""
    return {**row.event.to_dict(), "writer": row.writer, "seq": row.seq, "hash": row.hash}


def build_admin_app(gateway: Gateway, *, auth: AdminAuth, keys: Callable[[], SigningKeys]) -> Starlette:
    async def guarded(request: Request, action: str) -> str:
        try:
            caller = await auth.authorize(_bearer(request), action)
        except Exception as exc:  # the reviewer is unreachable: fail closed, and say so
            raise AdminError(503, "auth_unavailable", f"cannot check the caller right now ({type(exc).__name__}); try again") from None
        if caller is None:
            raise AdminError(401 if _bearer(request) is None else 403, "forbidden", f"not allowed to {action}")
        return caller

    async def tokens(request: Request) -> Response:
        try:
            await guarded(request, "mint")
            body = await _json_body(request)
            user = body.get("user")
            if isinstance(user, str) and user.strip():
                try:
                    missing, unreadable = await gateway.missing_connections(user)
                except VaultUnavailable as exc:
                    raise AdminError(503, "vault_unavailable", f"{exc}; try again") from None
                if missing or unreadable:
                    parts = []
                    if missing:
                        parts.append(f"has not connected {', '.join(missing)}: connect them first")
                    if unreadable:
                        parts.append(f"has a stored credential for {', '.join(unreadable)} that no longer opens: reconnect them")
                    raise AdminError(
                        409, "connections_missing", f"user {user!r} " + "; ".join(parts), missing=missing, unreadable=unreadable
                    )
            return JSONResponse(mint(gateway, keys(), body), status_code=201)
        except AdminError as exc:
            return _fail(exc)

    async def revocations(request: Request) -> Response:
        try:
            await guarded(request, "revoke")
            body = await _json_body(request)
            if isinstance(body.get("jti"), str):
                expires = body.get("expiresAt")
                expires_at = int(expires) if isinstance(expires, int) else int(time.time()) + gateway.config.tokens.max_ttl_seconds
                await gateway.revocations.revoke_token(body["jti"], expires_at)
                return JSONResponse({"revoked": {"jti": body["jti"]}})
            if isinstance(body.get("user"), str):
                at = round(time.time(), 3)
                await gateway.revocations.revoke_user(body["user"], at)
                return JSONResponse({"revoked": {"user": body["user"], "issuedAtOrBefore": at}})
            raise AdminError(400, "bad_request", "give `jti` or `user`")
        except AdminError as exc:
            return _fail(exc)

    async def credential(request: Request) -> Response:
        user = request.path_params["user"]
        connection = request.path_params["connection"]
        try:
            await guarded(request, "credentials")
            tenant = gateway.config.tenant
            if request.method == "DELETE":
                existed = await gateway.vault.delete(tenant, user, connection)
                return Response(status_code=204 if existed else 404)
            body = await _json_body(request)
            secret = body.get("secret")
            if not isinstance(secret, str) or not secret:
                raise AdminError(400, "bad_request", "`secret` (a non-empty string) is required")
            await gateway.vault.put(tenant, user, connection, secret)
            return Response(status_code=204)
        except AdminError as exc:
            return _fail(exc)

    async def audit_query(request: Request) -> Response:
        try:
            await guarded(request, "audit")
            query = audit_query_from(request.query_params, server=gateway.audit.server)
            page = await gateway.audit.query(query)
            return JSONResponse(
                {"events": [audit_row(row) for row in page.events], "nextCursor": page.next_cursor}
            )
        except AdminError as exc:
            return _fail(exc)
        except LookupError as exc:
            return _fail(AdminError(404, "no_audit_store", str(exc)))
        except AuditStoreError as exc:
            return _fail(AdminError(503, "audit_store_unavailable", str(exc)))

    async def audit_verify(request: Request) -> Response:
        try:
            await guarded(request, "audit")
            params = request.query_params
            since = _time_param(params.get("since"), "since")
            until = _time_param(params.get("until"), "until")
            report = await gateway.audit.verify(since, until)
            return JSONResponse({"server": gateway.audit.server, **report.to_dict()})
        except AdminError as exc:
            return _fail(exc)
        except LookupError as exc:
            return _fail(AdminError(404, "no_audit_store", str(exc)))
        except AuditStoreError as exc:
            return _fail(AdminError(503, "audit_store_unavailable", str(exc)))

    async def get_status(request: Request) -> Response:
        # Counts and names only, no secrets: open to the operator and to probes.
        return JSONResponse(status(gateway))

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/v1/tokens", tokens, methods=["POST"]),
            Route("/v1/revocations", revocations, methods=["POST"]),
            Route("/v1/users/{user}/connections/{connection}", credential, methods=["PUT", "DELETE"]),
            Route("/v1/status", get_status, methods=["GET"]),
            Route("/v1/audit", audit_query, methods=["GET"]),
            Route("/v1/audit/verify", audit_verify, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/healthz", lambda request: JSONResponse({"status": "ok"})),
        ]
    )
