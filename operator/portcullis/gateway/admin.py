"""The admin API: minting, revocation, credentials and status, on its own port.

It is never the agent's port: an agent holds only a session token, and that
token opens nothing here. Callers authenticate with an `AdminAuth`: a client
secret locally, ServiceAccount tokens checked by TokenReview and a
SubjectAccessReview for the verb `mint` in a cluster.

    POST   /v1/tokens                                   mint a session token
    POST   /v1/revocations                              revoke by jti or by user
    GET    /v1/users/{user}/connections                 what the user has connected, and how (never a value)
    PUT    /v1/users/{user}/connections/{connection}    store a user's credential (sealed)
    DELETE /v1/users/{user}/connections/{connection}    forget it (cuts access at the next call)
    POST   /v1/users/{user}/connections/{connection}/authorize
                                                        a connect link for an OAuth connection (oauth/flow.py)
    GET    /v1/approvals                                calls waiting for a person's approval (tool, arguments)
    POST   /v1/approvals/{id}                           approve or deny one ({"decision": "approve" | "deny"})
    GET    /v1/status                                   tool counts, schema tokens, readiness, audit queue
    GET    /v1/audit                                    query the audit log (filters, cursor paging)
    GET    /v1/audit/verify                             verify the hash chains of a time range
    GET    /metrics                                     Prometheus
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from portcullis.api.durations import format_duration, parse_duration
from portcullis.gateway import admin_input as check
from portcullis.gateway.admin_input import AdminError, audit_query_from, audit_row
from portcullis.gateway.identity.admission import AdminAuth
from portcullis.gateway.oauth.pages import connect_routes
from portcullis.gateway.audit.store import AuditStoreError
from portcullis.gateway.core import Gateway
from portcullis.gateway.credentials import VaultUnavailable
from portcullis.gateway.oauth.flow import FlowError, Unavailable
from portcullis.gateway.identity.tokens import ACCESS_LEVELS, SigningKeys, mint_token

log = logging.getLogger("portcullis.admin")



def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def mint(gateway: Gateway, keys: SigningKeys, body: dict[str, Any]) -> dict[str, Any]:
    """Validate a mint request against the server's policy and sign the token (no I/O)."""
    user = check.user_id(body.get("user"))
    policy = gateway.config.tokens
    ttl_text = body.get("ttl")
    try:
        ttl = policy.default_ttl_seconds if ttl_text is None else parse_duration(str(ttl_text))
    except ValueError as exc:
        raise AdminError(400, "bad_ttl", str(exc), field="ttl") from None
    if ttl <= 0:
        raise AdminError(400, "bad_ttl", "ttl must be positive", field="ttl")
    if ttl > policy.max_ttl_seconds:
        raise AdminError(
            400,
            "ttl_too_long",
            f"ttl {format_duration(ttl)} exceeds this server's sessionTokens.maxTTL ({format_duration(policy.max_ttl_seconds)})",
            field="ttl",
        )
    tools = body.get("tools")
    scope: tuple[str, ...] | None = None
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
            raise check.bad("tools", "`tools` must be a list of tool names")
        exposed = {t.name for t in gateway.config.tools}
        unknown = sorted(set(tools) - exposed)
        if unknown:
            raise AdminError(
                400, "unknown_tools", f"not exposed by this server: {', '.join(unknown)}", unknown=unknown, field="tools"
            )
        scope = tuple(sorted(set(tools)))
    run = check.run_id(body.get("agentRunId"))
    access = body.get("access")
    if access is not None and access not in ACCESS_LEVELS:
        raise check.bad("access", f"`access` is {', '.join(map(repr, ACCESS_LEVELS))} or absent (full access)")
    token, claims = mint_token(
        keys,
        issuer=gateway.config.server.issuer,
        audience=gateway.config.server.url,
        user=user,
        tenant=gateway.config.tenant,
        ttl_seconds=ttl,
        tools=scope,
        agent_run_id=run,
        access=access,
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
        "access": claims.access,
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
                "state": listing.state,
                "url": gateway.config.connections[name].url,
                "toolCount": None if listing.tools is None else len(listing.tools),
                "error": listing.error,
            }
            for name in gateway.config.connections
            for listing in [gateway.catalog.listing(name)]
        },
        "audit": gateway.audit.status(),
        "limits": gateway.policy.status(),
        # Each background loop (catalog refresher, change streams, cluster watches): failing
        # since when, with what (safe text), how many times in a row.
        "loops": gateway.background.status(),
    }


Handler = Callable[[Request], Awaitable[Response]]


