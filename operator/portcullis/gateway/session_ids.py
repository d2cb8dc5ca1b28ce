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
client and the gateway. The one exception is what a session id says about the
upstream sessions opened for it (upstream_sessions.py): the upstreams' session
ids are the upstreams' secrets, not the agent's, so they ride inside the signed
session id encrypted (`UpstreamSessionSeal`), under a key every replica derives
from the same signing key set, bound to the tenant, the server and the user.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import os
import secrets
import struct
import time
from collections.abc import Callable
from typing import Any, Final

import jwt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from portcullis.gateway.identity.tokens import ALGORITHM, SigningKeys, TokenError, unverified_header

SESSION_TYP: Final = "portcullis-session+jwt"
RELAY_TYP: Final = "portcullis-relay+jwt"
TASK_TYP: Final = "portcullis-task+jwt"
RELAY_PREFIX: Final = "portcullis-relay:"
"""The start of every JSON-RPC id the gateway gives a relayed request, so an answer is recognised at once."""
MAX_CAPABILITIES_BYTES: Final = 8192
MAX_UPSTREAM_SESSIONS_BYTES: Final = 1024
"""The most a session id carries of upstream sessions (before sealing: some 1.9 KB in the header at most)."""
MAX_UPSTREAM_SESSION_ID: Final = 256
# A session outlives no token that could use it; a relayed request waits at most this long for its answer.
SESSION_SECONDS: Final = 7 * 24 * 3600
RELAY_SECONDS: Final = 3600
OPENED_SESSIONS: Final = 10_000
"""Session ids whose check is remembered (per replica); more, and the memory starts again."""


