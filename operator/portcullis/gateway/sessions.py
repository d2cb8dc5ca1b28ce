"""The session protocol's sessions (2025-11-25 and older), with no state in any replica.

The SDK serves that era statelessly, so any replica answers any request. What a
session adds is kept in the session id itself (session_ids.py): who opened it
and what its client declared at `initialize`. This layer, in front of the SDK
for session-era requests only:

- issues the id on a successful `initialize` (the `Mcp-Session-Id` header);
- checks it on every later request: one this server did not sign is 404 (the
  client starts a new session), one opened by another user is 403;
- serves what needs it: a `tools/call` whose client can be asked things
  (session_calls.py), the agent's answers to those questions (relay.py), and
  the session's standalone GET stream, which carries list-change notices;
- serves what is frequent and cheap to answer here, each a whole server's work
  in the SDK's stateless transport: every plain `tools/call`, `tools/list`,
  `ping`, `notifications/initialized` and `notifications/cancelled`, and
  `initialize` and a stateless DELETE from the SDK's first answer to them
  (replayed.py). A client that opens a session per tool call (LangChain's
  default) sends all of these for each call.

The session's upstream sessions are opened at `initialize` and ride in its id,
sealed, so that they are the same on every replica (upstream_sessions.py). So
this layer also serves `logging/setLevel` and `resources/subscribe` /
`unsubscribe` (on those upstream sessions), holds their GET streams beside the
agent's, and answers DELETE by ending them. The gateway's own session id is not
revoked by DELETE (that would take state): it stays valid until it expires, and
a session with no upstream session to end is answered 405, as the protocol
allows a server that does not let clients end sessions.

A request without a session id is served as before, statelessly; 2026-07-28
requests never come here.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
from typing import Any, Final

from mcp_types import methods as _methods
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from portcullis.gateway.core import INVALID_PARAMS, Gateway, RPCError
from portcullis.gateway.inflight import InFlight
from portcullis.gateway import jsonwire, paging
from portcullis.gateway.relay import Relay
from portcullis.gateway.fastpath import replay
from portcullis.gateway.replayed import Replayed, initialize_request
from portcullis.gateway.session_calls import SSE_HEADERS, SessionToolCall, answer_on_stream, plain_call
from portcullis.gateway.session_ids import RELAY_PREFIX, AgentSession, SessionIds, UpstreamSession, carries
from portcullis.gateway.tasks import TASK_REQUESTS, Tasks
from portcullis.gateway.identity.tokens import SessionClaims, TokenError
from portcullis.gateway.upstream import agent_upstreams
from portcullis.gateway.upstream_sessions import LOG_LEVELS, UpstreamSessions

log = logging.getLogger("portcullis.gateway")

current_session: contextvars.ContextVar[AgentSession | None] = contextvars.ContextVar("portcullis_session", default=None)
"""The session of the request being served, for the SDK's handlers (set around the SDK app)."""

SESSION_HEADER: Final = b"mcp-session-id"
MAX_STREAMS: Final = 10_000
"""Standalone GET streams open at once on one replica; more are refused with 503."""
_STREAM_QUEUE: Final = 64  # messages waiting for a slow stream; more notices are dropped (level triggers), relayed ones wait
_KEEPALIVE_SECONDS: Final = 25.0
_MODERN: Final = b"2026-07-28"
SESSION_METHODS: Final = frozenset({"logging/setLevel", "resources/subscribe", "resources/unsubscribe"})
"""Requests that change a session after it opened: served here, on the session's upstream sessions."""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": message}}, status_code=status)


