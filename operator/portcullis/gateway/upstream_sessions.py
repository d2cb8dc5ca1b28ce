"""A session-era agent's upstream sessions: opened once, at its `initialize`, the same on every replica.

What a session-protocol upstream keeps per session changes after the session
opened: the log level (`logging/setLevel`), resource subscriptions, the
session's standalone GET stream, on which it logs on its own timers, announces
list changes and resource updates. Any replica serves any request, with no
sticky routing and no shared store, so the agent's GET stream may be held by
replica X while its `resources/subscribe` lands on replica Y. If each replica
opened its own upstream session for the agent (as it still does when this
fails), Y would subscribe a session whose stream nobody holds.

So the agent's upstream sessions are made the same on every replica:

- **At `initialize`**, the replica that answers it opens one upstream session
  per connection the server uses, in parallel, each bounded by its
  connection's `timeoutSeconds`, declaring what the agent declared and with the
  user's own credential (`open`). An upstream known to be unreachable, one
  that refuses sessions (a 2026-07-28 upstream), one whose credential the user
  has not connected, or one that fails, gets no such session: the agent's
  requests to it go on sessions each replica opens for itself, as before.
- **The ids travel in the agent's session id**, sealed (`UpstreamSessionSeal`,
  session_ids.py: AES-256-GCM under a key every replica derives from the shared
  signing keys, bound to tenant, server and user). The agent never learns them,
  and no replica stores them: each request's replica opens the seal (`carried`)
  and sends the agent's requests on those sessions (upstream.py `_legacy`).
- **The GET stream**: the replica holding the agent's GET stream holds each of
  those upstream sessions' GET streams for as long (`follow`), and passes on
  what the agent may see: log messages; `notifications/resources/updated` for
  resources this server exposes only; list changes become the gateway's own
  notices (its lists are filtered), through the catalog like any other; a
  request (roots, elicitation, sampling: what the agent declared) is asked of
  the agent on its stream, answered from whichever replica (relay.py); task
  status notices under the gateway's task ids, where tasks.py can attribute them.
- **`logging/setLevel`** goes to every one of those sessions (`set_level`),
  **`resources/subscribe`** and `/unsubscribe` to the one serving the resource
  (core.py `resource_subscription`), so they apply wherever the stream is.
- **DELETE** of the agent's session ends those upstream sessions (`end`) and is
  answered as they answer. The gateway's own session id cannot be revoked
  without state: it stays valid until it expires, and its next requests find
  the upstream sessions gone (404) and continue on fresh sessions of each
  replica's (docs/fidelity.md), like an upstream that forgot a session.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from portcullis.gateway.audit import Reason
from portcullis.gateway.audit.recorder import recording
from portcullis.gateway.core import INTERNAL_ERROR, Gateway, RPCError, relay_result
from portcullis.gateway.credentials import CredentialError
from portcullis.gateway.identity.tokens import SessionClaims, TokenError
from portcullis.gateway.relay import Relay
from portcullis.gateway.session_ids import AgentSession, UpstreamSession, UpstreamSessionSeal, url_digest
from portcullis.gateway.upstream import AgentError, NoChangeStream, UpstreamClient, UpstreamError, UpstreamRPCError, may_ask

log = logging.getLogger("portcullis.gateway")

LOG_LEVELS: Final = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
_FIRST_PAUSE: Final = 0.5  # before reopening a dropped upstream session stream; doubling up to _MAX_PAUSE
_MAX_PAUSE: Final = 30.0
_MAX_ASKS: Final = 8  # questions one upstream session stream may have waiting for the agent at once
_METHOD_NOT_FOUND: Final = -32601
_AUDIT_REFUSAL: Final = "The request was not made: the gateway cannot record it in the audit log right now. Try again shortly."

Write = Callable[[dict[str, Any]], Awaitable[None]]
TaskStatus = Callable[[SessionClaims, str, dict[str, Any]], "dict[str, Any] | None"]
"""An upstream's task status notice as the agent may see it, or None (tasks.py `Tasks.status`)."""
"""Puts one JSON-RPC message on the agent's GET stream."""


