"""Who may use the gateway's admin port.

One protocol, ``AdminAuth.authorize(bearer_token, action) -> identity | None``, two answers:

- In a cluster, ``KubernetesAdminAuth``: the caller presents its ServiceAccount (or any
  Kubernetes) token; a TokenReview (authentication.k8s.io/v1) says who it is, and a
  SubjectAccessReview (authorization.k8s.io/v1) asks whether that identity may perform the
  custom verb ``<action>`` (e.g. ``mint``) on ``virtualmcpservers/<server>`` in group
  ``portcullis.dev``. Who may mint is therefore plain RBAC, e.g. a Role granting
  ``verbs: [mint]`` on ``virtualmcpservers`` with ``resourceNames: [summarizer]``.
  The gateway's own ServiceAccount needs ``system:auth-delegator`` to post both reviews.
- Locally, ``SecretAdminAuth``: one shared client secret, compared in constant time.

Failures of the review calls propagate (the admin API answers 5xx); a denial is ``None``.

Answers the API server gave are kept for a short time (`ReviewCache`), so a caller minting
in a loop costs the control plane one pair of reviews per ``ALLOWED_TTL`` seconds, not a pair
per request: a TokenReview that authenticated, and a SubjectAccessReview that allowed, are
reused for ``ALLOWED_TTL`` (10 s). Refusals are not kept (``DENIED_TTL`` = 0): a token that
did not authenticate, or an identity RBAC did not allow, is asked about again at its next
request, so a permission granted takes effect at once. What this costs: a token revoked (its
ServiceAccount or Secret deleted, or simply expired) and a permission withdrawn keep working
for at most ``ALLOWED_TTL`` seconds on each replica that saw them allowed. Tokens are keyed by
an HMAC under a random per-process key, never by the token itself, so the cache holds nothing
that could be presented to this gateway or to the API server. Each cache is bounded
(``REVIEW_ENTRIES``, the oldest entry goes first), and errors are never kept.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

from portcullis.kube import KubeClient

GROUP = "portcullis.dev"
RESOURCE = "virtualmcpservers"
_VERB = re.compile(r"[a-z][a-z-]{0,62}")
ALLOWED_TTL = 10.0
"""Seconds an authenticated TokenReview and an allowing SubjectAccessReview are reused."""
DENIED_TTL = 0.0
"""Seconds a refusal is reused: not at all."""
REVIEW_ENTRIES = 1024

K = TypeVar("K")
V = TypeVar("V")
Reviewed = tuple[str, list[str], str | None, dict[str, Any]]
"""(username, groups, uid, extra) as a TokenReview vouched for them."""


class ReviewCache(Generic[K, V]):
    """Answers kept until their time is up; bounded, the oldest entry evicted first."""

    def __init__(self, *, capacity: int = REVIEW_ENTRIES, clock: Callable[[], float] = time.monotonic) -> None:
        self._capacity = capacity
        self._clock = clock
        self._entries: dict[K, tuple[float, V]] = {}

    def get(self, key: K) -> tuple[bool, V | None]:
        """(found, answer)."""
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        if self._clock() >= entry[0]:
            del self._entries[key]
            return False, None
        return True, entry[1]

    def put(self, key: K, value: V, ttl: float) -> None:
        if ttl <= 0:
            return
        entries = self._entries
        entries.pop(key, None)
        while len(entries) >= self._capacity:
            del entries[next(iter(entries))]
        entries[key] = (self._clock() + ttl, value)

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[K]:
        return list(self._entries)


class AdminAuth(Protocol):
    async def authorize(self, bearer_token: str | None, action: str) -> str | None:
        """The caller's identity if it may perform ``action``, else None."""
        ...