class AgentSessions:
    def __init__(
        self, gateway: Gateway, inflight: InFlight, max_body_bytes: int, *, replica_url: str = "", ids: SessionIds | None = None
    ):
        self.ids = ids or SessionIds(gateway.verifier.keys, lambda: gateway.config.server.url)
        self.relay = Relay(self.ids, lambda: gateway.http)
        self.relay.replica_url = replica_url
        self.calls = SessionToolCall(gateway, self.relay, inflight)
        self.inflight = inflight
        self.replayed = Replayed(lambda: gateway.config)
        self.served = 0
        """Listings, pings and notices answered here rather than by the SDK (tests use it to know which path ran)."""
        self.tasks = Tasks(gateway, self.ids)
        self.upstreams = UpstreamSessions(gateway, self.relay, self.tasks.status)
        self.gateway = gateway
        self.max_body_bytes = max_body_bytes
        self._streams: set[asyncio.Queue[str]] = set()
        gateway.on_tools_changed(lambda: self._notice("notifications/tools/list_changed"))
        gateway.on_list_changed(lambda kind: self._notice(f"notifications/{kind}/list_changed"))

    async def pass_on(self, scope: Scope, receive: Receive, send: Send, claims: SessionClaims) -> Receive | None:
        """A 2026-07-28 retry whose `requestState` names another replica (bridge.py) is passed on
        there, and None returned; anything else comes back to be served here (its body replayed)."""
        body, complete = await _read_upto(receive, self.max_body_bytes)
        replayed = replay({"type": "http.request", "body": body, "more_body": not complete}, receive)
        if not complete or RELAY_PREFIX.encode() not in body:
            return replayed
        message = _json(body)
        params = message.get("params") if isinstance(message, dict) else None
        state = params.get("requestState") if isinstance(params, dict) else None
        if not isinstance(state, str) or not state.startswith(RELAY_PREFIX):
            return replayed
        status, where = self.relay.route(claims, {"id": state}, deliver=False)
        if status != 0:
            return replayed  # here, or refused here by the call path with the error it gives
        status, reply, content_type = await self.relay.forward(where, scope["headers"], body, long=True)
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type.encode("latin-1"))]})
        await send({"type": "http.response.body", "body": reply})
        return None

    @staticmethod
    def concerns(scope: Scope) -> bool:
        """Is this a session-era request (no 2026-07-28 version header)? Cheap: headers only."""
        for name, value in scope["headers"]:
            if name == b"mcp-protocol-version" and value == _MODERN:
                return False
        return scope["method"] in ("POST", "GET", "DELETE")

    async def __call__(self, scope: Scope, receive: Receive, send: Send, claims: SessionClaims, app: ASGIApp) -> None:
        session: AgentSession | None = None
        presented = header(scope, SESSION_HEADER)
        if presented is not None:
            try:
                session = self.ids.open_session(presented)
            except TokenError:
                await _error(404, "Session not found: start a new session (initialize)")(scope, receive, send)
                return
            if session.user != claims.sub:
                await _error(403, "This session was opened by another user: start a session of your own")(scope, receive, send)
                return
        carried = self.upstreams.carried(session) if session is not None else {}
        reset = agent_upstreams.set(carried)
        try:
            await self._serve(scope, receive, send, claims, app, session, carried)
        finally:
            agent_upstreams.reset(reset)

    async def _serve(
        self, scope: Scope, receive: Receive, send: Send, claims: SessionClaims, app: ASGIApp,
        session: AgentSession | None, carried: dict[str, str],
    ) -> None:
        if scope["method"] == "DELETE":
            if session is None:
                await app(scope, receive, send)
            elif not carried:  # nothing to end: the SDK's answer (405), the same every time (replayed.py)
                key = f"DELETE {header(scope, b'mcp-protocol-version')}"
                if not await self.replayed.replay(key, send):
                    await app(scope, receive, self.replayed.keeping(key, send))
            else:
                status = await self.upstreams.end(claims, carried)
                await send({"type": "http.response.start", "status": status, "headers": []})
                await send({"type": "http.response.body", "body": b""})
            return
        if scope["method"] == "GET":
            if session is None:
                await app(scope, receive, send)
            else:
                await self._standalone_stream(receive, send, claims, session, carried)
            return
        body, complete = await _read_upto(receive, self.max_body_bytes)
        receive = replay({"type": "http.request", "body": body, "more_body": not complete}, receive)
        # A session's requests are served here only at a version its era has (or none named): the SDK
        # answers any other 400, as the protocol asks of a server that does not support the version.
        version = header(scope, b"mcp-protocol-version")
        here = session if version is None or version in HANDSHAKE_PROTOCOL_VERSIONS else None
        # The body is decoded once, and only when something here may serve it; the rest is the SDK's.
        relayed = RELAY_PREFIX.encode() in body
        message = _json(body) if complete and (here is not None or relayed or b'"initialize"' in body) else None
        if not isinstance(message, dict):
            message = None
        if relayed and message is not None and "method" not in message and str(message.get("id", "")).startswith(RELAY_PREFIX):
            await self._answer(scope, receive, send, claims, message, body)
            return
        if here is not None and message is not None:
            if (request := plain_call(message)) is not None:
                # Every plain call of a session is answered here, whatever its client can be asked: the
                # SDK's stateless transport builds a server per request, 2-3 ms of CPU a call.
                await self.calls(send, claims, here, request)
                return
            if _listing_or_notice(message):
                await self._quick(send, claims, here, message)
                return
            if (request := _session_request(message)) is not None:
                # A change to the session (on its upstream sessions), or a task's request (tasks.py: on the
                # session's upstream session, where what the task asks reaches the agent on this stream).
                method, params = request["method"], request["params"]
                if method in SESSION_METHODS:
                    work = lambda: self._change(claims, carried, request)  # noqa: E731
                else:
                    work = lambda: self.tasks.serve(claims, method, params)  # noqa: E731
                meta = params.get("_meta")
                progress_token = meta.get("progressToken") if isinstance(meta, dict) else None
                await answer_on_stream(send, self.relay, claims, here, request["id"], work, progress_token)
                return
        opening: _Opening | None = None
        if session is None and message is not None and message.get("method") == "initialize":
            send, opening = self._issuing(send, claims, message.get("params"))
            if (asked := initialize_request(message)) is not None and _sdk_would_read(scope):
                # The SDK's answer for this version (replayed.py), the session id added by `_issuing`.
                key = f"initialize {asked[1]} {version}"
                if await self.replayed.replay(key, send, asked[0]):
                    return
                send = self.replayed.keeping(key, send, sse_result=True)
        reset = current_session.set(session)
        try:
            await app(scope, receive, send)
        finally:
            current_session.reset(reset)
            if opening is not None:
                opening.abandon()

    def _issuing(self, send: Send, claims: SessionClaims, params: Any) -> tuple[Send, _Opening | None]:
        """`send`, adding a session id to a successful `initialize` answer; and the opening of its upstream
        sessions, which runs beside the SDK's answer and is awaited before its headers go out."""
        params = params if isinstance(params, dict) else {}
        capabilities = params.get("capabilities") if isinstance(params.get("capabilities"), dict) else {}
        version = params.get("protocolVersion") if isinstance(params.get("protocolVersion"), str) else ""
        opening = _Opening(self.upstreams, claims, capabilities) if carries(capabilities) else None

        async def issuing(message: Message) -> None:
            if message["type"] == "http.response.start":
                opened = await opening.claim() if opening is not None else []
                if message.get("status") == 200:
                    sealed = self.upstreams.sealed(claims.sub, opened)
                    session_id = self.ids.issue_session(claims.sub, version, capabilities, sealed)
                    if session_id is not None:
                        message = {**message, "headers": [*message.get("headers", []), (SESSION_HEADER, session_id.encode())]}
                else:
                    self.upstreams.discard(claims.sub, opened)
            await send(message)

        return issuing, opening

    async def _quick(self, send: Send, claims: SessionClaims, session: AgentSession, message: dict[str, Any]) -> None:
        """`tools/list`, `ping`, `notifications/initialized` or `notifications/cancelled` of a session, served
        here (each a whole server's work in the SDK's stateless transport), answered as the SDK answers."""
        self.served += 1
        method, params = message["method"], message.get("params") or {}
        if "id" not in message:
            if method == "notifications/cancelled":  # a session-era client's notice: inflight.py
                self.inflight.cancel(claims.jti, params["requestId"])
            await send({"type": "http.response.start", "status": 202,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return

        async def answer() -> dict[str, Any]:
            if method == "ping":
                return {}
            tools, next_cursor = paging.page(await self.gateway.list_tools(claims), params.get("cursor"))
            listed = {"tools": list(tools), **({"nextCursor": next_cursor} if next_cursor else {})}
            return _methods.serialize_server_result("tools/list", session.protocol_version, listed)

        await answer_on_stream(send, self.relay, claims, session, message["id"], answer)

    async def _change(self, claims: SessionClaims, carried: dict[str, str], request: dict[str, Any]) -> dict[str, Any]:
        """`logging/setLevel`, `resources/subscribe` or `resources/unsubscribe`, on the session's upstream sessions."""
        method, params = request["method"], request["params"]
        if method == "logging/setLevel":
            if params.get("level") not in LOG_LEVELS:
                raise RPCError(INVALID_PARAMS, f"Invalid params: level must be one of {', '.join(LOG_LEVELS)}")
            return await self.upstreams.set_level(claims, carried, params["level"])
        if not isinstance(params.get("uri"), str):
            raise RPCError(INVALID_PARAMS, "Invalid params: uri must be a string")
        return await self.gateway.resource_subscription(claims, method, params["uri"])

    async def _answer(self, scope: Scope, receive: Receive, send: Send, claims: SessionClaims, message: dict[str, Any], body: bytes) -> None:
        status, where = self.relay.route(claims, message)
        if status == 202:
            await send({"type": "http.response.start", "status": 202, "headers": []})
            await send({"type": "http.response.body", "body": b""})
        elif status:
            await _error(status, where)(scope, receive, send)
        else:
            status, reply, content_type = await self.relay.forward(where, scope["headers"], body)
            await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type.encode("latin-1"))]})
            await send({"type": "http.response.body", "body": reply})

    # --- the standalone stream -----------------------------------------------------------

    def _notice(self, method: str) -> None:
        event = _event({"jsonrpc": "2.0", "method": method})
        for queue in self._streams:
            if queue.full():
                continue  # a level trigger: one already waiting says the same
            queue.put_nowait(event)

    async def _standalone_stream(
        self, receive: Receive, send: Send, claims: SessionClaims, session: AgentSession, carried: dict[str, str]
    ) -> None:
        """The session's GET stream, until the client goes: the list changes this replica sees, and what
        the session's upstream sessions send on theirs (upstream_sessions.py), held for as long."""
        if len(self._streams) >= MAX_STREAMS:
            await send({"type": "http.response.start", "status": 503, "headers": [(b"retry-after", b"5")]})
            await send({"type": "http.response.body", "body": b""})
            return
        queue: asyncio.Queue[str] = asyncio.Queue(_STREAM_QUEUE)
        self._streams.add(queue)
        gone = asyncio.ensure_future(_disconnected(receive))
        following: asyncio.Future[None] | None = None
        try:
            if carried:
                # Open once the upstream streams are (or failed to, within their connections' timeouts):
                # what the agent then asks, through any replica, is told on this stream.
                ready = asyncio.Event()

                async def write(message: dict[str, Any]) -> None:
                    await queue.put(_event(message))

                following = asyncio.ensure_future(self.upstreams.follow(claims, session, carried, write, ready.set))
                opened = asyncio.ensure_future(ready.wait())
                await asyncio.wait({opened, gone, following}, timeout=self._opening_seconds(carried), return_when=asyncio.FIRST_COMPLETED)
                opened.cancel()
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            await send({"type": "http.response.body", "body": b": open\n\n", "more_body": True})
            while not gone.done():
                waiting = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({waiting, gone}, timeout=_KEEPALIVE_SECONDS, return_when=asyncio.FIRST_COMPLETED)
                if waiting in done:
                    await send({"type": "http.response.body", "body": waiting.result().encode(), "more_body": True})
                else:
                    waiting.cancel()
                    if not gone.done():
                        await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})
        except OSError:
            pass  # the client went away mid-write
        finally:
            self._streams.discard(queue)
            gone.cancel()
            if following is not None:
                following.cancel()  # closes the upstream streams
                await asyncio.wait({following}, timeout=1.0)

    def _opening_seconds(self, carried: dict[str, str]) -> float:
        timeouts = [c.timeout_seconds for name in carried if (c := self.gateway.config.connections.get(name)) is not None]
        return float(max(timeouts, default=5))


