"""`Vault.exclusive`: one holder at a time per credential, across stores that share one backend.

Two store objects over the same backend stand for two replicas (two processes on one state
directory, two pods on one API server). Each holder records when it enters and leaves, and
yields to the event loop while holding, so any overlap would show in the record.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path

import pytest

from portcullis.kube import KubeClient
from portcullis.vault.base import LockTimeout, Vault
from portcullis.vault.kubernetes import LOCKS_ANNOTATION, KubernetesVault, credential_secret_name
from tests.support.kmock_support import emulator
from tests.support.vaults import KINDS, NS, two_handles



async def hold(vault: Vault, log: list[str], name: str, connection: str = "gmail") -> None:
    async with vault.exclusive("acme", "ada", connection):
        log.append(f"+{name}")
        await asyncio.sleep(0.02)
        log.append(f"-{name}")


@pytest.mark.anyio
@pytest.mark.parametrize("kind", KINDS)
async def test_holders_never_overlap(kind: str, tmp_path: Path) -> None:
    async with two_handles(kind, tmp_path) as (one, two):
        await one.put("acme", "ada", "gmail", "value")  # the cluster lease lives on the user's Secret
        log: list[str] = []
        await asyncio.gather(*(hold(vault, log, f"{i}") for i, vault in enumerate([one, two] * 3)))
        assert len(log) == 12
        for i in range(0, 12, 2):
            assert log[i][0] == "+" and log[i + 1] == "-" + log[i][1:], log
        assert await two.get("acme", "ada", "gmail") == "value"  # the lease left the value alone


@pytest.mark.anyio
@pytest.mark.parametrize("kind", KINDS)
async def test_other_connections_and_users_are_not_held_up(kind: str, tmp_path: Path) -> None:
    async with two_handles(kind, tmp_path) as (one, two):
        async with one.exclusive("acme", "ada", "gmail"):
            async with asyncio.timeout(5):
                async with two.exclusive("acme", "ada", "slack"), two.exclusive("acme", "grace", "gmail"):
                    pass


@pytest.mark.anyio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_holder_that_never_lets_go_times_the_others_out(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("portcullis.vault.base", "portcullis.vault.local", "portcullis.vault.kubernetes"):
        monkeypatch.setattr(f"{module}.LOCK_WAIT_SECONDS", 0.3)
    async with two_handles(kind, tmp_path) as (one, two):
        async with one.exclusive("acme", "ada", "gmail"):
            with pytest.raises(LockTimeout, match="gmail"):
                async with two.exclusive("acme", "ada", "gmail"):
                    pass
        async with two.exclusive("acme", "ada", "gmail"):  # free again once let go
            pass


@pytest.mark.anyio
async def test_a_dead_replicas_lease_expires() -> None:
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        vault = KubernetesVault(client, NS)
        await vault.put("acme", "ada", "gmail", "value")
        path = f"/api/v1/namespaces/{NS}/secrets/{credential_secret_name('ada')}"
        stale = {"gmail": {"holder": "gone", "until": time.time() - 1}}
        await client.merge_patch(path, {"metadata": {"annotations": {LOCKS_ANNOTATION: json.dumps(stale)}}})
        async with asyncio.timeout(5):
            async with vault.exclusive("acme", "ada", "gmail"):
                secret = await client.get(path)
                assert secret is not None
                held = json.loads(secret["metadata"]["annotations"][LOCKS_ANNOTATION])
                assert held["gmail"]["holder"] != "gone"
        secret = await client.get(path)
        assert secret is not None and LOCKS_ANNOTATION not in secret["metadata"]["annotations"]
        assert base64.b64decode(secret["data"]["gmail"])  # still there


@pytest.mark.anyio
async def test_a_lease_on_a_user_with_no_secret_yet_creates_it() -> None:
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        vault = KubernetesVault(client, NS)
        async with vault.exclusive("acme", "newcomer", "gmail"):
            await vault.put("acme", "newcomer", "gmail", "value")
        assert await vault.get("acme", "newcomer", "gmail") == "value"
        assert await vault.connections_of("acme", "newcomer") == ["gmail"]

