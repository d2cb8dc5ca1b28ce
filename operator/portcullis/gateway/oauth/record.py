"""What the vault holds for one user's OAuth connection: the grant, and the flows under way.

One sealed value per (tenant, user, connection), as for a static secret, so the same binding
protects it: a record moved to another user or tenant does not open. The value is JSON:

    grant     the tokens (access, refresh), when the access token expires, the scopes granted,
              which client obtained them, when they were obtained and last refreshed; None until
              the user connects, and again once the grant is lost
    lost      why the last grant was dropped (refused at refresh, or by the upstream): the
              user must reconnect
    pending   connect flows started and not finished: state id -> PKCE verifier, client,
              redirect URI, expiry. The verifier never leaves the vault; the browser carries
              only the state id
    used      state ids already consumed, so a replayed callback is refused by name

Pending flows and used ids are few and short-lived (`FLOW_SECONDS`), and capped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT_KEY = "portcullis.dev/oauth"
FORMAT_VERSION = 1
FLOW_SECONDS = 600
"""How long a connect link (its state) stays valid."""
MAX_PENDING = 8
MAX_USED = 32
REFRESH_MARGIN_SECONDS = 60.0
"""Refresh this long before the access token expires (less for tokens that live shorter)."""


@dataclass
class Grant:
    access_token: str
    refresh_token: str | None
    expires_at: float | None
    """Epoch seconds; None when the server said nothing (used until the upstream refuses it)."""
    scope: str
    client_id: str
    obtained_at: float
    refreshed_at: float | None = None

    def due(self, now: float | None = None) -> bool:
        """Should the access token be refreshed before use?"""
        if self.expires_at is None:
            return False
        now = time.time() if now is None else now
        lifetime = self.expires_at - (self.refreshed_at or self.obtained_at)
        margin = min(REFRESH_MARGIN_SECONDS, max(lifetime * 0.25, 0.0))
        return now >= self.expires_at - margin

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and (time.time() if now is None else now) >= self.expires_at


@dataclass
class Pending:
    verifier: str
    client_id: str
    redirect_uri: str
    expires_at: float


@dataclass
class Record:
    grant: Grant | None = None
    lost: str | None = None
    pending: dict[str, Pending] = field(default_factory=dict)
    used: list[str] = field(default_factory=list)

    def start(self, state_id: str, pending: Pending, now: float) -> None:
        self.pending = {k: p for k, p in self.pending.items() if p.expires_at > now}
        while len(self.pending) >= MAX_PENDING:
            self.pending.pop(min(self.pending, key=lambda k: self.pending[k].expires_at))
        self.pending[state_id] = pending

    def consume(self, state_id: str) -> Pending | None:
        """Take a pending flow out (it is single use) and remember its id."""
        pending = self.pending.pop(state_id, None)
        if pending is not None:
            self.used = [*self.used, state_id][-MAX_USED:]
        return pending

    def lose(self, reason: str) -> None:
        self.grant, self.lost = None, reason

    def dumps(self) -> str:
        body: dict[str, Any] = {FORMAT_KEY: FORMAT_VERSION, **asdict(self)}
        return json.dumps(body, separators=(",", ":"), sort_keys=True)


def loads(text: str) -> Record | None:
    """The record in a vault value; None when the value is not one (e.g. a static secret)."""
    try:
        body = json.loads(text)
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get(FORMAT_KEY) != FORMAT_VERSION:
        return None
    try:
        grant = body.get("grant")
        return Record(
            grant=Grant(**grant) if isinstance(grant, dict) else None,
            lost=body.get("lost"),
            pending={k: Pending(**v) for k, v in (body.get("pending") or {}).items()},
            used=[str(u) for u in body.get("used") or []],
        )
    except TypeError:
        return None  # a record of another shape: treated as unreadable by the caller