class UpstreamSessions:
    def __init__(self, gateway: Gateway, relay: Relay, task_status: TaskStatus = lambda claims, connection, params: None):
        self.gateway = gateway
        self.relay = relay
        self.task_status = task_status
        self.seal = UpstreamSessionSeal(gateway.verifier.keys, lambda: gateway.config.server.url, lambda: gateway.config.tenant)

    # --- at initialize ---------------------------------------------------------------

    async def open(self, claims: SessionClaims, capabilities: Mapping[str, Any]) -> list[UpstreamSession]:
        """One upstream session per connection in use that keeps sessions; the others are left out."""
        unreachable = set(self.gateway.unreachable())
        wanted = sorted(connections_in_use(self.gateway) - unreachable)
        opened = await asyncio.gather(*(self._open_one(claims, connection, capabilities) for connection in wanted))
        return [session for session in opened if session is not None]

    async def _open_one(self, claims: SessionClaims, connection: str, capabilities: Mapping[str, Any]) -> UpstreamSession | None:
        client = self.gateway.upstream(connection)
        if client is None:
            return None
        try:
            async with asyncio.timeout(client.config.timeout_seconds):
                credential = await self.gateway.credentials.headers(claims.sub, connection)
                session_id = await client.open_session(credential, capabilities)
        except CredentialError:
            return None  # not connected (yet): its calls say what to do, on sessions of each replica's
        except (UpstreamError, UpstreamRPCError, TimeoutError) as exc:
            log.info("no upstream session for an agent on %s (its requests go on each replica's own): %s", connection, exc)
            return None
        return UpstreamSession(connection, session_id, client.config.url) if session_id else None

    def sealed(self, user: str, opened: list[UpstreamSession]) -> str | None:
        """The sealed text of what a session id can carry of `opened`; what it cannot is ended."""
        sealed, carried = self.seal.seal(user, opened)
        self.discard(user, [s for s in opened if s not in carried])
        return sealed

    def discard(self, user: str, sessions: list[UpstreamSession]) -> None:
        """End upstream sessions nobody will use (the agent got no session id to carry them), in the background."""
        for session in sessions:
            self.gateway.background.spawn(self._end_quietly(user, session), name=f"end-upstream-session/{session.connection}")

    async def _end_quietly(self, user: str, session: UpstreamSession) -> None:
        await self._end_one(user, session.connection, session.session_id)

    # --- on every request --------------------------------------------------------------

    def carried(self, session: AgentSession) -> dict[str, str]:
        """Connection -> the upstream session id `session` carries, for each that still applies here."""
        if session.sealed is None:
            return {}
        try:
            entries = self.seal.open(session.user, session.sealed)
        except TokenError as exc:  # sealed under a key since pruned: served as a session without them
            log.info("an agent session's upstream sessions do not open here (%s): served on each replica's own", exc.reason)
            return {}
        carried: dict[str, str] = {}
        for connection, session_id, digest in entries:
            client = self.gateway.upstream(connection)
            if client is not None and url_digest(client.config.url) == digest:  # not re-pointed since
                carried[connection] = session_id
        return carried

    async def set_level(self, claims: SessionClaims, carried: Mapping[str, str], level: str) -> dict[str, Any]:
        """`logging/setLevel` on each of the agent's upstream sessions; one audit event.

        Answered `{}` when one accepted it (or there is none to tell); when every one refused,
        with the first refusal, as that upstream gave it.
        """
        targets = sorted(c for c in carried if self.gateway.upstream(c) is not None)
        with recording(self.gateway.audit, claims, "logging/setLevel", level) as record:
            record.allow(",".join(targets))
            record.connection = record.connection or None  # nothing to tell: the gateway's own answer
            if not targets:
                record.result({}, "ok")
                return {}
            if not record.admit():
                raise RPCError(INTERNAL_ERROR, _AUDIT_REFUSAL)
            with record.upstream():
                refusals = await asyncio.gather(*(self._set_one(claims, c, level) for c in targets))
            if any(r is None for r in refusals):
                record.result({}, "ok")
                return {}
            first = next(r for r in refusals if r is not None)
            record.failed(Reason.UPSTREAM_RPC_ERROR)
            code = first.get("code")
            raise RPCError(code if isinstance(code, int) and not isinstance(code, bool) else INTERNAL_ERROR,
                           str(first.get("message", "")), first.get("data"))

    async def _set_one(self, claims: SessionClaims, connection: str, level: str) -> dict[str, Any] | None:
        """None when the upstream accepted the level, else its error."""
        client = self.gateway.upstream(connection)
        assert client is not None
        try:
            credential = await self.gateway.credentials.headers(claims.sub, connection)
            await client.request("logging/setLevel", {"level": level}, credential=credential)
        except UpstreamRPCError as exc:
            return exc.error
        except (UpstreamError, CredentialError) as exc:
            return {"code": INTERNAL_ERROR, "message": str(exc)}
        return None

    async def end(self, claims: SessionClaims, carried: Mapping[str, str]) -> int:
        """DELETE each of the agent's upstream sessions: the HTTP status to answer the agent's DELETE with.

        A 2xx when one of them ended; 404 when every upstream had forgotten its session already;
        405 when none lets a client end one; 502 when none could be reached.
        """
        with recording(self.gateway.audit, claims, "session/delete", None) as record:
            record.allow(",".join(sorted(carried)))
            if not record.admit():
                return 503
            with record.upstream():
                statuses = await asyncio.gather(*(self._end_one(claims.sub, c, s) for c, s in sorted(carried.items())))
            status = combined(statuses)
            if 200 <= status < 300:
                record.result({}, "ok")
            else:
                record.failed(Reason.UPSTREAM_FAILED, detail=f"http {status}")
            return status

    async def _end_one(self, user: str, connection: str, session_id: str) -> int:
        client = self.gateway.upstream(connection)
        if client is None:
            return 502
        try:
            return await client.end_session(session_id, await self.gateway.credentials.headers(user, connection))
        except (UpstreamError, CredentialError) as exc:
            log.info("ending an agent's upstream session on %s failed: %s", connection, exc)
            return 502

    # --- the agent's GET stream ----------------------------------------------------------

    async def follow(
        self, claims: SessionClaims, session: AgentSession, carried: Mapping[str, str], write: Write, ready: Callable[[], None]
    ) -> None:
        """Hold the GET stream of each of the agent's upstream sessions until cancelled, passing on what
        the agent may see; `ready` once each has opened or failed to, so the agent's stream opens then."""
        waiting = set(carried)

        def opened(connection: str) -> None:
            if connection in waiting:
                waiting.discard(connection)
                if not waiting:
                    ready()

        if not carried:
            ready()
            return
        async with asyncio.TaskGroup() as group:
            for connection, session_id in sorted(carried.items()):
                group.create_task(self._follow_one(claims, session, connection, session_id, write, functools.partial(opened, connection)))

    async def _follow_one(
        self, claims: SessionClaims, session: AgentSession, connection: str, session_id: str, write: Write, opened: Callable[[], None]
    ) -> None:
        client = self.gateway.upstream(connection)
        asks: set[asyncio.Task[None]] = set()
        pause = _FIRST_PAUSE
        renewed: Mapping[str, str] | None = None  # a credential renewed after a 401, for one more try
        try:
            while client is not None:
                try:
                    credential = renewed or await self.gateway.credentials.headers(claims.sub, connection)
                    async for message in client.session_messages(session_id, credential, opened):
                        pause, renewed = _FIRST_PAUSE, None
                        await self._pass_on(client, session_id, credential, claims, session, message, write, asks)
                except (NoChangeStream, CredentialError):
                    return  # no such stream here, or the user's credential is gone: nothing to hold
                except UpstreamError as exc:
                    if exc.status == 401:
                        # An expired OAuth token is renewed once, as a call's would be (core.py `_renewed`);
                        # refused again, the grant is dropped and the user is asked to reconnect.
                        renewed = await self._renew(claims.sub, connection, credential, again=renewed is not None)
                        if renewed is not None:
                            continue
                    if exc.status in (400, 401, 403, 404):
                        # The upstream forgot the session (404; the everything server says 400), or the
                        # credential no longer opens it: reopening would be refused the same way.
                        log.info("the upstream session stream of an agent on %s is gone: %s", connection, exc)
                        return
                    # 409 (another stream of this session is open, say the agent's previous one), a drop: again
                opened()  # it tried: one stream that cannot open does not hold up the agent's
                await asyncio.sleep(pause)
                pause = min(pause * 2, _MAX_PAUSE)
        except Exception:  # a bug must not take the agent's stream down with it
            log.exception("following an agent's upstream session stream on %s failed", connection)
        finally:
            opened()
            for task in asks:
                task.cancel()

    async def _renew(self, user: str, connection: str, refused: Mapping[str, str] | None, *, again: bool) -> Mapping[str, str] | None:
        """The credential to try once more after a 401, or None (nothing to renew, or it was renewed already)."""
        try:
            if again:
                await self.gateway.credentials.refused_after_refresh(user, connection)
                return None
            return await self.gateway.credentials.rejected(user, connection, refused)
        except CredentialError:
            return None

    async def _pass_on(
        self, client: UpstreamClient, session_id: str, credential: Mapping[str, str] | None, claims: SessionClaims,
        session: AgentSession, message: dict[str, Any], write: Write, asks: set[asyncio.Task[None]],
    ) -> None:
        method, params = message.get("method"), message.get("params")
        if not isinstance(method, str):
            return  # an answer: nothing is asked on this stream but what `_answer` answers
        if "id" in message:
            task = asyncio.ensure_future(self._answer(client, session_id, credential, claims, session, message, write, len(asks) < _MAX_ASKS))
            asks.add(task)
            task.add_done_callback(asks.discard)
            return
        if not isinstance(params, dict):
            return
        if method == "notifications/message" and "level" in params and "data" in params:
            await write({"jsonrpc": "2.0", "method": method, "params": relay_result(params)})
        elif method == "notifications/resources/updated":
            uri = params.get("uri")
            if isinstance(uri, str) and self.gateway.resource_connection(uri) == client.name:  # exposed here, by this upstream
                await write({"jsonrpc": "2.0", "method": method, "params": relay_result(params)})
        elif method == "notifications/tasks/status":
            status = self.task_status(claims, client.name, params)  # under the gateway's task id, when it can say whose
            if status is not None:
                await write({"jsonrpc": "2.0", "method": method, "params": status})
        # Anything else (progress with no call, say) is not the agent's to see.

    async def _answer(
        self, client: UpstreamClient, session_id: str, credential: Mapping[str, str] | None, claims: SessionClaims,
        session: AgentSession, request: dict[str, Any], write: Write, room: bool,
    ) -> None:
        """A request the upstream sent on the session's stream: asked of the agent when it declared what it
        needs (relay.py: answered from whichever replica), `ping` answered here, anything else refused."""
        method, params = str(request["method"]), request.get("params")
        reply: dict[str, Any] = {"jsonrpc": "2.0", "id": request["id"]}
        if method == "ping":
            reply["result"] = {}
        elif room and may_ask(session.capabilities, method):
            try:
                reply["result"] = await self.relay.ask(write, claims.sub, method, params if isinstance(params, dict) else {})
            except AgentError as exc:
                reply["error"] = exc.error
        else:
            reply["error"] = {"code": _METHOD_NOT_FOUND, "message": f"{method} cannot reach this session's client through the gateway"}
        try:
            await client.answer_on_session(session_id, credential, reply)
        except UpstreamError as exc:
            log.info("answering %s on an agent's upstream session failed: %s", method, exc)


def connections_in_use(gateway: Gateway) -> set[str]:
    """The connections this server exposes anything of."""
    config = gateway.config
    return (
        {t.connection for t in config.tools}
        | {p.connection for p in config.prompts}
        | {r.connection for r in config.resources}
        | {t.connection for t in config.resource_templates}
    )


def combined(statuses: list[int]) -> int:
    """One answer to the agent's DELETE from its upstream sessions' answers."""
    ended = [s for s in statuses if 200 <= s < 300]
    if ended:
        return ended[0]
    if statuses and all(s in (400, 404) for s in statuses):  # forgotten (the everything server says 400)
        return 404
    if 405 in statuses:
        return 405
    return 502
