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
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from portcullis.kube import KubeClient

GROUP = "portcullis.dev"
RESOURCE = "virtualmcpservers"
_VERB = re.compile(r"[a-z][a-z-]{0,62}")


class AdminAuth(Protocol):
    async def authorize(self, bearer_token: str | None, action: str) -> str | None:
        """The caller's identity if it may perform ``action``, else None."""
        ...


class KubernetesAdminAuth:
    """TokenReview for identity, SubjectAccessReview for permission."""

    def __init__(self, client: KubeClient, *, namespace: str | None = None, server: str | None = None) -> None:
        # namespace/server name the VirtualMCPServer that ``authorize`` asks about.
        self._client = client
        self._namespace = namespace
        self._server = server

    async def _review(self, bearer_token: str) -> tuple[str, list[str], str | None, dict[str, Any]] | None:
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
        body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec}
        result = await self._client.post("/apis/authorization.k8s.io/v1/subjectaccessreviews", body)
        status = result.get("status") or {}
        return status.get("allowed") is True and status.get("denied") is not True

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