@dataclasses.dataclass(frozen=True)
class AgentSession:
    """What a session id says: who opened it, at which protocol version, declaring what."""

    id: str
    user: str
    protocol_version: str
    capabilities: dict[str, Any]
    sealed: str | None = None
    """The upstream sessions opened for it at `initialize`, sealed (`UpstreamSessionSeal`), if any."""


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
        # Session ids already opened: (the key set and audience they were checked against, expiry,
        # the session). A session id is immutable, so only the clock, a new key set (a rotation or
        # a pruned key) or a new audience can change the answer; each sends it back to `_open`.
        self._opened: dict[str, tuple[SigningKeys, str, float, AgentSession]] = {}

    @property
    def _session_aud(self) -> str:
        return self._audience() + "#session"

    @property
    def _relay_aud(self) -> str:
        return self._audience() + "#relay"

    @property
    def _task_aud(self) -> str:
        return self._audience() + "#task"

    def issue_session(
        self, user: str, protocol_version: str, capabilities: dict[str, Any], sealed: str | None = None
    ) -> str | None:
        """A session id, or None when the capabilities are too large to carry (the session is then served without one).

        `sealed`: the upstream sessions opened for it (`UpstreamSessionSeal.seal`), carried as they are."""
        if not carries(capabilities):
            return None
        now = int(time.time())
        payload: dict[str, Any] = {
            "aud": self._session_aud, "sub": user, "pv": protocol_version, "caps": capabilities, "iat": now, "exp": now + SESSION_SECONDS,
        }
        if sealed is not None:
            payload["up"] = sealed
        return self._sign(payload, SESSION_TYP)

    def open_session(self, session_id: str) -> AgentSession:
        keys, audience = self._current(), self._session_aud
        opened = self._opened.get(session_id)
        if opened is not None and opened[0] is keys and opened[1] == audience and opened[2] > time.time():
            return opened[3]  # its signature (most of a session-era request's own cost) checked before
        payload = self._open(session_id, SESSION_TYP, audience)
        user, version, caps, sealed = payload.get("sub"), payload.get("pv"), payload.get("caps"), payload.get("up")
        if not isinstance(user, str) or not isinstance(version, str) or not isinstance(caps, dict):
            raise TokenError("malformed")
        if sealed is not None and not isinstance(sealed, str):
            raise TokenError("malformed")
        session = AgentSession(session_id, user, version, caps, sealed)
        if len(self._opened) >= OPENED_SESSIONS:
            self._opened.clear()
        self._opened[session_id] = (keys, audience, float(payload["exp"]), session)
        return session

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
        """The gateway's id for an upstream task: the same string whenever it is issued for the same
        task (EdDSA signs deterministically, and nothing here changes with time), so the id a
        `tasks/list` or a status notice names is the one the creating call answered. It carries no
        expiry: the upstream's own retention (the task's `ttl`) ends the task, every use is checked
        against the caller and the allowlist anew, and a key rotation ends it with the key."""
        return self._sign(
            {"aud": self._task_aud, "sub": task.user, "c": task.connection, "t": task.upstream_id, "tool": task.tool},
            TASK_TYP,
        )

    def open_task_id(self, task_id: str) -> TaskRef:
        payload = self._open(task_id, TASK_TYP, self._task_aud, required=("aud", "sub"))
        fields = payload.get("c"), payload.get("t"), payload.get("sub"), payload.get("tool")
        if not all(isinstance(f, str) for f in fields):
            raise TokenError("malformed")
        connection, upstream_id, user, tool = fields
        return TaskRef(str(connection), str(upstream_id), str(user), str(tool))

    def _sign(self, payload: dict[str, Any], typ: str) -> str:
        key = self._current().current
        return jwt.encode(payload, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid, "typ": typ})

    def _open(self, token: str, typ: str, audience: str, required: tuple[str, ...] = ("aud", "sub", "exp")) -> dict[str, Any]:
        header = unverified_header(token)
        if header.get("typ") != typ or header.get("alg") != ALGORITHM:
            raise TokenError("malformed")
        kid = header.get("kid")
        public = self._current().public_keys.get(kid) if isinstance(kid, str) else None
        if public is None:
            raise TokenError("unknown key")
        try:
            payload = jwt.decode(
                token, public, algorithms=[ALGORITHM], audience=audience, options={"require": list(required), "strict_aud": True}
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


def carries(capabilities: dict[str, Any]) -> bool:
    """Are these declared capabilities small enough for a session id to carry?"""
    return len(json.dumps(capabilities, separators=(",", ":"))) <= MAX_CAPABILITIES_BYTES


@dataclasses.dataclass(frozen=True)
class UpstreamSession:
    """One upstream session opened for an agent session: on which connection, at which URL."""

    connection: str
    session_id: str
    url: str


_SEAL_DOMAIN: Final = b"portcullis.upstream-sessions.v1\x00"
_NONCE_BYTES: Final = 12
_URL_DIGEST_CHARS: Final = 16


class UpstreamSessionSeal:
    """The upstream sessions of one agent session, encrypted for the gateway's replicas only.

    AES-256-GCM, under a key derived with HKDF-SHA256 from the private bytes of the current
    token signing key (each replica holds the same key set, so each derives the same key; the
    derivation's label keeps it apart from the signature's use of those bytes). The sealed form
    is `<kid>.<base64url(nonce || ciphertext || tag)>`: the kid names the signing key, so a
    session sealed before a rotation opens until that key is pruned. The associated data binds
    the tenant, the server (its URL) and the user, each length-prefixed; and the sealed text
    rides in the signed session id, so it cannot be moved to another session either. Each
    upstream session is kept with a digest of its connection's URL: a connection re-pointed at
    another upstream never receives the first one's session id.
    """

    def __init__(self, keys: Callable[[], SigningKeys], audience: Callable[[], str], tenant: Callable[[], str]):
        self._keys = keys
        self._audience = audience
        self._tenant = tenant
        self._derived: dict[tuple[str, str], AESGCM] = {}

    def seal(self, user: str, sessions: list[UpstreamSession]) -> tuple[str | None, list[UpstreamSession]]:
        """(the sealed text or None, the sessions it carries): those past `MAX_UPSTREAM_SESSIONS_BYTES` are left out."""
        carried = [s for s in sessions if _carriable(s.session_id)]
        while carried:
            plain = json.dumps([[s.connection, s.session_id, url_digest(s.url)] for s in carried], separators=(",", ":")).encode()
            if len(plain) <= MAX_UPSTREAM_SESSIONS_BYTES:
                break
            carried.pop()
        if not carried:
            return None, []
        key = self._keys().current
        nonce = os.urandom(_NONCE_BYTES)
        body = self._cipher(key.kid).encrypt(nonce, plain, self._bound(user))
        return f"{key.kid}.{base64.urlsafe_b64encode(nonce + body).decode('ascii').rstrip('=')}", carried

    def open(self, user: str, sealed: str) -> list[tuple[str, str, str]]:
        """(connection, upstream session id, URL digest) of each session carried; TokenError if it does not open here."""
        kid, _, text = sealed.partition(".")
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (binascii.Error, ValueError):
            raise TokenError("malformed") from None
        if len(raw) < _NONCE_BYTES + 16:
            raise TokenError("malformed")
        try:
            plain = self._cipher(kid).decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], self._bound(user))
            entries = json.loads(plain)
        except InvalidTag:
            raise TokenError("does not open") from None
        except ValueError:
            raise TokenError("malformed") from None
        if not isinstance(entries, list) or not all(
            isinstance(e, list) and len(e) == 3 and all(isinstance(p, str) for p in e) for e in entries
        ):
            raise TokenError("malformed")
        return [(str(c), str(i), str(u)) for c, i, u in entries]

    def _bound(self, user: str) -> bytes:
        out = bytearray(_SEAL_DOMAIN)
        for part in (self._tenant(), self._audience(), user):
            raw = part.encode("utf-8")
            out += struct.pack(">I", len(raw)) + raw
        return bytes(out)

    def _cipher(self, kid: str) -> AESGCM:
        audience = self._audience()
        cipher = self._derived.get((kid, audience))
        if cipher is None:
            key = next((k for k in self._keys().keys if k.kid == kid), None)
            if key is None:
                raise TokenError("unknown key")
            seed = key.private_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
            derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SEAL_DOMAIN, info=audience.encode("utf-8")).derive(seed)
            if len(self._derived) > 64:  # a handful of keys and one audience in practice
                self._derived.clear()
            cipher = self._derived[(kid, audience)] = AESGCM(derived)
        return cipher


def url_digest(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:_URL_DIGEST_CHARS]


def _carriable(session_id: str) -> bool:
    """A session id as the transport allows it (visible ASCII), and of a sane length."""
    return 0 < len(session_id) <= MAX_UPSTREAM_SESSION_ID and all(0x21 <= ord(c) <= 0x7E for c in session_id)
