"""The emulator's additions to kmock behave as the API server does."""

from __future__ import annotations

import pytest

from tests.support.kmock_support import emulator

CM = "/api/v1/namespaces/acme/configmaps"
JSON_PATCH = {"Content-Type": "application/json-patch+json"}


@pytest.mark.anyio
async def test_a_failed_json_patch_test_is_422_and_a_passing_one_applies() -> None:
    async with emulator() as k8s:
        async with k8s.post(CM, json={"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "one"}}) as response:
            version = (await response.json())["metadata"]["resourceVersion"]
        stale = [{"op": "test", "path": "/metadata/resourceVersion", "value": "stale"},
                 {"op": "add", "path": "/data", "value": {"a": "1"}}]
        async with k8s.patch(f"{CM}/one", json=stale, headers=JSON_PATCH) as response:
            assert response.status == 422
        fresh = [{**stale[0], "value": version}, stale[1]]
        async with k8s.patch(f"{CM}/one", json=fresh, headers=JSON_PATCH) as response:
            assert response.status == 200
            assert (await response.json())["data"] == {"a": "1"}


@pytest.mark.anyio
async def test_reactions_a_test_adds_still_answer_and_the_log_stays_whole() -> None:
    async with emulator() as k8s:
        k8s["post /apis/authentication.k8s.io/v1/tokenreviews"] << {"status": {"authenticated": True}}
        for _ in range(3):
            async with k8s.get(f"{CM}/missing") as response:
                assert response.status == 404
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": "t"}}
        async with k8s.post("/apis/authentication.k8s.io/v1/tokenreviews", json=review) as response:
            assert (await response.json()) == {"status": {"authenticated": True}}
        assert [r.method.value for r in k8s] == ["GET", "GET", "GET", "POST"]
