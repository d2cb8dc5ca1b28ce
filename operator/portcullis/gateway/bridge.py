"""A 2026-07-28 agent, and a session-protocol upstream that asks it something mid-call.

On 2026-07-28 a server never sends its client a request: it answers the call
with `input_required` (`inputRequests` and a `requestState`), and the client
calls again with the answers. A session-protocol upstream instead asks
mid-stream and waits, its call still open. The bridge joins the two:

- a call from an agent that declared something an upstream may ask for
  (elicitation, sampling, roots) runs beside the agent's request (`start`);
  if it ends, its result is the answer; if the upstream asks first, the agent
  gets `input_required` with that one question and a `requestState` that is a
  signed relay id (session_ids.py) naming this replica and the user;
- the agent's retry carries the answer (`resume`). Whatever replica it lands
  on, `sessions.py`'s front door passes it to the replica the state names,
  where the waiting upstream call gets the answer and runs on, to its result
  or its next question.

The upstream call keeps its own clocks (its idle timeout is held while it
waits, its maximum runs on); a question nobody answers within
`relay.ANSWER_SECONDS` is answered with an error, and the call ends. Each retry
is one audit event of its own (`Gateway.record_answer`), beside the one of the
call it continues.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Final

from portcullis.gateway.core import INTERNAL_ERROR, INVALID_PARAMS, Gateway, RPCError
from portcullis.gateway.policy.pipeline import hidden_by
from portcullis.gateway.relay import ANSWER_SECONDS
from portcullis.gateway.session_ids import RELAY_PREFIX, SessionIds
from portcullis.gateway.identity.tokens import SessionClaims, TokenError
from portcullis.gateway.upstream import AgentError, NotRelayable, call_events, may_ask

log = logging.getLogger("portcullis.gateway")

QUESTION_KEY: Final = "portcullis-question"
"""The key of the one question in each `inputRequests` the bridge sends."""
MAX_WAITING: Final = 10_000
"""Calls waiting for an agent's answer on one replica; a call that would exceed it is refused."""


class _Events:
    """The `CallEvents` of a bridged call: its questions go to the agent through `outcomes`."""

    era = "modern"
    agent_session: str | None = None
    log_level: str | None = None  # the agent's own opt-in travels in its `_meta`

    def __init__(self, waiting: _Waiting, capabilities: dict[str, Any], relay: Any):
        self._waiting = waiting
        self.capabilities = capabilities
        self.relay = relay  # the current leg's progress and logs (the agent's request that is open now)

    async def progress(self, params: dict[str, Any]) -> None:
        if self.relay is not None:
            await self.relay.progress(params)

    async def log(self, params: dict[str, Any]) -> None:
        if self.relay is not None:
            await self.relay.log(params)

    async def ask(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        if not may_ask(self.capabilities, method):
            raise NotRelayable(method)
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting.answer = answer
        await self._waiting.outcomes.put(("asked", {"method": method, "params": params}))
        try:
            async with asyncio.timeout(ANSWER_SECONDS):
                result = await answer
        except TimeoutError:
            raise AgentError({"code": -32001, "message": f"the client did not answer {method} within {ANSWER_SECONDS}s"}) from None
        finally:
            self._waiting.answer = None
        if isinstance(result.get("error"), dict):  # how a bridged agent can decline outright
            raise AgentError(result["error"])
        return result


@dataclass
class _Waiting:
    """A bridged call: what it did next (`outcomes`), and the answer its question waits for."""

    user: str
    name: str
    outcomes: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    answer: asyncio.Future[dict[str, Any]] | None = None
    task: asyncio.Task[None] | None = None
    events: _Events | None = None


class Bridge:
    def __init__(self, gateway: Gateway, ids: SessionIds):
        self.gateway = gateway
        self.ids = ids
        self.replica_url = ""
        self._waiting: dict[str, _Waiting] = {}

    @staticmethod
    def ours(request_state: str | None) -> bool:
        return isinstance(request_state, str) and request_state.startswith(RELAY_PREFIX)

    async def start(
        self, claims: SessionClaims, name: str, arguments: dict[str, Any] | None, relay: dict[str, Any] | None,
        capabilities: dict[str, Any], leg: Any,
    ) -> dict[str, Any]:
        if len(self._waiting) >= MAX_WAITING:
            raise RPCError(INTERNAL_ERROR, "Too many calls are waiting for their clients' answers on this replica; try again shortly.")
        state = self.ids.relay_id(self.replica_url, claims.sub)
        waiting = _Waiting(claims.sub, name)
        events = waiting.events = _Events(waiting, capabilities, leg)

        async def run() -> None:
            call_events.set(events)  # this task's own context: the call's questions come to the bridge
            try:
                result = await self.gateway.call_tool(claims, name, arguments, relay)
            except RPCError as exc:
                await waiting.outcomes.put(("failed", exc))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the call path answers its own failures; this is a bug
                log.exception("a bridged call failed")
                await waiting.outcomes.put(("failed", RPCError(INTERNAL_ERROR, f"Internal error in the gateway ({type(exc).__name__}).")))
            else:
                await waiting.outcomes.put(("done", result))

        self._waiting[state] = waiting
        waiting.task = asyncio.get_running_loop().create_task(run(), name=f"bridged-call/{name}")
        # Once the call has ended nobody can answer it: a late retry finds no call waiting.
        waiting.task.add_done_callback(lambda _: self._waiting.pop(state, None))
        return await self._next(state, waiting)

    async def resume(self, claims: SessionClaims, name: str, state: str, responses: dict[str, Any] | None, leg: Any) -> dict[str, Any]:
        try:
            target = self.ids.open_relay_id(state)
        except TokenError:
            raise RPCError(INVALID_PARAMS, "Invalid requestState: it was not issued by this server") from None
        waiting = self._waiting.get(state)
        # A narrower token of the same user (scope, access level) cannot answer for a tool it may not use.
        out_of_scope = hidden_by(claims, name, self.gateway.exposure) is not None
        if target.user != claims.sub or waiting is None or waiting.name != name or waiting.answer is None or out_of_scope:
            self.gateway.record_answer(claims, name, accepted=False)
            raise RPCError(INVALID_PARAMS, "Invalid requestState: no call of yours waits for it (it ended, or timed out)")
        answer = (responses or {}).get(QUESTION_KEY)
        if not isinstance(answer, dict):
            raise RPCError(INVALID_PARAMS, f"inputResponses must answer {QUESTION_KEY!r}")
        self.gateway.record_answer(claims, name, accepted=True)
        if waiting.events is not None:
            waiting.events.relay = leg
        if not waiting.answer.done():
            waiting.answer.set_result(answer)
        return await self._next(state, waiting)

    async def _next(self, state: str, waiting: _Waiting) -> dict[str, Any]:
        """Wait for what the call does next: end (its result or error) or ask (input_required)."""
        try:
            kind, value = await waiting.outcomes.get()
        except asyncio.CancelledError:  # the agent went away: the call it started goes too
            if waiting.task is not None:
                waiting.task.cancel()
            self._waiting.pop(state, None)
            raise
        if kind == "asked":
            return {"resultType": "input_required", "inputRequests": {QUESTION_KEY: value}, "requestState": state}
        self._waiting.pop(state, None)
        if waiting.events is not None:
            waiting.events.relay = None  # the agent's request is answered: nothing more goes to it
        if kind == "failed":
            raise value
        return value  # type: ignore[no-any-return]