def announce_session_features(result: dict[str, Any]) -> None:
    """What a session adds to the gateway's capabilities (session-era `initialize`): log levels and
    resource subscriptions, served on the session's upstream sessions (upstream_sessions.py)."""
    capabilities = result.get("capabilities")
    if isinstance(capabilities, dict):
        capabilities.setdefault("logging", {})
        if isinstance(capabilities.get("resources"), dict):
            capabilities["resources"] = {**capabilities["resources"], "subscribe": True}


_QUICK_METHODS: Final = frozenset({"tools/list", "ping"})
_QUICK_NOTICES: Final = frozenset({"notifications/initialized", "notifications/cancelled"})


def _listing_or_notice(message: dict[str, Any]) -> bool:
    """Is `message` one well-formed `tools/list`, `ping`, `notifications/initialized` or
    `notifications/cancelled` (naming a request)? If not, whatever serves it otherwise does."""
    if message.get("jsonrpc") != "2.0" or message.keys() - {"jsonrpc", "id", "method", "params"}:
        return False
    method, params = message.get("method"), message.get("params", {})
    if not isinstance(params, dict) or not isinstance(params.get("_meta", {}), dict):
        return False
    if "id" in message:
        request_id = message["id"]
        if method not in _QUICK_METHODS or isinstance(request_id, bool) or not isinstance(request_id, (int, str)):
            return False
        return isinstance(params.get("cursor", ""), str)
    if method == "notifications/cancelled":
        request_id = params.get("requestId")
        return isinstance(request_id, (int, str)) and not isinstance(request_id, bool)
    return method in _QUICK_NOTICES


