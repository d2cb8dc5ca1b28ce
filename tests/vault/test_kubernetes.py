from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest

from portcullis.kube import KubeClient
from portcullis.vault.kubernetes import KubernetesVault, credential_secret_name
from portcullis.vault.sealing import SealError
from tests.support.kmock_support import emulator

NS = "acme-vault"


async def _secret(client: KubeClient, name: str) -> dict[str, Any] | None:
    return await client.get(f"/api/v1/namespaces/{NS}/secrets/{name}")


@pytest.mark.anyio
async def test_put_creates_the_tenant_key_and_one_secret_per_user() -> None:
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        vault = KubernetesVault(client, NS)
        assert await vault.get("acme", "alice@example.com", "gmail") is None
        await vault.put("acme", "alice@example.com", "gmail", "g-secret")
        await vault.put("acme", "alice@example.com", "slack", "s-secret")

        key_secret = await _secret(client, "portcullis-tenant-key")
        assert key_secret is not None
        assert len(base64.b64decode(key_secret["data"]["key"])) == 32

        name = "portcullis-cred-" + hashlib.sha256(b"alice@example.com").hexdigest()[:16]
        assert credential_secret_name("alice@example.com") == name
        cred = await _secret(client, name)
        assert cred is not None
        assert cred["metadata"]["labels"]["portcullis.dev/credential"] == "true"
        assert cred["metadata"]["annotations"] == {"portcullis.dev/user": "alice@example.com"}
        assert set(cred["data"]) == {"gmail", "slack"}
        assert b"g-secret" not in base64.b64decode(cred["data"]["gmail"])

        assert await vault.get("acme", "alice@example.com", "gmail") == "g-secret"
        assert await vault.connections_of("acme", "alice@example.com") == ["gmail", "slack"]


@pytest.mark.anyio
async def test_a_second_replica_reads_with_the_same_tenant_key() -> None:
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        await KubernetesVault(client, NS).put("acme", "alice", "gmail", "g-secret")
        assert await KubernetesVault(client, NS).get("acme", "alice", "gmail") == "g-secret"


@pytest.mark.anyio
async def test_delete_removes_one_key_then_the_secret() -> None:
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        vault = KubernetesVault(client, NS)
        await vault.put("acme", "alice", "gmail", "g")
        await vault.put("acme", "alice", "slack", "s")
        assert await vault.delete("acme", "alice", "gmail") is True
        assert await vault.get("acme", "alice", "gmail") is None
        assert await vault.connections_of("acme", "alice") == ["slack"]
        assert await vault.delete("acme", "alice", "gmail") is False
        assert await vault.delete("acme", "alice", "slack") is True
        assert await _secret(client, credential_secret_name("alice")) is None
        assert await vault.connections_of("acme", "alice") == []


@pytest.mark.anyio
async def test_deleting_the_secret_cuts_access_at_the_next_get() -> None:
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        vault = KubernetesVault(client, NS)
        await vault.put("acme", "alice", "gmail", "g")
        assert await vault.get("acme", "alice", "gmail") == "g"
        await client.delete(f"/api/v1/namespaces/{NS}/secrets/{credential_secret_name('alice')}")
        assert await vault.get("acme", "alice", "gmail") is None


@pytest.mark.anyio
async def test_a_value_copied_into_another_users_secret_does_not_open() -> None:
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        vault = KubernetesVault(client, NS)
        await vault.put("acme", "alice", "gmail", "alice-secret")
        await vault.put("acme", "bob", "gmail", "bob-secret")
        alice = await _secret(client, credential_secret_name("alice"))
        assert alice is not None
        await client.merge_patch(
            f"/api/v1/namespaces/{NS}/secrets/{credential_secret_name('bob')}",
            {"data": {"gmail": alice["data"]["gmail"]}},
        )
        with pytest.raises(SealError) as err:
            await vault.get("acme", "bob", "gmail")
        assert "alice-secret" not in str(err.value)
        # And a different tenant reading the same slot does not open it either.
        with pytest.raises(SealError):
            await vault.get("globex", "alice", "gmail")


@pytest.mark.anyio
async def test_a_secret_annotated_for_another_user_reads_as_absent() -> None:
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        vault = KubernetesVault(client, NS)
        await vault.put("acme", "alice", "gmail", "g")
        await client.merge_patch(
            f"/api/v1/namespaces/{NS}/secrets/{credential_secret_name('alice')}",
            {"metadata": {"annotations": {"portcullis.dev/user": "mallory"}}},
        )
        assert await vault.get("acme", "alice", "gmail") is None


@pytest.mark.anyio
async def test_the_tenant_key_can_live_in_a_secret_of_its_own_name() -> None:
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        vault = KubernetesVault(client, NS, key_secret="acme-sealing-key")
        await vault.put("acme", "alice@example.com", "gmail", "g-secret")
        assert await _secret(client, "acme-sealing-key") is not None
        assert await _secret(client, "portcullis-tenant-key") is None
        assert await KubernetesVault(client, NS, key_secret="acme-sealing-key").get("acme", "alice@example.com", "gmail") == "g-secret"
        with pytest.raises(SealError, match="portcullis-tenant-key is missing"):
            await KubernetesVault(client, NS).get("acme", "alice@example.com", "gmail")
