"""The agent-facing MCP endpoint: Streamable HTTP at `/mcp`, both protocol eras.

The SDK's low-level `Server` owns the protocol (handshake, both eras, envelope
and header validation, error mapping); this module plugs the gateway core into
its handlers. It runs stateless, so any replica answers any request and a load
balancer needs no sticky routing. Session-era clients do get an `Mcp-Session-Id`,
but it is a signed record of the session, not a key into any replica's memory
(sessions.py), and it is checked here, in front of the SDK.

Authentication is an ASGI layer in front of the SDK app rather than the SDK's
OAuth settings: Portcullis is its own token issuer (session tokens minted on
the admin port), so there is no authorization server to advertise, only the
RFC 9728 protected-resource document and the `WWW-Authenticate` hint.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import anyio
import mcp_types as types
from mcp.server.connection import allowed_log_levels
from mcp_types import CLIENT_CAPABILITIES_META_KEY
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from mcp.server.lowlevel import Server
from mcp.server.transport_security import TransportSecuritySettings
from mcp.server.subscriptions import (
    InMemorySubscriptionBus,
    ListenHandler,
    PromptsListChanged,
    ResourcesListChanged,
    ToolsListChanged,
)
from mcp.shared.exceptions import MCPError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from portcullis import __version__
from portcullis.gateway import paging, tracing
from portcullis.gateway.audit import Reason
from portcullis.gateway.core import INTERNAL_ERROR, INVALID_PARAMS, Gateway, RPCError, Unauthenticated, complete_tool_result, incident
from portcullis.gateway.fastpath import FastToolCall, is_candidate, replay
from portcullis.gateway.bridge import Bridge
from portcullis.gateway.inflight import InFlight
from portcullis.gateway.session_ids import SessionIds
from portcullis.gateway.sessions import AgentSessions, announce_session_features, current_session, header
from portcullis.gateway.tasks import TASK_METHODS, TASKS_CAPABILITY, Tasks
from portcullis.gateway.upstream import NotRelayable, call_events, can_be_asked
from portcullis.gateway.identity.oidc import Forbidden
from portcullis.gateway.identity.tokens import SessionClaims

log = logging.getLogger("portcullis.gateway")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
MCP_PATH = "/mcp"
RESOURCE_METADATA_PATH = "/.well-known/oauth-protected-resource"

current_claims: contextvars.ContextVar[SessionClaims | None] = contextvars.ContextVar(
    "portcullis_claims", default=None
)


def _claims() -> SessionClaims:
    claims = current_claims.get()
    if claims is None:  # the auth layer runs before every /mcp request; this is a wiring bug
        raise MCPError(-32603, "request reached the MCP server without authentication")
    return claims


def _raise(exc: RPCError) -> MCPError:
    return MCPError(exc.code, exc.message, exc.data)


_RELAYED_PARAMS = {"meta", "input_responses", "request_state"}


def _relayed(params: types.CallToolRequestParams | types.GetPromptRequestParams) -> dict[str, Any] | None:
    """What the upstream needs of the agent's request besides name and arguments.

    `_meta` carries the progress token and, on 2026-07-28, the client's capabilities
    and log level; `inputResponses` and `requestState` are a multi-round-trip retry
    (SEP-2322): answers to the upstream's own input requests and the state it sealed.
    """
    if params.meta is None and params.input_responses is None and params.request_state is None:
        return None
    return params.model_dump(by_alias=True, mode="json", exclude_none=True, include=_RELAYED_PARAMS)


class _CallRelay:
    """An upstream's notifications for one agent request, passed on to that agent (`CallEvents`).

    Progress goes only to an agent that asked for it (a progress token), under the
    agent's own token. Log messages ride the request's own stream, at the levels the
    protocol allows (the SDK's `allowed_log_levels`): on 2026-07-28 only at or above
    the level the agent opted in to in `_meta` (forwarded upstream too), on the
    session era all of them.
    """

    __slots__ = ("_ctx", "_log_levels", "_progress", "agent_session", "capabilities", "era", "log_level")

    def __init__(self, ctx: Any, meta: Any):
        self._ctx = ctx
        self._log_levels = allowed_log_levels(ctx.protocol_version, ctx.meta)
        # A session-era agent gets every level unasked, so a 2026-07-28 upstream is asked for all of them.
        modern = ctx.protocol_version in MODERN_PROTOCOL_VERSIONS
        self.log_level = None if modern else "debug"
        self.era = "modern" if modern else "session"
        # A 2026-07-28 agent's capabilities travel in its own `_meta`; a session-era agent served
        # here declared nothing an upstream could ask (those are served by session_calls.py).
        session = current_session.get()
        self.agent_session = session.id if session is not None else None
        self.capabilities = session.capabilities if session is not None else {}
        self._progress = meta is not None and (meta.get("progress_token") is not None or meta.get("progressToken") is not None)

    async def progress(self, params: dict[str, Any]) -> None:
        progress = params.get("progress")
        if self._progress and isinstance(progress, (int, float)):
            total = params.get("total")
            message = params.get("message")
            await self._ctx.session.report_progress(
                float(progress),
                float(total) if isinstance(total, (int, float)) else None,
                message if isinstance(message, str) else None,
            )

    async def log(self, params: dict[str, Any]) -> None:
        level = params.get("level")
        if level in self._log_levels and "data" in params:
            # Sent as a plain notification: the SDK's `send_log_message` applies the same
            # rule but warns on every call that logging is deprecated in 2026-07-28 (SEP-2577).
            logger = params.get("logger")
            notice = types.LoggingMessageNotification(
                params=types.LoggingMessageNotificationParams(
                    level=level, data=params["data"], logger=logger if isinstance(logger, str) else None
                )
            )
            await self._ctx.session.send_notification(notice, related_request_id=self._ctx.request_id)

    async def ask(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        raise NotRelayable(method)  # 2026-07-28 agents are asked in results (inputRequests), never mid-stream


def _refuse_if_cancelled(cancellable: anyio.CancelScope) -> None:
    if cancellable.cancelled_caught:  # audited as cancelled; the client has stopped listening for this answer
        raise MCPError(INTERNAL_ERROR, "The request was cancelled by the client.")


def _announce_list_changes(result: dict[str, Any]) -> None:
    """The gateway tells of changes to its tool, prompt and resource lists, in both eras
    (`subscriptions/listen`; a session's GET stream, sessions.py): say so in its capabilities."""
    capabilities = result.get("capabilities")
    if isinstance(capabilities, dict):
        for kind in ("tools", "prompts", "resources"):
            if isinstance(capabilities.get(kind), dict):
                capabilities[kind] = {**capabilities[kind], "listChanged": True}


def _bridged(ctx: Any, params: types.CallToolRequestParams, gateway: Gateway) -> bool:
    """Does this first call go through the bridge: a 2026-07-28 agent that can be asked things,
    calling a tool whose upstream asks mid-call (the session protocol) or that needs an approval?"""
    if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS or params.request_state is not None:
        return False
    capabilities = (params.meta or {}).get(CLIENT_CAPABILITIES_META_KEY)
    return can_be_asked(capabilities) and gateway.asks_mid_call(params.name)


def build_mcp_server(gateway: Gateway, inflight: InFlight | None = None, bridge: Bridge | None = None) -> Server[Any]:
    # 2026-07-28 clients learn of allowlist changes on a `subscriptions/listen` stream.
    # Each replica watches the config itself and publishes its own change, so an
    # in-process bus is enough: no event has to cross replicas.
    bus = InMemorySubscriptionBus()
    inflight = inflight if inflight is not None else InFlight()

    def tools_changed() -> None:
        gateway.background.spawn(bus.publish(ToolsListChanged()), name="publish-tools-changed")

    gateway.on_tools_changed(tools_changed)

    def list_changed(kind: str) -> None:
        event = PromptsListChanged() if kind == "prompts" else ResourcesListChanged()
        gateway.background.spawn(bus.publish(event), name=f"publish-{kind}-changed")

    gateway.on_list_changed(list_changed)

    # Tool results and lists are returned as plain dicts: the SDK validates and sieves
    # every result against the negotiated protocol version anyway, so building models
    # here would validate the same data twice on the hottest path.
    # Every list is the gateway's own, paged here (paging.py): the upstreams' cursors mean nothing to an agent.
    async def list_tools(ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        definitions, next_cursor = _page(await gateway.list_tools(_claims()), params)
        return types.ListToolsResult(tools=[types.Tool.model_validate(t) for t in definitions], next_cursor=next_cursor)

    @contextlib.contextmanager
    def serving(ctx: Any, meta: Any) -> Iterator[tuple[_CallRelay, anyio.CancelScope]]:
        """One request bound upstream: what the upstream sends on its stream relayed to the agent
        (progress, logs), and cancellable by the agent's `notifications/cancelled` (inflight.py)."""
        leg = _CallRelay(ctx, meta)
        reset = call_events.set(leg)
        try:
            with inflight.track(_claims().jti, ctx.request_id) as cancellable:
                yield leg, cancellable
        finally:
            call_events.reset(reset)

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> dict[str, Any]:
        # The agent's progress token and log level are forwarded upstream in `_meta`; the
        # upstream's progress and log messages come back on its SSE answer and are passed on here.
        claims = _claims()
        try:
            with serving(ctx, params.meta) as (leg, cancellable):
                if bridge is not None and ctx.protocol_version in MODERN_PROTOCOL_VERSIONS and bridge.ours(params.request_state):
                    # The answer to a question a session-protocol upstream asked mid-call (bridge.py).
                    responses = params.model_dump(by_alias=True, mode="json", exclude_none=True).get("inputResponses")
                    result = await bridge.resume(claims, params.name, str(params.request_state), responses, leg)
                elif bridge is not None and _bridged(ctx, params, gateway):
                    declared = (params.meta or {}).get(CLIENT_CAPABILITIES_META_KEY)
                    capabilities: dict[str, Any] = declared if isinstance(declared, dict) else {}
                    result = await bridge.start(claims, params.name, params.arguments, _relayed(params), capabilities, leg)
                else:
                    result = await gateway.call_tool(claims, params.name, params.arguments, _relayed(params))
        except RPCError as exc:
            raise _raise(exc) from None
        _refuse_if_cancelled(cancellable)
        return complete_tool_result(result)

    # Tasks (2025-11-25 only; tasks.py), for requests without a session id: a session's are served
    # by sessions.py. A task-augmented call is answered with a task, which the SDK's tools/call
    # result surface would refuse, so a middleware serves it before validation.
    tasks = Tasks(gateway, bridge.ids if bridge is not None else SessionIds(gateway.verifier.keys, lambda: gateway.config.server.url))

    async def task_call(params: dict[str, Any]) -> dict[str, Any]:
        try:
            return await tasks.call(_claims(), params)
        except RPCError as exc:
            raise _raise(exc) from None

    task_call = _no_internals(task_call)

    async def task_middleware(ctx: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
        params = ctx.params
        if ctx.method == "tools/call" and isinstance(params, dict) and params.get("task") is not None and _session_era(ctx):
            return await task_call(params)
        result = await call_next(ctx)
        if ctx.method in ("initialize", "server/discover") and isinstance(result, dict):
            _announce_list_changes(result)
        if ctx.method == "initialize" and isinstance(result, dict) and _session_era(ctx):
            announce_session_features(result)  # logging/setLevel, resources/subscribe: sessions.py
        if ctx.method == "initialize" and isinstance(result, dict) and result.get("protocolVersion") == TASKS_VERSION:
            capabilities = result.get("capabilities")
            if isinstance(capabilities, dict):
                result["capabilities"] = {**capabilities, "tasks": TASKS_CAPABILITY}
        return result

    def task_request(method: str) -> Callable[[Any, Any], Awaitable[dict[str, Any]]]:
        async def handle(ctx: Any, params: Any) -> dict[str, Any]:
            if not _session_era(ctx):
                raise MCPError(-32601, "Method not found", method)
            try:
                return await tasks.request(_claims(), method, params.model_dump(by_alias=True, mode="json", exclude_none=True))
            except RPCError as exc:
                raise _raise(exc) from None

        handle.__name__ = method.replace("/", "_")
        return handle

    async def list_tasks(ctx: Any, params: types.PaginatedRequestParams | None) -> dict[str, Any]:
        if not _session_era(ctx):
            raise MCPError(-32601, "Method not found", "tasks/list")
        try:
            return await tasks.list_page(_claims(), params.cursor if params is not None else None)
        except RPCError as exc:
            raise _raise(exc) from None

    async def cancelled(ctx: Any, params: types.CancelledNotificationParams) -> None:
        # A session-era client's notice (2026-07-28 clients close the stream instead): inflight.py.
        if params.request_id is not None:
            inflight.cancel(_claims().jti, params.request_id)

    async def list_prompts(ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListPromptsResult:
        prompts, next_cursor = _page(await gateway.list_prompts(_claims()), params)
        return types.ListPromptsResult(prompts=[types.Prompt.model_validate(p) for p in prompts], next_cursor=next_cursor)

    async def get_prompt(ctx: Any, params: types.GetPromptRequestParams) -> types.GetPromptResult | types.InputRequiredResult:
        try:
            with serving(ctx, params.meta) as (_, cancellable):
                result = await gateway.get_prompt(_claims(), params.name, params.arguments, _relayed(params))
        except RPCError as exc:
            raise _raise(exc) from None
        _refuse_if_cancelled(cancellable)
        if result.get("resultType") == "input_required":
            return types.InputRequiredResult.model_validate(result)
        return types.GetPromptResult.model_validate(result)

    async def list_resources(ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListResourcesResult:
        resources, next_cursor = _page(await gateway.list_resources(_claims()), params)
        return types.ListResourcesResult(resources=[types.Resource.model_validate(r) for r in resources], next_cursor=next_cursor)

    async def list_resource_templates(ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListResourceTemplatesResult:
        templates, next_cursor = _page(await gateway.list_resource_templates(_claims()), params)
        return types.ListResourceTemplatesResult(
            resource_templates=[types.ResourceTemplate.model_validate(t) for t in templates], next_cursor=next_cursor
        )

    async def read_resource(ctx: Any, params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        try:
            with serving(ctx, params.meta) as (_, cancellable):
                result = await gateway.read_resource(_claims(), str(params.uri))
        except RPCError as exc:
            raise _raise(exc) from None
        _refuse_if_cancelled(cancellable)
        return types.ReadResourceResult.model_validate(result)

    async def complete(ctx: Any, params: types.CompleteRequestParams) -> types.CompleteResult:
        wire = params.model_dump(by_alias=True, mode="json", exclude_none=True)
        relay = {"_meta": wire["_meta"]} if "_meta" in wire else None
        try:
            result = await gateway.complete(_claims(), wire["ref"], wire["argument"], wire.get("context"), relay)
        except RPCError as exc:
            raise _raise(exc) from None
        return types.CompleteResult.model_validate(result)

    server: Server[Any] = Server(
        f"portcullis/{gateway.config.server.namespace}/{gateway.config.server.name}",
        version=__version__,
        title=f"Portcullis virtual MCP server {gateway.config.server.name}",
        # Header validation on the modern wire asks for a tool's schema; answer from
        # memory instead of re-running tools/list (an upstream round trip in a gateway).
        get_tool_input_schema=gateway.exposure_input_schema,
        on_list_prompts=_no_internals(list_prompts),
        on_get_prompt=_no_internals(get_prompt),
        on_list_resources=_no_internals(list_resources),
        on_read_resource=_no_internals(read_resource),
        on_list_resource_templates=_no_internals(list_resource_templates),
        on_completion=_no_internals(complete),
        on_subscriptions_listen=ListenHandler(bus),
    )
    # The SDK installs an OpenTelemetry middleware by default; Portcullis records calls in its
    # audit log and metrics instead, and the middleware costs a few percent of every call.
    server.middleware = [task_middleware]
    server.add_request_handler("tools/list", types.PaginatedRequestParams, _no_internals(list_tools))
    server.add_request_handler("tools/call", types.CallToolRequestParams, _no_internals(call_tool))
    params_types = {"tasks/get": types.GetTaskRequestParams, "tasks/result": types.GetTaskPayloadRequestParams,
                    "tasks/cancel": types.CancelTaskRequestParams}
    for method in TASK_METHODS:
        server.add_request_handler(method, params_types[method], _no_internals(task_request(method)))
    server.add_request_handler("tasks/list", types.PaginatedRequestParams, _no_internals(list_tasks))
    server.add_notification_handler("notifications/cancelled", types.CancelledNotificationParams, cancelled)
    return server


TASKS_VERSION = "2025-11-25"
"""The protocol version that has tasks (2026-07-28 moved them to an extension the SDK does not serve)."""


def _session_era(ctx: Any) -> bool:
    return ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])
Item = TypeVar("Item")


def _page(items: Sequence[Item], params: types.PaginatedRequestParams | None) -> tuple[Sequence[Item], str | None]:
    try:
        return paging.page(items, params.cursor if params is not None else None)
    except RPCError as exc:
        raise _raise(exc) from None


def _no_internals(handler: Handler) -> Handler:
    """The agent never sees an exception's text: on the session wire the SDK would send it as
    JSON-RPC error code 0. The call path already answers its own failures with a request id;
    this catches what escapes anything else (a listing, a bug), logs it, and answers -32603."""

    @functools.wraps(handler)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except MCPError:
            raise
        except Exception:
            raise _raise(incident(handler.__name__)) from None

    return guarded  # type: ignore[return-value]


class BearerAuth:
    """ASGI guard for `/mcp`: a valid, unrevoked session token for this server, or 401.

    The 401 carries RFC 6750's `WWW-Authenticate` with the RFC 9728
    `resource_metadata` hint. The token is never logged or echoed.
    """

    def __init__(
        self,
        app: ASGIApp,
        gateway: Gateway,
        metadata_url: str,
        allowed_origins: frozenset[str],
        fast: FastToolCall | None = None,
        sessions: AgentSessions | None = None,
    ):
        self.app = app
        self.fast = fast
        self.sessions = sessions
        self.gateway = gateway
        self.metadata_url = metadata_url
        self.allowed_origins = allowed_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(MCP_PATH):
            await self.app(scope, receive, send)
            return
        origin = header(scope, b"origin")
        if origin is not None and not _origin_allowed(origin, self.allowed_origins):
            # Streamable HTTP: servers MUST validate Origin (DNS rebinding). Host is not
            # checked: in-cluster Service names and proxies vary, and a page cannot
            # forge Origin. Non-browser clients send no Origin and pass.
            response = JSONResponse(
                {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": f"Origin {origin} is not allowed"}},
                status_code=403,
            )
            await response(scope, receive, send)
            return
        token = _bearer(scope)
        # The request span opens here, around authentication; tracing.py says why.
        with tracing.request(scope, self.gateway.audit.server):
            try:
                with tracing.span("authenticate"):
                    if self.gateway.config.oidc is None:
                        claims = self.gateway.authenticate(token)
                    else:
                        claims = await self.gateway.authenticate_any(token)
            except Forbidden as exc:
                tracing.refused(exc.reason, "denied")
                self.gateway.record_unauthenticated(exc.reason, header(scope, b"mcp-method"), outcome="denied")
                await _forbidden(exc, self.metadata_url)(scope, receive, send)
                return
            except Unauthenticated as exc:
                tracing.refused(str(exc), "unauthenticated")
                self.gateway.record_unauthenticated(str(exc), header(scope, b"mcp-method"))
                oidc = self.gateway.config.oidc
                issuer = oidc.issuer if oidc is not None else None
                await _unauthorized(str(exc), self.metadata_url, token is not None, issuer)(scope, receive, send)
                return
            except Exception as exc:  # the revocation or key store failed: fail closed, audited, no internals
                log.warning("authenticating a request failed: %s", type(exc).__name__)
                tracing.refused(Reason.AUTH_UNAVAILABLE, "error")
                self.gateway.record_unauthenticated(Reason.AUTH_UNAVAILABLE, header(scope, b"mcp-method"), outcome="error")
                response = JSONResponse(
                    {"jsonrpc": "2.0", "id": None, "error": {"code": -32603, "message": "cannot check the session token right now; try again"}},
                    status_code=503,
                    headers={"Retry-After": "1"},
                )
                await response(scope, receive, send)
                return
            candidate = is_candidate(scope)
            if scope["method"] == "POST":
                first = await receive()
                if not _utf8_json_start(first.get("body", b"")):
                    await _not_utf8(scope, receive, send)
                    return
                receive = replay(first, receive)
                if self.sessions is not None and candidate and (b'"requestState"' in first.get("body", b"") or first.get("more_body")):
                    # A retry may continue a call another replica holds (bridge.py): passed on there.
                    passed = await self.sessions.pass_on(scope, receive, send, claims)
                    if passed is None:
                        return
                    receive = passed
            reset = current_claims.set(claims)
            try:
                if self.fast is not None and candidate:
                    await self.fast(scope, receive, send, claims)
                elif self.sessions is not None and self.sessions.concerns(scope):
                    await self.sessions(scope, receive, send, claims, self.app)
                else:
                    await self.app(scope, receive, send)
            finally:
                current_claims.reset(reset)


# RFC 8259 §8.1: JSON exchanged between systems MUST be UTF-8, without a byte order mark.
# Python's json would guess UTF-16/32 from the bytes; the two MCP eras must refuse alike.
_BOMS = (b"\xef\xbb\xbf", b"\xfe\xff", b"\xff\xfe")


def _utf8_json_start(body: bytes) -> bool:
    head = body[:4]
    return not head.startswith(_BOMS) and b"\x00" not in head


async def _not_utf8(scope: Scope, receive: Receive, send: Send) -> None:
    error = {"code": -32700, "message": "Parse error: the request body must be UTF-8 JSON without a byte order mark"}
    await JSONResponse({"jsonrpc": "2.0", "id": None, "error": error}, status_code=400)(scope, receive, send)


_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def _origin_allowed(origin: str, allowed: frozenset[str]) -> bool:
    if origin in allowed:
        return True
    # A gateway on loopback (a laptop) accepts any loopback page, as the SDK does:
    # a DNS-rebinding attacker's page has a foreign Origin, never a loopback one.
    if any(_host_of(a) in _LOOPBACK_HOSTS for a in allowed):
        return _host_of(origin) in _LOOPBACK_HOSTS
    return False


# An origin is exactly scheme://host[:port] (RFC 6454): anything else is no host at all, so
# `http://[::1].evil.example` or `http://localhost@evil.example` never pass as loopback.
_ORIGIN = re.compile(r"(?i)https?://(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(:[0-9]{1,5})?/?")


def _host_of(origin: str) -> str:
    match = _ORIGIN.fullmatch(origin)
    return match.group(1).lower() if match else ""


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = bytes(value).decode("latin-1").partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


def _forbidden(exc: Forbidden, metadata_url: str) -> Response:
    """RFC 6750 3.1: an authentic token without what this server requires (a scope, a group)."""
    if exc.scope is not None:
        challenge = f'Bearer error="insufficient_scope", scope="{exc.scope}", error_description="{exc.reason}", resource_metadata="{metadata_url}"'
    else:
        challenge = f'Bearer error="insufficient_scope", error_description="{exc.reason}", resource_metadata="{metadata_url}"'
    body = {"error": "insufficient_scope", "error_description": exc.reason, "message": f"Signed in, but not allowed here: {exc.reason}."}
    return JSONResponse(body, status_code=403, headers={"WWW-Authenticate": challenge})


def _unauthorized(reason: str, metadata_url: str, had_token: bool, issuer: str | None = None) -> Response:
    # RFC 6750 §3: no error code when the request carried no credentials at all.
    challenge = f'Bearer resource_metadata="{metadata_url}"'
    if had_token:
        challenge = f'Bearer error="invalid_token", error_description="{reason}", resource_metadata="{metadata_url}"'
    how = (
        "Session tokens are short-lived and minted by your application for one user: mint a new one (POST "
        "/v1/tokens on the gateway's admin port, or `portcullis token mint --user <id>`) and send it as "
        "`Authorization: Bearer <token>`."
    )
    if issuer is not None:
        how = f"Sign in with {issuer} (an OAuth-capable MCP client does it from this server's resource metadata), or {how[0].lower()}{how[1:]}"
    body = {
        "error": "invalid_token" if had_token else "unauthorized",
        "error_description": reason,
        "message": f"The token was refused ({reason}). {how}",
    }
    return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": challenge})


NO_OAUTH = (
    "This virtual MCP server accepts session tokens minted by your application (POST /v1/tokens on its "
    "admin port) and runs no OAuth authorization server, so there is nothing to register with or log in to. "
    "Configure your MCP client with the header `Authorization: Bearer <session token>`."
)


def _no_authorization_server(gateway: Gateway) -> Callable[[Request], Awaitable[Response]]:
    """OAuth-aware clients (mcp-remote, the Inspector) look for an authorization server at the MCP
    server's origin when the resource metadata names none; say plainly why there is none, or
    (with `spec.auth.oidc`) where it is."""

    async def answer(request: Request) -> Response:
        status = 400 if request.url.path == "/register" else 404
        oidc = gateway.config.oidc
        text = NO_OAUTH if oidc is None else (
            f"This virtual MCP server's authorization server is {oidc.issuer} (named in its RFC 9728 resource "
            "metadata): register and log in there, not here."
        )
        return JSONResponse({"error": "invalid_client_metadata" if status == 400 else "not_found", "error_description": text}, status_code=status)

    return answer


def resource_metadata(gateway: Gateway) -> dict[str, Any]:
    """RFC 9728 protected-resource metadata for this server's MCP URL; with `spec.auth.oidc`, it
    names the company's issuer, where interactive clients log people in (MCP authorization spec)."""
    metadata: dict[str, Any] = {
        "resource": gateway.config.server.url,
        "bearer_methods_supported": ["header"],
        "resource_name": f"Portcullis virtual MCP server {gateway.config.server.namespace}/{gateway.config.server.name}",
        "resource_documentation": "https://portcullis.dev/docs/session-tokens",
    }
    oidc = gateway.config.oidc
    if oidc is not None:
        metadata["authorization_servers"] = [oidc.issuer]
        metadata["scopes_supported"] = list(oidc.required_scopes)
    return metadata


def build_app(
    gateway: Gateway,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    public_base: str | None = None,
    allowed_origins: frozenset[str] = frozenset(),
    fast_path: bool = True,
    replica_url: str = "",
) -> BearerAuth:
    """The ASGI app of the MCP port: /mcp, /healthz, /readyz and the RFC 9728 document.

    `replica_url` is this replica's MCP URL as the other replicas reach it, where they pass
    on an agent's answer to a request relayed from this one (relay.py); empty on one replica.
    """
    inflight = InFlight()
    ids = SessionIds(gateway.verifier.keys, lambda: gateway.config.server.url)
    bridge = Bridge(gateway, ids)
    bridge.replica_url = replica_url
    server = build_mcp_server(gateway, inflight, bridge)

    no_authorization_server = _no_authorization_server(gateway)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        # Failing background loops are named but do not fail the probe: the replica still
        # serves what it has. Only a loop that gates readiness and never synced does.
        loops = gateway.background
        failing = loops.failing()
        if gateway.ready:
            degraded = gateway.unreachable()
            return JSONResponse(
                {"status": "ready", **({"unreachable": degraded} if degraded else {}), **({"failingLoops": failing} if failing else {})}
            )
        if gateway.nothing_to_serve():
            unreachable = [
                {"connection": n, "url": gateway.config.connections[n].url, "error": gateway.catalog.listing(n).error}
                for n in gateway.unreachable()
            ]
            return JSONResponse(
                {"status": "no tool to serve: every connection offering the allowlisted tools is unreachable",
                 "unreachable": unreachable},
                status_code=503,
            )
        pending = [n for n in gateway.config.connections if not gateway.catalog.listing(n).settled]
        unsynced = loops.unsynced()
        body: dict[str, Any] = {
            "status": "waiting for upstream tool lists" if pending or not unsynced else f"waiting for {', '.join(unsynced)}",
            "pending": pending,
        }
        if unsynced:
            body["unsynced"] = unsynced
        if failing:
            body["failingLoops"] = failing
        return JSONResponse(body, status_code=503)

    async def metadata(request: Request) -> Response:
        return Response(json.dumps(resource_metadata(gateway)), media_type="application/json")

    app = server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        # SSE where the answer needs a stream (progress); a call that emits nothing is still
        # answered as plain JSON on the 2026-07-28 wire. Plain modern tools/call takes the short path.
        json_response=False,
        stateless_http=True,
        max_request_body_size=max_body_bytes,
        # Every /mcp request must carry a bearer token, which a DNS-rebinding page cannot
        # obtain; Host checks would only break in-cluster Service names and proxies.
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        custom_starlette_routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route(RESOURCE_METADATA_PATH + MCP_PATH, metadata),
            Route(RESOURCE_METADATA_PATH, metadata),
            Route("/.well-known/oauth-authorization-server", no_authorization_server),
            Route("/.well-known/oauth-authorization-server" + MCP_PATH, no_authorization_server),
            Route("/.well-known/openid-configuration", no_authorization_server),
            Route("/register", no_authorization_server, methods=["POST", "GET"]),
        ],
    )
    base = (public_base or _origin(gateway.config.server.url)).rstrip("/")
    origins = allowed_origins | {base}
    fast = FastToolCall(gateway, app, server.server_info_stamp, max_body_bytes) if fast_path else None
    sessions = AgentSessions(gateway, inflight, max_body_bytes, replica_url=replica_url, ids=ids)
    return BearerAuth(app, gateway, base + RESOURCE_METADATA_PATH + MCP_PATH, origins, fast, sessions)


def _origin(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"