def _sdk_would_read(scope: Scope) -> bool:
    """Would the SDK's transport read this POST (JSON in, and an answer as JSON or events accepted)?"""
    accept = header(scope, b"accept") or ""
    types_accepted = {t.split(";")[0].strip().lower() for t in accept.split(",")}
    content_type = (header(scope, b"content-type") or "").lower()
    return {"application/json", "text/event-stream"} <= types_accepted and content_type.startswith("application/json")


def _session_request(request: dict[str, Any]) -> dict[str, Any] | None:
    """The request (its params made an object), if it is one well-formed request this layer serves besides
    plain calls: `SESSION_METHODS`, a task-augmented `tools/call` or a `tasks/*` request. None leaves it to the SDK."""
    if request.get("jsonrpc") != "2.0":
        return None
    method, request_id, params = request.get("method"), request.get("id"), request.get("params", {})
    if isinstance(request_id, bool) or not isinstance(request_id, (int, str)) or not isinstance(params, dict):
        return None
    if method == "tools/call" and "task" in params or method in SESSION_METHODS or method in TASK_REQUESTS:
        return {**request, "params": params}
    return None


class _Opening:
    """The upstream sessions one `initialize` opens beside the SDK's answer, until a session id carries them."""

    def __init__(self, upstreams: UpstreamSessions, claims: SessionClaims, capabilities: dict[str, Any]):
        self._upstreams = upstreams
        self._user = claims.sub
        self._task = asyncio.ensure_future(upstreams.open(claims, capabilities))
        self._claimed = False

    async def claim(self) -> list[UpstreamSession]:
        """What was opened: from here on the caller carries it or ends it."""
        self._claimed = True
        return await self._task

    def abandon(self) -> None:
        """The answer went out without claiming it (the SDK failed): end what was opened."""
        if self._claimed:
            return
        if not self._task.done():
            self._task.cancel()
        elif not self._task.cancelled() and self._task.exception() is None:
            self._upstreams.discard(self._user, self._task.result())


def _event(message: dict[str, Any]) -> str:
    return "event: message\ndata: " + json.dumps(message, separators=(",", ":")) + "\n\n"


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _read_upto(receive: Receive, limit: int) -> tuple[bytes, bool]:
    """The body, read up to `limit` bytes; (what was read, whether that is all of it)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), True
        if size > limit:
            return b"".join(chunks), False


def _json(body: bytes) -> Any:
    try:
        return jsonwire.loads(body)
    except ValueError:
        return None


def header(scope: Scope, name: bytes) -> str | None:
    """The value of request header `name` (lower-case bytes), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None
