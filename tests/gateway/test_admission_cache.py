"""The admin API's TokenReview and SubjectAccessReview answers are reused for a short time:
allowed ones for `ALLOWED_TTL` seconds, refusals not at all, and never keyed by the raw token.

The reviews are answered by the emulator (as in test_admission); the caches' clock is virtual.
"""

from __future__ import annotations

import hashlib

import pytest

from portcullis.gateway.identity.admission import ALLOWED_TTL, KubernetesAdminAuth
from portcullis.kube import KubeClient
from tests.gateway.test_admission import ALLOWED, TOKENS, _serve_reviews
from tests.support.kmock_support import Emulator, emulator

pytestmark = pytest.mark.anyio
MINTER = "system:serviceaccount:agents:runner"


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def reviews(k8s: Emulator) -> dict[str, int]:
    posted = [str(r.url) for r in k8s if str(getattr(r.method, "value", r.method)).upper() == "POST"]
    return {
        "token": sum("tokenreviews" in url for url in posted),
        "access": sum("subjectaccessreviews" in url for url in posted),
    }


async def test_an_allowed_caller_is_reviewed_once_per_ttl_not_once_per_request() -> None:
    clock = Clock()
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        _serve_reviews(k8s)
        auth = KubernetesAdminAuth(client, namespace="acme", server="summarizer", clock=clock)
        for _ in range(25):
            assert await auth.authorize("good-token", "mint") == MINTER
        assert reviews(k8s) == {"token": 1, "access": 1}

        clock.now += ALLOWED_TTL - 0.5
        assert await auth.authorize("good-token", "mint") == MINTER
        assert reviews(k8s) == {"token": 1, "access": 1}

        clock.now += 0.5  # expired: asked again
        assert await auth.authorize("good-token", "mint") == MINTER
        assert reviews(k8s) == {"token": 2, "access": 2}


async def test_refusals_are_asked_again_every_time() -> None:
    clock = Clock()
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        _serve_reviews(k8s)
        auth = KubernetesAdminAuth(client, namespace="acme", server="summarizer", clock=clock)
        for _ in range(3):
            assert await auth.authorize("stolen-token", "mint") is None  # not authenticated
        assert reviews(k8s) == {"token": 3, "access": 0}
        for _ in range(3):
            assert await auth.authorize("good-token", "revoke") is None  # authenticated, not allowed
        assert reviews(k8s) == {"token": 4, "access": 3}  # the identity is reused, the refusal is not


async def test_a_permission_granted_takes_effect_at_the_next_request() -> None:
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        _serve_reviews(k8s)
        auth = KubernetesAdminAuth(client, namespace="acme", server="summarizer")
        assert await auth.authorize("good-token", "audit") is None
        ALLOWED.add((MINTER, "audit", "acme", "summarizer"))
        try:
            assert await auth.authorize("good-token", "audit") == MINTER
        finally:
            ALLOWED.discard((MINTER, "audit", "acme", "summarizer"))


async def test_the_cache_never_holds_a_token_nor_a_plain_hash_of_one() -> None:
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        _serve_reviews(k8s)
        one = KubernetesAdminAuth(client, namespace="acme", server="summarizer")
        two = KubernetesAdminAuth(client, namespace="acme", server="summarizer")
        assert await one.authorize("good-token", "mint") == MINTER
        assert await two.authorize("good-token", "mint") == MINTER
        keys = one.tokens.keys()
        assert len(keys) == 1
        assert keys[0] not in (b"good-token", hashlib.sha256(b"good-token").digest())
        assert keys != two.tokens.keys()  # keyed under a per-process random key
        assert all("good-token" not in key for key in one.access.keys())


async def test_caller_identities_are_kept_apart() -> None:
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        _serve_reviews(k8s)
        auth = KubernetesAdminAuth(client, namespace="acme", server="summarizer")
        assert await auth.authorize("good-token", "mint") == MINTER
        # The auditor is authenticated separately and is not allowed to mint on the minter's answer.
        assert await auth.authorize("auditor-token", "mint") is None
        assert await auth.authorize("auditor-token", "audit") == TOKENS["auditor-token"]["username"]
        assert await auth.authorize("good-token", "audit") is None
