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
  the session's standalone GET stream, which carries list-change notices.

A request without a session id is served as before, statelessly; 2026-07-28
requests never come here. Sessions are not deleted: an id stays valid until
it expires, whoever sends DELETE (answered 405, as the protocol allows a
server that does not let clients end sessions).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
from typing import Any, Final

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from portcullis.gateway.core import Gateway
from portcullis.gateway.inflight import InFlight
from portcullis.gateway.relay import Relay
from portcullis.gateway.fastpath import replay
from portcullis.gateway.session_calls import SSE_HEADERS, SessionToolCall, plain_call, wants_relay
from portcullis.gateway.session_ids import RELAY_PREFIX, AgentSession, SessionIds
from portcullis.gateway.identity.tokens import SessionClaims, TokenError

log = logging.getLogger("portcullis.gateway")

current_session: contextvars.ContextVar[AgentSession | None] = contextvars.ContextVar("portcullis_session", default=None)
"""The session of the request being served, for the SDK's handlers (set around the SDK app)."""

SESSION_HEADER: Final = b"mcp-session-id"
MAX_STREAMS: Final = 10_000
"""Standalone GET streams open at once on one replica; more are refused with 503."""
_STREAM_QUEUE: Final = 16  # notices waiting for a slow stream; more are dropped (they are level triggers)
_KEEPALIVE_SECONDS: Final = 25.0
_MODERN: Final = b"2026-07-28"


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
        return scope["method"] in ("POST", "GET")

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
        if scope["method"] == "GET":
            if session is None:
                await app(scope, receive, send)
            else:
                await self._standalone_stream(receive, send)
            return
        body, complete = await _read_upto(receive, self.max_body_bytes)
        receive = replay({"type": "http.request", "body": body, "more_body": not complete}, receive)
        if complete and RELAY_PREFIX.encode() in body:
            message = _json(body)
            if isinstance(message, dict) and "method" not in message and str(message.get("id", "")).startswith(RELAY_PREFIX):
                await self._answer(scope, receive, send, claims, message, body)
                return
        if complete and wants_relay(session) and (request := plain_call(body)) is not None:
            assert session is not None
            await self.calls(send, claims, session, request)
            return
        if complete and session is None and b'"initialize"' in body:
            message = _json(body)
            if isinstance(message, dict) and message.get("method") == "initialize":
                send = self._issuing(send, claims, message.get("params"))
        reset = current_session.set(session)
        try:
            await app(scope, receive, send)
        finally:
            current_session.reset(reset)

    def _issuing(self, send: Send, claims: SessionClaims, params: Any) -> Send:
        """`send`, adding a session id to a successful `initialize` answer."""
        params = params if isinstance(params, dict) else {}
        capabilities = params.get("capabilities") if isinstance(params.get("capabilities"), dict) else {}
        version = params.get("protocolVersion") if isinstance(params.get("protocolVersion"), str) else ""
        session_id = self.ids.issue_session(claims.sub, version, capabilities)

        async def issuing(message: Message) -> None:
            if message["type"] == "http.response.start" and message.get("status") == 200 and session_id is not None:
                message = {**message, "headers": [*message.get("headers", []), (SESSION_HEADER, session_id.encode())]}
            await send(message)

        return issuing

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
        event = "event: message\ndata: " + json.dumps({"jsonrpc": "2.0", "method": method}) + "\n\n"
        for queue in self._streams:
            if queue.full():
                continue  # a level trigger: one already waiting says the same
            queue.put_nowait(event)

    async def _standalone_stream(self, receive: Receive, send: Send) -> None:
        """The session's GET stream: the list changes this replica sees, until the client goes."""
        if len(self._streams) >= MAX_STREAMS:
            await send({"type": "http.response.start", "status": 503, "headers": [(b"retry-after", b"5")]})
            await send({"type": "http.response.body", "body": b""})
            return
        queue: asyncio.Queue[str] = asyncio.Queue(_STREAM_QUEUE)
        self._streams.add(queue)
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
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
        return json.loads(body)
    except ValueError:
        return None


def header(scope: Scope, name: bytes) -> str | None:
    """The value of request header `name` (lower-case bytes), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None