def answered(handler: Handler) -> Handler:
    """One place that turns every failure of a handler into a JSON answer.

    AdminError is the handler's own answer; a failing audit store is 503; anything else is
    a bug or an outage nobody named, answered 500 with an id that finds the log line.
    """

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except AdminError as exc:
            return _fail(exc)
        except AuditStoreError as exc:
            return _fail(AdminError(503, "audit_store_unavailable", str(exc)))
        except Exception as exc:
            incident = secrets.token_hex(8)
            log.exception("admin %s %s failed (incident %s)", request.method, request.url.path, incident)
            return _fail(AdminError(500, "internal", f"the gateway failed ({type(exc).__name__}); incident {incident} is in its log"))

    return run


def _fail(exc: AdminError) -> JSONResponse:
    return JSONResponse({"error": exc.error, "message": exc.message, **exc.extra}, status_code=exc.status)


async def _metrics(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def build_metrics_app() -> Starlette:
    """The metrics port: Prometheus and a health answer, nothing that mints, revokes or reads the log.

    Scrapers are let in widely (a NetworkPolicy's metricsFrom, a ServiceMonitor); the admin API
    stays on its own port, which only the callers allowed to mint need to reach.
    """
    return Starlette(
        routes=[Route("/metrics", _metrics, methods=["GET"]), Route("/healthz", lambda request: JSONResponse({"status": "ok"}))]
    )


def build_admin_app(
    gateway: Gateway, *, auth: AdminAuth, keys: Callable[[], SigningKeys], with_callback: bool = False
) -> Starlette:
    """The admin API; `with_callback` also serves the OAuth callback (`portcullis serve`, on loopback)."""
    async def guarded(request: Request, action: str) -> str:
        try:
            caller = await auth.authorize(_bearer(request), action)
        except Exception as exc:  # the reviewer is unreachable: fail closed, and say so
            raise AdminError(503, "auth_unavailable", f"cannot check the caller right now ({type(exc).__name__}); try again") from None
        if caller is None:
            raise AdminError(401 if _bearer(request) is None else 403, "forbidden", f"not allowed to {action}")
        return caller

    async def tokens(request: Request) -> Response:
        await guarded(request, "mint")
        body = await check.json_body(request, {"user", "ttl", "tools", "agentRunId", "access"})
        user = check.user_id(body.get("user"))
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
            raise AdminError(409, "connections_missing", f"user {user!r} " + "; ".join(parts), missing=missing, unreadable=unreadable)
        return JSONResponse(mint(gateway, keys(), body), status_code=201)

    async def revocations(request: Request) -> Response:
        await guarded(request, "revoke")
        body = await check.json_body(request, {"jti", "expiresAt", "user"})
        if ("jti" in body) == ("user" in body):
            raise check.bad("jti", "give exactly one of `jti` (one token) or `user` (every token of that user)")
        if "jti" in body:
            token_id = check.jti(body["jti"])
            default = int(time.time()) + gateway.config.tokens.max_ttl_seconds
            await gateway.revocations.revoke_token(token_id, check.expires_at(body.get("expiresAt"), default))
            return JSONResponse({"revoked": {"jti": token_id}})
        if "expiresAt" in body:
            raise check.bad("expiresAt", "`expiresAt` goes with `jti`, not with `user`")
        user = check.user_id(body["user"])
        at = round(time.time(), 3)
        await gateway.revocations.revoke_user(user, at)
        return JSONResponse({"revoked": {"user": user, "issuedAtOrBefore": at}})

    async def credential(request: Request) -> Response:
        await guarded(request, "credentials")
        user = check.user_id(request.path_params["user"])
        connection = check.connection_name(request.path_params["connection"], gateway.config.user_connections())
        tenant = gateway.config.tenant
        if request.method == "DELETE":
            existed = await gateway.vault.delete(tenant, user, connection)
            if not existed:
                raise AdminError(404, "not_found", f"{user!r} has no stored credential for {connection!r}")
            return Response(status_code=204)
        if gateway.config.connections[connection].credential.source == "oauth":
            raise AdminError(
                409, "oauth_connection",
                f"users connect {connection!r} with OAuth, not a stored secret: "
                f"POST /v1/users/{{user}}/connections/{connection}/authorize for a connect link",
                field="connection",
            )
        body = await check.json_body(request, {"secret"})
        await gateway.vault.put(tenant, user, connection, check.secret(body.get("secret")))
        return Response(status_code=204)

    async def connections(request: Request) -> Response:
        await guarded(request, "credentials")
        user = check.user_id(request.path_params["user"])
        try:
            described = await gateway.credentials.describe(user)
        except VaultUnavailable as exc:
            raise AdminError(503, "vault_unavailable", f"{exc}; try again") from None
        return JSONResponse({"user": user, "connections": described})

    async def authorize(request: Request) -> Response:
        await guarded(request, "credentials")
        user = check.user_id(request.path_params["user"])
        connection = check.connection_name(request.path_params["connection"], gateway.config.user_connections())
        await check.json_body(request, ())
        try:
            link = await gateway.credentials.oauth.authorize(user, connection)
        except FlowError as exc:
            raise AdminError(exc.status, exc.error, str(exc), field="connection") from None
        except Unavailable as exc:
            raise AdminError(502, "authorization_server_unavailable", f"{exc}; try again") from None
        return JSONResponse(
            {
                "user": user,
                "connection": connection,
                "authorizationUrl": link.authorization_url,
                "redirectUri": link.redirect_uri,
                "expiresAt": int(link.expires_at),
            },
            status_code=201,
        )

    async def approvals_list(request: Request) -> Response:
        await guarded(request, "approve")
        store = await gateway.policy.approvals()
        return JSONResponse({"approvals": [a.to_dict() for a in await store.pending()], "shared": gateway.policy.status()["shared"]})

    async def approval_decide(request: Request) -> Response:
        approver = await guarded(request, "approve")
        approval_id = request.path_params["approval"]
        body = await check.json_body(request, {"decision"})
        decision = body.get("decision")
        if decision not in ("approve", "deny"):
            raise check.bad("decision", "`decision` is \"approve\" or \"deny\"")
        store = await gateway.policy.approvals()
        decided = await store.decide(approval_id, decision == "approve", approver)
        if decided is None:
            known = await store.get(approval_id)
            if known is None:
                where = "" if gateway.policy.status()["shared"] else " on this replica (spec.limits.store: replica keeps approvals per replica)"
                raise AdminError(404, "not_found", f"no approval {approval_id!r}{where}")
            state = "expired" if known.state == "pending" else known.state
            raise AdminError(409, "already_decided", f"approval {approval_id!r} is {state}; nothing to decide")
        log.info("approval %s of %s for a user %s by %s", decided.id, decided.tool, decided.state, approver)
        return JSONResponse(decided.to_dict())

    async def audit_query(request: Request) -> Response:
        await guarded(request, "audit")
        query = audit_query_from(request.query_params, server=gateway.audit.server)
        try:
            page = await gateway.audit.query(query)
        except LookupError as exc:
            raise AdminError(404, "no_audit_store", str(exc)) from None
        return JSONResponse({"events": [audit_row(row) for row in page.events], "nextCursor": page.next_cursor})

    async def audit_verify(request: Request) -> Response:
        await guarded(request, "audit")
        params = request.query_params
        unknown = sorted(set(params) - {"since", "until"})
        if unknown:
            raise check.bad(unknown[0], f"unknown query parameter `{unknown[0]}` (this call takes `since` and `until`)")
        since = check.time_param(params.get("since"), "since")
        until = check.time_param(params.get("until"), "until")
        try:
            report = await gateway.audit.verify(since, until)
        except LookupError as exc:
            raise AdminError(404, "no_audit_store", str(exc)) from None
        return JSONResponse({"server": gateway.audit.server, **report.to_dict()})

    async def get_status(request: Request) -> Response:
        # Counts and names only, no secrets: open to the operator and to probes.
        return JSONResponse(status(gateway))

    return Starlette(
        routes=[
            Route("/v1/tokens", answered(tokens), methods=["POST"]),
            Route("/v1/revocations", answered(revocations), methods=["POST"]),
            Route("/v1/users/{user}/connections", answered(connections), methods=["GET"]),
            Route("/v1/users/{user}/connections/{connection}", answered(credential), methods=["PUT", "DELETE"]),
            Route("/v1/users/{user}/connections/{connection}/authorize", answered(authorize), methods=["POST"]),
            *(connect_routes(gateway.credentials.oauth) if with_callback else ()),
            Route("/v1/approvals", answered(approvals_list), methods=["GET"]),
            Route("/v1/approvals/{approval}", answered(approval_decide), methods=["POST"]),
            Route("/v1/status", answered(get_status), methods=["GET"]),
            Route("/v1/audit", answered(audit_query), methods=["GET"]),
            Route("/v1/audit/verify", answered(audit_verify), methods=["GET"]),
            Route("/metrics", _metrics, methods=["GET"]),
            Route("/healthz", lambda request: JSONResponse({"status": "ok"})),
        ]
    )
