"""The Kubernetes vault served from its watch, in the emulator: reads cost no API request once
the copy has synced, and what other replicas write or delete reaches it through the watch.

"Another replica" is a second `KubernetesVault` (or plain client) on its own connection. Waits
for the watch are bounded polls on what the vault answers, never timing assertions.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import pytest

from portcullis.gateway.loops import Backoff, Loop
from portcullis.kube import KubeClient
from portcullis.vault.kubernetes import CREDENTIAL_LABEL, KubernetesVault, credential_secret_name
from portcullis.vault.mirror import MISS
from tests.support.kmock_support import Emulator, emulator

pytestmark = pytest.mark.anyio
NS = "acme-vault"
SECRETS = f"/api/v1/namespaces/{NS}/secrets"
CANARY = "portcullis-cred-canary"


def reads_of(k8s: Emulator, name: str) -> int:
    """GETs of one Secret by name (watch streams and lists are not reads of it)."""
    return sum(
        1 for r in k8s
        if str(getattr(r.method, "value", r.method)).upper() == "GET" and r.name == name and (r.params or {}).get("watch") != "true"
    )


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    with anyio.fail_after(timeout):
        while not await check():
            await anyio.sleep(0.005)


@asynccontextmanager
async def watched(vault: KubernetesVault, other: KubeClient) -> AsyncIterator[None]:
    """Run the vault's watch until its stream demonstrably delivers: a canary Secret written by
    `other` is rewritten until the copy has the latest version (the emulator drops events
    written between a stream's replay and its subscription, so one write might be missed)."""
    loop = Loop("vault-watch", backoff=Backoff(0.01, 0.05))
    async with anyio.create_task_group() as tg:
        tg.start_soon(vault.watch, loop)
        await other.create(SECRETS, {"metadata": {"name": CANARY, "labels": {CREDENTIAL_LABEL: "true"}}, "data": {"n": "MA=="}})
        written = 0

        async def delivered() -> bool:
            nonlocal written
            seen = vault.mirror.lookup(CANARY)
            if seen is not MISS and seen is not None and seen["data"].get("n") == base64.b64encode(str(written).encode()).decode():
                return True
            written += 1
            await other.merge_patch(f"{SECRETS}/{CANARY}", {"data": {"n": base64.b64encode(str(written).encode()).decode()}})
            return False

        await eventually(delivered)
        yield
        tg.cancel_scope.cancel()


@asynccontextmanager
async def two_replicas() -> AsyncIterator[tuple[Emulator, KubernetesVault, KubernetesVault, KubeClient]]:
    async with emulator() as k8s, KubeClient(str(k8s.url)) as one, KubeClient(str(k8s.url)) as two:
        yield k8s, KubernetesVault(one, NS), KubernetesVault(two, NS), two


async def test_once_synced_reads_are_served_without_asking_the_api_server() -> None:
    async with two_replicas() as (k8s, vault, other, client):
        await other.put("acme", "alice", "gmail", "g-secret")
        async with watched(vault, client):
            name = credential_secret_name("alice")
            before = reads_of(k8s, name)
            for _ in range(50):
                assert await vault.get("acme", "alice", "gmail") == "g-secret"
            assert await vault.connections_of("acme", "alice") == ["gmail"]
            assert await vault.get("acme", "bob", "gmail") is None  # absent, also known from the copy
            assert reads_of(k8s, name) == before
            assert reads_of(k8s, credential_secret_name("bob")) == 0


async def test_a_secret_deleted_by_another_replica_is_refused_once_the_watch_delivers_it() -> None:
    async with two_replicas() as (k8s, vault, other, client):
        await other.put("acme", "alice", "gmail", "g-secret")
        async with watched(vault, client):
            assert await vault.get("acme", "alice", "gmail") == "g-secret"
            await client.delete(f"{SECRETS}/{credential_secret_name('alice')}")

            async def refused() -> bool:
                return await vault.get("acme", "alice", "gmail") is None

            await eventually(refused)
            assert await vault.connections_of("acme", "alice") == []
            assert reads_of(k8s, credential_secret_name("alice")) <= 1  # the put's own read, nothing per call


async def test_a_connection_removed_by_another_replica_is_refused_and_the_others_still_served() -> None:
    async with two_replicas() as (k8s, vault, other, client):
        await other.put("acme", "alice", "gmail", "g-secret")
        await other.put("acme", "alice", "slack", "s-secret")
        async with watched(vault, client):
            assert await vault.get("acme", "alice", "gmail") == "g-secret"
            assert await other.delete("acme", "alice", "gmail") is True

            async def refused() -> bool:
                return await vault.get("acme", "alice", "gmail") is None

            await eventually(refused)
            assert await vault.get("acme", "alice", "slack") == "s-secret"


async def test_a_credential_changed_by_another_replica_is_served_new() -> None:
    async with two_replicas() as (k8s, vault, other, client):
        await other.put("acme", "alice", "gmail", "old")
        async with watched(vault, client):
            assert await vault.get("acme", "alice", "gmail") == "old"
            await other.put("acme", "alice", "gmail", "new")

            async def renewed() -> bool:
                return await vault.get("acme", "alice", "gmail") == "new"

            await eventually(renewed)


async def test_own_writes_are_read_back_at_once_even_before_the_watch_delivers_them(monkeypatch: pytest.MonkeyPatch) -> None:
    async with two_replicas() as (k8s, vault, other, client):
        await other.put("acme", "alice", "gmail", "old")
        async with watched(vault, client):
            assert await vault.get("acme", "alice", "gmail") == "old"
            monkeypatch.setattr(vault.mirror, "_apply", lambda kind, obj: None)  # the watch delivers nothing more
            await vault.put("acme", "alice", "gmail", "new")
            assert await vault.get("acme", "alice", "gmail") == "new"
            await vault.put("acme", "alice", "slack", "s")
            assert await vault.connections_of("acme", "alice") == ["gmail", "slack"]
            assert await vault.delete("acme", "alice", "gmail") is True
            assert await vault.get("acme", "alice", "gmail") is None
            await vault.put("acme", "carol", "gmail", "c")  # a new user's Secret, created
            assert await vault.get("acme", "carol", "gmail") == "c"


async def test_own_writes_stop_being_read_through_once_the_watch_has_them() -> None:
    async with two_replicas() as (k8s, vault, other, client):
        async with watched(vault, client):
            await vault.put("acme", "alice", "gmail", "g")
            name = credential_secret_name("alice")

            async def caught_up() -> bool:
                return vault.mirror.lookup(name) is not MISS

            await eventually(caught_up)
            before = reads_of(k8s, name)
            assert await vault.get("acme", "alice", "gmail") == "g"
            assert reads_of(k8s, name) == before


async def test_while_this_replica_holds_the_lease_reads_go_to_the_api_server(monkeypatch: pytest.MonkeyPatch) -> None:
    async with two_replicas() as (k8s, vault, other, client):
        await other.put("acme", "alice", "grant", "v1")
        async with watched(vault, client):
            async with vault.exclusive("acme", "alice", "grant"):
                name = credential_secret_name("alice")

                async def lease_seen() -> bool:  # the copy has our lease: no own write pending
                    return vault.mirror.lookup(name) is not MISS

                await eventually(lease_seen)
                monkeypatch.setattr(vault.mirror, "_apply", lambda kind, obj: None)
                # Another writer (a replica that held the lease before us) rotated the grant; our
                # copy has not heard of it. A refresh reading the copy would spend the old one.
                await other.put("acme", "alice", "grant", "v2")
                assert await vault.get("acme", "alice", "grant") == "v2"


async def test_a_secret_that_loses_its_label_leaves_the_copy() -> None:
    async with two_replicas() as (k8s, vault, other, client):
        await other.put("acme", "alice", "gmail", "g")
        async with watched(vault, client):
            assert await vault.get("acme", "alice", "gmail") == "g"
            await client.merge_patch(f"{SECRETS}/{credential_secret_name('alice')}", {"metadata": {"labels": {CREDENTIAL_LABEL: None}}})

            async def gone() -> bool:
                return vault.mirror.lookup(credential_secret_name("alice")) is None

            await eventually(gone)
