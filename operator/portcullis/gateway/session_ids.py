"""Signed identifiers that carry their state, so any replica can act on them.

The session protocol (2025-11-25) has two pieces of per-client state a
gateway needs after the request that created them:

- the **session**: which user opened it and what its client can do (the
  capabilities it declared at `initialize`, which decide what the gateway may
  relay to it, and which its calls carry upstream). It is sent back by the
  client on every request as `Mcp-Session-Id`.
- a **relayed request**: an upstream asked the client something mid-call
  (elicitation, sampling, roots); the client's answer comes back in a
  separate POST, maybe to another replica, and must reach the replica where
  the call waits. Its JSON-RPC id names that replica.

Neither is kept in a table. Each is a compact JWS signed with the server's
current token signing key (Ed25519; the replicas share the key set and verify
with it, retired keys included), with a `typ` of its own and an audience that
no session token has, so none can pass for another or for a session token.
They are signed, not encrypted: what they carry is the client's own
declaration and the address of a replica, and they travel only between the
client and the gateway.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from collections.abc import Callable
from typing import Any, Final

import jwt

from portcullis.gateway.identity.tokens import ALGORITHM, SigningKeys, TokenError, unverified_header

SESSION_TYP: Final = "portcullis-session+jwt"
RELAY_TYP: Final = "portcullis-relay+jwt"
TASK_TYP: Final = "portcullis-task+jwt"
RELAY_PREFIX: Final = "portcullis-relay:"
"""The start of every JSON-RPC id the gateway gives a relayed request, so an answer is recognised at once."""
MAX_CAPABILITIES_BYTES: Final = 8192
# A session outlives no token that could use it; a relayed request waits at most this long for its answer.
SESSION_SECONDS: Final = 7 * 24 * 3600
RELAY_SECONDS: Final = 3600
TASK_SECONDS: Final = 7 * 24 * 3600
"""A task id's lifetime; the upstream's own retention (the task's `ttl`) usually ends it sooner."""


@dataclasses.dataclass(frozen=True)
class AgentSession:
    """What a session id says: who opened it, at which protocol version, declaring what."""

    id: str
    user: str
    protocol_version: str
    capabilities: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class RelayTarget:
    """What a relayed request's id says: the replica waiting for the answer, and for whom."""

    replica: str
    """The MCP URL of that replica as its peers reach it; empty when it has none (one replica)."""
    user: str
    nonce: str


@dataclasses.dataclass(frozen=True)
class TaskRef:
    """What a gateway task id says: whose task it is, where it runs, and which exposed tool made it."""

    connection: str
    upstream_id: str
    user: str
    tool: str


class SessionIds:
    """Issue and read session ids, relayed-request ids and task ids for one server."""

    def __init__(self, keys: Callable[[], SigningKeys], audience: Callable[[], str]):
        self._keys = keys  # the token verifier's provider: a rotation applies here at once
        self._audience = audience  # the server's URL, read when used (a config swap may change it)

    @property
    def _session_aud(self) -> str:
        return self._audience() + "#session"

    @property
    def _relay_aud(self) -> str:
        return self._audience() + "#relay"

    @property
    def _task_aud(self) -> str:
        return self._audience() + "#task"

    def issue_session(self, user: str, protocol_version: str, capabilities: dict[str, Any]) -> str | None:
        """A session id, or None when the capabilities are too large to carry (the session is then served without one)."""
        if len(json.dumps(capabilities, separators=(",", ":"))) > MAX_CAPABILITIES_BYTES:
            return None
        now = int(time.time())
        return self._sign(
            {"aud": self._session_aud, "sub": user, "pv": protocol_version, "caps": capabilities, "iat": now, "exp": now + SESSION_SECONDS},
            SESSION_TYP,
        )

    def open_session(self, session_id: str) -> AgentSession:
        payload = self._open(session_id, SESSION_TYP, self._session_aud)
        user, version, caps = payload.get("sub"), payload.get("pv"), payload.get("caps")
        if not isinstance(user, str) or not isinstance(version, str) or not isinstance(caps, dict):
            raise TokenError("malformed")
        return AgentSession(session_id, user, version, caps)

    def relay_id(self, replica: str, user: str) -> str:
        now = int(time.time())
        token = self._sign(
            {"aud": self._relay_aud, "sub": user, "r": replica, "n": secrets.token_hex(8), "iat": now, "exp": now + RELAY_SECONDS},
            RELAY_TYP,
        )
        return RELAY_PREFIX + token

    def open_relay_id(self, relay_id: str) -> RelayTarget:
        if not relay_id.startswith(RELAY_PREFIX):
            raise TokenError("malformed")
        payload = self._open(relay_id[len(RELAY_PREFIX):], RELAY_TYP, self._relay_aud)
        user, replica, nonce = payload.get("sub"), payload.get("r"), payload.get("n")
        if not isinstance(user, str) or not isinstance(replica, str) or not isinstance(nonce, str):
            raise TokenError("malformed")
        return RelayTarget(replica, user, nonce)

    def task_id(self, task: TaskRef) -> str:
        now = int(time.time())
        return self._sign(
            {"aud": self._task_aud, "sub": task.user, "c": task.connection, "t": task.upstream_id, "tool": task.tool,
             "iat": now, "exp": now + TASK_SECONDS},
            TASK_TYP,
        )

    def open_task_id(self, task_id: str) -> TaskRef:
        payload = self._open(task_id, TASK_TYP, self._task_aud)
        fields = payload.get("c"), payload.get("t"), payload.get("sub"), payload.get("tool")
        if not all(isinstance(f, str) for f in fields):
            raise TokenError("malformed")
        connection, upstream_id, user, tool = fields
        return TaskRef(str(connection), str(upstream_id), str(user), str(tool))

    def _sign(self, payload: dict[str, Any], typ: str) -> str:
        key = self._current().current
        return jwt.encode(payload, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid, "typ": typ})

    def _open(self, token: str, typ: str, audience: str) -> dict[str, Any]:
        header = unverified_header(token)
        if header.get("typ") != typ or header.get("alg") != ALGORITHM:
            raise TokenError("malformed")
        kid = header.get("kid")
        public = self._current().public_keys.get(kid) if isinstance(kid, str) else None
        if public is None:
            raise TokenError("unknown key")
        try:
            payload = jwt.decode(
                token, public, algorithms=[ALGORITHM], audience=audience, options={"require": ["aud", "sub", "exp"], "strict_aud": True}
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("expired") from None
        except jwt.InvalidTokenError:
            raise TokenError("malformed") from None
        if not isinstance(payload, dict):
            raise TokenError("malformed")
        return payload

    def _current(self) -> SigningKeys:
        return self._keys()
