from __future__ import annotations

from typing import Any

import pytest

from portcullis.gateway.identity.admission import AdminAuth, KubernetesAdminAuth, SecretAdminAuth
from portcullis.kube import KubeClient, KubeError
from tests.support.kmock_support import Emulator, emulator

TOKENS = {
    "good-token": {"username": "system:serviceaccount:agents:runner", "uid": "u-1",
                   "groups": ["system:serviceaccounts", "system:serviceaccounts:agents"]},
    "auditor-token": {"username": "system:serviceaccount:acme:auditor", "uid": "u-2", "groups": ["system:serviceaccounts"]},
}
# (user, verb, namespace, name) tuples that RBAC would allow.
ALLOWED = {
    ("system:serviceaccount:agents:runner", "mint", "acme", "summarizer"),
    ("system:serviceaccount:acme:auditor", "audit", "acme", "summarizer"),
}


def _token_review(request: Any) -> dict[str, Any]:
    user = TOKENS.get(request.data["spec"]["token"])
    status: dict[str, Any] = {"authenticated": True, "user": user} if user else {"authenticated": False}
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status}


def _access_review(request: Any) -> dict[str, Any]:
    spec = request.data["spec"]
    attrs = spec["resourceAttributes"]
    assert attrs["group"] == "portcullis.dev" and attrs["resource"] == "virtualmcpservers"
    assert "system:serviceaccounts" in spec["groups"]
    allowed = (spec["user"], attrs["verb"], attrs["namespace"], attrs["name"]) in ALLOWED
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "status": {"allowed": allowed}}


def _serve_reviews(k8s: Emulator) -> None:
    k8s["post /apis/authentication.k8s.io/v1/tokenreviews"] << _token_review
    k8s["post /apis/authorization.k8s.io/v1/subjectaccessreviews"] << _access_review


@pytest.mark.anyio
async def test_token_review_names_the_caller_or_nobody() -> None:
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        _serve_reviews(k8s)
        auth = KubernetesAdminAuth(client)
        assert await auth.authenticate("good-token") == "system:serviceaccount:agents:runner"
        assert await auth.authenticate("stolen-token") is None


@pytest.mark.anyio
async def test_subject_access_review_allows_and_denies_minting() -> None:
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        _serve_reviews(k8s)
        auth = KubernetesAdminAuth(client)
        groups = ["system:serviceaccounts"]
        assert await auth.may_mint("system:serviceaccount:agents:runner", groups, "acme", "summarizer") is True
        assert await auth.may_mint("system:serviceaccount:agents:runner", groups, "acme", "other") is False
        assert await auth.may_mint("system:serviceaccount:agents:intruder", groups, "acme", "summarizer") is False


@pytest.mark.anyio
async def test_authorize_combines_both_reviews() -> None:
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        _serve_reviews(k8s)
        auth: AdminAuth = KubernetesAdminAuth(client, namespace="acme", server="summarizer")
        assert await auth.authorize("good-token", "mint") == "system:serviceaccount:agents:runner"
        assert await auth.authorize("good-token", "revoke") is None  # RBAC grants mint only
        assert await auth.authorize("stolen-token", "mint") is None
        assert await auth.authorize(None, "mint") is None
        other: AdminAuth = KubernetesAdminAuth(client, namespace="acme", server="other")
        assert await other.authorize("good-token", "mint") is None
        reviews = [r for r in k8s if r.method == "POST"]
        assert reviews and all(r.data["spec"].get("token") != "x" for r in reviews)


@pytest.mark.anyio
async def test_reading_the_audit_log_is_its_own_verb() -> None:
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        _serve_reviews(k8s)
        auth: AdminAuth = KubernetesAdminAuth(client, namespace="acme", server="summarizer")
        assert await auth.authorize("auditor-token", "audit") == "system:serviceaccount:acme:auditor"
        assert await auth.authorize("auditor-token", "mint") is None
        assert await auth.authorize("good-token", "audit") is None  # a minter cannot read the log


@pytest.mark.anyio
async def test_review_failures_are_errors_not_denials() -> None:
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        k8s["post /apis/authentication.k8s.io/v1/tokenreviews"] << 403
        with pytest.raises(KubeError):
            await KubernetesAdminAuth(client, namespace="acme", server="s").authorize("good-token", "mint")


@pytest.mark.anyio
async def test_secret_admin_auth_accepts_only_the_secret() -> None:
    secret = "s3cret-s3cret-s3cret"
    auth: AdminAuth = SecretAdminAuth(secret)
    assert await auth.authorize(secret, "mint") == "local-admin"
    assert await auth.authorize(secret[:-1], "mint") is None
    assert await auth.authorize(secret + "x", "mint") is None
    assert await auth.authorize("", "mint") is None
    assert await auth.authorize(None, "mint") is None


def test_a_short_admin_secret_is_refused() -> None:
    with pytest.raises(ValueError):
        SecretAdminAuth("short")
