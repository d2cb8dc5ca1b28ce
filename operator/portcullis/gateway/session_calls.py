"""`tools/call` for a session-era agent with a session: answered here, on a stream written directly.

The SDK serves the session protocol statelessly here (any replica answers any
request). Its stateless transport builds a whole server per request (2-3 ms of
CPU a call, most of what a session-era call cost), and it has no way to send the
client a request: the answer would come back in another POST it cannot match. So
every plain `tools/call` of a 2025-11-25 session is answered here instead, on a
response stream written directly:

- progress and log messages as the upstream sends them (the agent's own token);
- each question the upstream asks, as a request to the agent with a relay id
  (relay.py), if its client declared elicitation, sampling or roots — whether
  the upstream asked mid-stream (the session protocol) or returned
  `inputRequests` (2026-07-28), in which case the answers are sent back on the
  retry, round after round, as a 2026-07-28 client would;
- then the result, shaped by the SDK's serializer for the session's protocol
  version, or the JSON-RPC error.

Everything else about the call (the allowlist, the credential, the audit event
of each round) is the call path's, unchanged: each round is one `call_tool`.
Anything that is not plainly a well-formed `tools/call` is left to the SDK,
so its answers to bad requests stay the only ones.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from starlette.types import Send

from mcp_types import methods as _methods

from portcullis.gateway import jsonwire
from portcullis.gateway.core import INTERNAL_ERROR, Gateway, RPCError, complete_tool_result, incident
from portcullis.gateway.inflight import InFlight
from portcullis.gateway.relay import Relay
from portcullis.gateway.session_ids import AgentSession
from portcullis.gateway.identity.tokens import SessionClaims
from portcullis.gateway.upstream import AgentError, NotRelayable, call_events, can_be_asked, may_ask

log = logging.getLogger("portcullis.gateway")

MAX_ROUNDS: Final = 16
"""Most `inputRequests` rounds one call may take (an upstream asking for ever is stopped)."""
SSE_HEADERS: Final = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache, no-transform")]


def plain_call(request: dict[str, Any]) -> dict[str, Any] | None:
    """The request, if it is one well-formed `tools/call` (the body already decoded); None leaves it to the SDK."""
    if request.get("jsonrpc") != "2.0" or request.get("method") != "tools/call":
        return None
    request_id, params = request.get("id"), request.get("params")
    if isinstance(request_id, bool) or not isinstance(request_id, (int, str)) or not isinstance(params, dict):
        return None
    if not isinstance(params.get("name"), str) or not isinstance(params.get("arguments", {}), dict):
        return None
    if not isinstance(params.get("_meta", {}), dict):
        return None
    if "task" in params:  # task-augmented: answered at once with a task, by the SDK's server (tasks.py)
        return None
    return request


class _Stream:
    """The call's response stream, and the `CallEvents` of its rounds."""

    def __init__(self, send: Send, relay: Relay, claims: SessionClaims, session: AgentSession, progress_token: Any):
        self._send = send
        self._relay = relay
        self._user = claims.sub
        self.capabilities = session.capabilities
        # Towards a 2026-07-28 upstream every level is asked for: a session-protocol upstream filters by the
        # level the agent set on its session (upstream_sessions.py), which no replica keeps for the other era.
        self.log_level: str | None = "debug"
        self.era = "session"
        self.agent_session: str | None = session.id
        self.protocol_version = session.protocol_version
        self._progress_token = progress_token
        self._started = False
        self.gone = False  # the agent closed the stream

    async def write(self, message: dict[str, Any]) -> None:
        if self.gone:
            return
        try:
            if not self._started:
                self._started = True
                await self._send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            data = jsonwire.dumps(message)
            await self._send({"type": "http.response.body", "body": b"event: message\ndata: " + data + b"\n\n", "more_body": True})
        except OSError:
            self.gone = True

    async def end(self) -> None:
        if not self._started:
            await self._send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        if not self.gone:
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def progress(self, params: dict[str, Any]) -> None:
        if self._progress_token is not None:
            await self.write({"jsonrpc": "2.0", "method": "notifications/progress", "params": {**params, "progressToken": self._progress_token}})

    async def log(self, params: dict[str, Any]) -> None:
        await self.write({"jsonrpc": "2.0", "method": "notifications/message", "params": params})

    async def ask(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        if not may_ask(self.capabilities, method):
            raise NotRelayable(method)
        return await self._relay.ask(self.write, self._user, method, params)


class SessionToolCall:
    def __init__(self, gateway: Gateway, relay: Relay, inflight: InFlight):
        self.gateway = gateway
        self.relay = relay
        self.inflight = inflight

    async def __call__(self, send: Send, claims: SessionClaims, session: AgentSession, request: dict[str, Any]) -> None:
        request_id = request["id"]
        params = request["params"]
        meta = dict(params.get("_meta") or {})
        stream = _Stream(send, self.relay, claims, session, meta.get("progressToken"))
        reset = call_events.set(stream)
        try:
            with self.inflight.track(claims.jti, request_id) as cancellable:
                answer = await self._rounds(stream, claims, params["name"], params.get("arguments"), meta, request_id)
            if cancellable.cancelled_caught:
                answer = _error(request_id, INTERNAL_ERROR, "The call was cancelled by the client.")
        finally:
            call_events.reset(reset)
        await stream.write(answer)
        await stream.end()

    async def _rounds(
        self, stream: _Stream, claims: SessionClaims, name: str, arguments: dict[str, Any] | None, meta: dict[str, Any], request_id: Any
    ) -> dict[str, Any]:
        relay: dict[str, Any] = {"_meta": meta} if meta else {}
        for _ in range(MAX_ROUNDS):
            try:
                result = await self.gateway.call_tool(claims, name, arguments, relay)
            except RPCError as exc:
                return {"jsonrpc": "2.0", "id": request_id, "error": exc.to_dict()}
            if result.get("resultType") != "input_required":
                return {"jsonrpc": "2.0", "id": request_id, "result": _shaped(result, stream.protocol_version)}
            # A 2026-07-28 upstream's questions: asked of the agent one by one, answered on the retry.
            responses: dict[str, Any] = {}
            for key, question in (result.get("inputRequests") or {}).items():
                if not isinstance(question, dict) or not isinstance(question.get("method"), str):
                    return _error(request_id, INTERNAL_ERROR, f"The tool {name!r} asked its client something unreadable.")
                try:
                    responses[key] = await stream.ask(question["method"], question.get("params") or {})
                except NotRelayable:
                    return _error(request_id, INTERNAL_ERROR, f"The tool {name!r} needs {question['method']}, which your client did not declare.")
                except AgentError as exc:
                    return {"jsonrpc": "2.0", "id": request_id, "error": exc.error}
            relay = {**({"_meta": meta} if meta else {}), "inputResponses": responses}
            if isinstance(result.get("requestState"), str):
                relay["requestState"] = result["requestState"]
        return _error(request_id, INTERNAL_ERROR, f"The tool {name!r} asked for input more than {MAX_ROUNDS} times.")


async def answer_on_stream(
    send: Send, relay: Relay, claims: SessionClaims, session: AgentSession, request_id: Any,
    work: Callable[[], Awaitable[dict[str, Any]]], progress_token: Any = None,
) -> None:
    """A session's request other than a plain call, served here (`logging/setLevel`, `resources/subscribe`,
    a task's requests: sessions.py): what the upstream sends meanwhile, questions included, is relayed as
    during a call, then the answer."""
    stream = _Stream(send, relay, claims, session, progress_token)
    reset = call_events.set(stream)
    try:
        try:
            answer: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "result": await work()}
        except RPCError as exc:
            answer = {"jsonrpc": "2.0", "id": request_id, "error": exc.to_dict()}
        except Exception:  # as the SDK's handlers are guarded (endpoint.py `_no_internals`)
            answer = {"jsonrpc": "2.0", "id": request_id, "error": incident("a session's request").to_dict()}
    finally:
        call_events.reset(reset)
    await stream.write(answer)
    await stream.end()


def _shaped(result: dict[str, Any], protocol_version: str) -> dict[str, Any]:
    """The result as the SDK shapes it for the session's protocol version (no 2026-07-28 `resultType`)."""
    try:
        return _methods.serialize_server_result("tools/call", protocol_version, complete_tool_result(result))
    except Exception:  # a version the SDK's serializer does not know: the one field that differs
        result.pop("resultType", None)
        return result


def _error(request_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}