class KubernetesAdminAuth:
    """TokenReview for identity, SubjectAccessReview for permission."""

    def __init__(
        self,
        client: KubeClient,
        *,
        namespace: str | None = None,
        server: str | None = None,
        allowed_ttl: float = ALLOWED_TTL,
        denied_ttl: float = DENIED_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # namespace/server name the VirtualMCPServer that ``authorize`` asks about.
        self._client = client
        self._namespace = namespace
        self._server = server
        self._allowed_ttl = allowed_ttl
        self._denied_ttl = denied_ttl
        self._token_key = os.urandom(32)
        """Keys the token cache: an HMAC of the token, so no token (nor a plain hash of one) is kept."""
        self.tokens: ReviewCache[bytes, Reviewed | None] = ReviewCache(clock=clock)
        self.access: ReviewCache[str, bool] = ReviewCache(clock=clock)

    def _token_id(self, bearer_token: str) -> bytes:
        return hmac.new(self._token_key, bearer_token.encode("utf-8"), hashlib.sha256).digest()

    async def _review(self, bearer_token: str) -> Reviewed | None:
        key = self._token_id(bearer_token)
        found, reviewed = self.tokens.get(key)
        if found:
            return reviewed
        reviewed = await self._ask_token_review(bearer_token)
        self.tokens.put(key, reviewed, self._denied_ttl if reviewed is None else self._allowed_ttl)
        return reviewed

    async def _ask_token_review(self, bearer_token: str) -> Reviewed | None:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": bearer_token},
        }
        result = await self._client.post("/apis/authentication.k8s.io/v1/tokenreviews", body)
        status = result.get("status") or {}
        user = status.get("user") or {}
        username = user.get("username")
        if status.get("authenticated") is not True or not isinstance(username, str) or not username:
            return None
        groups = [g for g in user.get("groups") or [] if isinstance(g, str)]
        uid = user.get("uid")
        extra = user.get("extra")
        return (
            username, groups, uid if isinstance(uid, str) else None, extra if isinstance(extra, dict) else {}
        )

    async def authenticate(self, bearer_token: str) -> str | None:
        """The username the API server vouches for, or None."""
        reviewed = await self._review(bearer_token)
        return reviewed[0] if reviewed else None

    async def may(
        self,
        username: str,
        groups: Sequence[str],
        verb: str,
        namespace: str,
        server: str,
        *,
        uid: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> bool:
        """Whether RBAC (or any authorizer) allows ``verb`` on ``virtualmcpservers/<server>``."""
        spec: dict[str, Any] = {
            "user": username,
            "groups": list(groups),
            "resourceAttributes": {
                "group": GROUP, "resource": RESOURCE, "verb": verb, "namespace": namespace, "name": server,
            },
        }
        if uid:
            spec["uid"] = uid
        if extra:
            spec["extra"] = dict(extra)
        key = json.dumps(spec, sort_keys=True, separators=(",", ":"))  # who, what, where: no token in it
        found, allowed = self.access.get(key)
        if found:
            return bool(allowed)
        body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec}
        result = await self._client.post("/apis/authorization.k8s.io/v1/subjectaccessreviews", body)
        status = result.get("status") or {}
        allowed = status.get("allowed") is True and status.get("denied") is not True
        self.access.put(key, allowed, self._allowed_ttl if allowed else self._denied_ttl)
        return allowed

    async def may_mint(self, username: str, groups: Sequence[str], namespace: str, server: str) -> bool:
        return await self.may(username, groups, "mint", namespace, server)

    async def authorize(self, bearer_token: str | None, action: str) -> str | None:
        if self._namespace is None or self._server is None:
            raise RuntimeError("KubernetesAdminAuth needs namespace= and server= to authorize")
        if not bearer_token or not _VERB.fullmatch(action):
            return None
        reviewed = await self._review(bearer_token)
        if reviewed is None:
            return None
        username, groups, uid, extra = reviewed
        allowed = await self.may(username, groups, action, self._namespace, self._server, uid=uid, extra=extra)
        return username if allowed else None


class SecretAdminAuth:
    """One client secret for every admin action (local runs)."""

    def __init__(self, secret: str, *, identity: str = "local-admin") -> None:
        if len(secret) < 16:
            raise ValueError("the admin secret must be at least 16 characters")
        self._secret = secret.encode("utf-8")
        self._identity = identity

    async def authorize(self, bearer_token: str | None, action: str) -> str | None:
        if not bearer_token:
            return None
        # Constant time: the comparison must not reveal how much of a guess was right.
        if hmac.compare_digest(bearer_token.encode("utf-8"), self._secret):
            return self._identity
        return None
