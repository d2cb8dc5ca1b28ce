from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from portcullis.gateway.identity.revocation import (
    FILE_RECHECK_SECONDS,
    FileRevocations,
    KubernetesRevocations,
    MemoryRevocations,
    RevocationStore,
    user_key,
)
from portcullis.gateway.identity.tokens import SessionClaims
from portcullis.kube import KubeClient
from tests.support.kmock_support import emulator

NOW = int(time.time())


def _claims(jti: str = "j1", user: str = "alice@example.com", iat: int = NOW) -> SessionClaims:
    return SessionClaims(iss="i", aud="a", sub=user, tenant="acme", exp=iat + 900, iat=iat, jti=jti)


async def _behaves_as_a_revocation_store(store: RevocationStore) -> None:
    assert not store.is_revoked(_claims())
    await store.revoke_token("j1", NOW + 900)
    assert store.is_revoked(_claims("j1"))
    assert not store.is_revoked(_claims("j2"))
    await store.revoke_user("bob", NOW)
    assert store.is_revoked(_claims("j3", "bob", iat=NOW - 10))
    assert store.is_revoked(_claims("j4", "bob", iat=NOW))
    assert not store.is_revoked(_claims("j5", "bob", iat=NOW + 1))  # minted after: valid
    assert not store.is_revoked(_claims("j6", "alice@example.com", iat=NOW - 10))
    with pytest.raises(ValueError):
        await store.revoke_token("not a jti!", NOW)


@pytest.mark.anyio
async def test_memory_revocations() -> None:
    await _behaves_as_a_revocation_store(MemoryRevocations())


@pytest.mark.anyio
async def test_file_revocations(tmp_path: Path) -> None:
    await _behaves_as_a_revocation_store(FileRevocations(tmp_path / "revocations.json"))
    assert stat.S_IMODE((tmp_path / "revocations.json").stat().st_mode) == 0o600


@pytest.mark.anyio
async def test_a_file_revocation_by_another_process_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "revocations.json"
    gateway, cli = FileRevocations(path), FileRevocations(path)

    async def seen(claims: SessionClaims, revoked: bool) -> None:
        # Another process's write is seen once the file is looked at again (FILE_RECHECK_SECONDS).
        with anyio.fail_after(5):
            while gateway.is_revoked(claims) is not revoked:
                await anyio.sleep(0.01)

    assert not gateway.is_revoked(_claims("j1"))
    await cli.revoke_token("j1", NOW + 900)
    await seen(_claims("j1"), True)
    await cli.revoke_user("alice@example.com", NOW)
    await seen(_claims("j9"), True)
    os.unlink(path)
    await seen(_claims("j1"), False)


@pytest.mark.anyio
async def test_the_revocation_file_is_not_looked_at_on_every_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "revocations.json"
    gateway = FileRevocations(path)
    await FileRevocations(path).revoke_token("j1", NOW + 900)
    looked = 0
    real_stat = os.stat

    def counting_stat(*args: Any, **kwargs: Any) -> os.stat_result:
        nonlocal looked
        looked += 1
        return real_stat(*args, **kwargs)

    clock = [1000.0]
    monkeypatch.setattr("portcullis.gateway.identity.revocation.time.monotonic", lambda: clock[0])
    monkeypatch.setattr("portcullis.gateway.identity.revocation.os.stat", counting_stat)
    assert all(gateway.is_revoked(_claims("j1")) for _ in range(1000))
    assert looked == 1  # 1,000 checks within FILE_RECHECK_SECONDS: the file is looked at once
    clock[0] += 2 * FILE_RECHECK_SECONDS
    assert gateway.is_revoked(_claims("j1")) and looked == 2
    await gateway.revoke_token("j2", NOW + 900)
    assert gateway.is_revoked(_claims("j2"))  # its own revocation applies at once, whatever the clock


@pytest.mark.anyio
async def test_expired_token_entries_are_pruned_on_write(tmp_path: Path) -> None:
    path = tmp_path / "revocations.json"
    store = FileRevocations(path)
    await store.revoke_token("old", NOW - 100)
    await store.revoke_token("new", NOW + 900)
    assert set(json.loads(path.read_text())["tokens"]) == {"new"}


@pytest.mark.anyio
async def test_kubernetes_revocations_behave_as_a_store() -> None:
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        await _behaves_as_a_revocation_store(KubernetesRevocations(client, "acme", "summarizer-revocations"))
        cm = await client.get("/api/v1/namespaces/acme/configmaps/summarizer-revocations")
        assert cm is not None
        assert cm["data"] == {"jti.j1": str(NOW + 900), f"user.{user_key('bob')}": str(NOW)}


@pytest.mark.anyio
async def test_a_revocation_reaches_another_replica_through_the_watch() -> None:
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        await client.create("/api/v1/namespaces/acme/configmaps", {"metadata": {"name": "s-revocations"}})
        writer = KubernetesRevocations(client, "acme", "s-revocations")
        replica = KubernetesRevocations(client, "acme", "s-revocations")
        async with anyio.create_task_group() as tg:
            tg.start_soon(replica.run)
            with anyio.fail_after(5):
                await replica.wait_synced()
                await writer.revoke_token("j1", NOW + 900)
                await writer.revoke_user("carol", NOW)
                while True:
                    change = replica.next_change()
                    if replica.is_revoked(_claims("j1")) and replica.is_revoked(_claims("jx", "carol")):
                        break
                    await change.wait()
            tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_replica_starting_later_reads_existing_revocations() -> None:
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        await KubernetesRevocations(client, "acme", "s-revocations").revoke_token("j1", NOW + 900)
        replica = KubernetesRevocations(client, "acme", "s-revocations")
        assert not replica.synced
        async with anyio.create_task_group() as tg:
            tg.start_soon(replica.run)
            with anyio.fail_after(5):
                await replica.wait_synced()
            assert replica.is_revoked(_claims("j1"))
            tg.cancel_scope.cancel()
