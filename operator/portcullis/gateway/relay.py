"""Requests an upstream sends its client mid-call, relayed to a session-era agent, on any replica.

When a call's upstream asks its client something (`elicitation/create`,
`sampling/createMessage`, `roots/list`) — mid-stream on the session protocol,
or as `inputRequests` on 2026-07-28 — and the agent speaks the session protocol,
the gateway sends the agent that request on the call's own response stream and
waits. The agent answers with a separate POST, which a load balancer may send
to any replica. The request's JSON-RPC id is a signed `RelayTarget`
(session_ids.py) naming the replica that waits, so whichever replica receives
the answer knows where it goes:

- its own: the waiting call is resumed (`deliver`);
- another: the POST is passed on as it came, to that replica's MCP URL (`forward`),
  which authenticates it again like any request. An answer signed for another
  user is refused (403) wherever it lands; one for a request nobody waits for any
  more (the call ended) is accepted and dropped, as the protocol allows.

The same holds for what an upstream asks outside any call, on the GET stream of
the agent's upstream session (upstream_sessions.py): it is written on the
agent's own GET stream, and the replica holding that stream waits.

Replicas reach each other on the MCP port, so in a cluster pods must be able to
reach each other's pod IP there (the chart's NetworkPolicy allows it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import aiohttp

from portcullis.gateway.session_ids import SessionIds
from portcullis.gateway.identity.tokens import SessionClaims, TokenError
from portcullis.gateway.upstream import AgentError

log = logging.getLogger("portcullis.gateway")

ANSWER_SECONDS: Final = 600
"""How long a relayed request waits for the agent's answer (a person may be answering it)."""
_FORWARD_SECONDS: Final = 30
# What of the answer's POST is passed on to the replica that waits.
_FORWARDED_HEADERS: Final = frozenset({"authorization", "content-type", "mcp-session-id", "mcp-protocol-version", "accept"})

Write = Callable[[dict[str, Any]], Awaitable[None]]


class Relay:
    def __init__(self, ids: SessionIds, http: Callable[[], aiohttp.ClientSession]):
        self.ids = ids
        self._http = http
        self.replica_url = ""
        """This replica's MCP URL as its peers reach it (set when serving starts); empty: answers must land here."""
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def ask(self, write: Write, user: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Send `method` to the agent on `write` and return its result; AgentError if it answers an error."""
        request_id = self.ids.relay_id(self.replica_url, user)
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = answer
        try:
            await write({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
            async with asyncio.timeout(ANSWER_SECONDS):
                message = await answer
        except TimeoutError:
            raise AgentError({"code": -32001, "message": f"the client did not answer {method} within {ANSWER_SECONDS}s"}) from None
        finally:
            self._waiting.pop(request_id, None)
        if isinstance(message.get("error"), dict):
            raise AgentError(message["error"])
        result = message.get("result")
        if not isinstance(result, dict):
            raise AgentError({"code": -32603, "message": f"the client's answer to {method} has no result"})
        return result

    def route(self, claims: SessionClaims, message: dict[str, Any], *, deliver: bool = True) -> tuple[int, str]:
        """Where an agent's answer goes: (202, "") when handled here, (0, url) to forward, or an error status and reason.

        `deliver=False` only tells where (a bridged retry: bridge.py resumes the call itself)."""
        try:
            target = self.ids.open_relay_id(str(message.get("id")))
        except TokenError as exc:
            return 400, f"this answer's id was not issued by this server ({exc.reason})"
        if target.user != claims.sub:
            return 403, "this answer belongs to another user's call"
        if not target.replica or target.replica == self.replica_url:
            if not deliver:
                return 202, ""
            waiting = self._waiting.get(str(message["id"]))
            if waiting is not None and not waiting.done():
                waiting.set_result(message)
            else:
                log.info("an answer arrived for a relayed request nobody waits for any more (the call ended)")
            return 202, ""
        return 0, target.replica

    async def forward(self, url: str, headers: list[tuple[bytes, bytes]], body: bytes, *, long: bool = False) -> tuple[int, bytes, str]:
        """POST an answer on to the replica that waits for it; (status, body, content type) of its reply.

        `long`: a bridged retry, answered only when the call it continues ends or asks again."""
        passed = {
            name: value
            for name, value in ((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in headers)
            if name in _FORWARDED_HEADERS or name.startswith("mcp-")
        }
        # A bridged retry lasts as long as the rest of its call, which the replica running it bounds.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=_FORWARD_SECONDS) if long else aiohttp.ClientTimeout(total=_FORWARD_SECONDS)
        try:
            async with self._http().post(url, data=body, headers=passed, timeout=timeout) as reply:
                return reply.status, await reply.read(), reply.headers.get("content-type", "application/json")
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("passing an answer on to the replica at %s failed: %s", url, type(exc).__name__)
            return 502, b'{"jsonrpc": "2.0", "id": null, "error": {"code": -32603, "message": "the replica running this call cannot be reached"}}', "application/json"
