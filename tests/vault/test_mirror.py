"""The watch-fed copy of the vault's Secrets when the watch does not go well: not yet listed, a
broken stream, 410 Gone. Sequences the emulator cannot play, so a scripted API server on
loopback (real HTTP, real `KubeClient`) serves the list, the watch and the GETs, and counts them.
The copy's clock is virtual: the staleness bound is crossed by advancing it, never by waiting.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from aiohttp import web

from portcullis.gateway.loops import Backoff, Loop
from portcullis.kube import KubeClient
from portcullis.vault.kubernetes import CREDENTIAL_LABEL, USER_ANNOTATION, KubernetesVault, credential_secret_name
from portcullis.vault.mirror import MISS, STALE_AFTER
from portcullis.vault.sealing import new_key, seal

pytestmark = pytest.mark.anyio
NS = "acme-vault"
SECRETS = f"/api/v1/namespaces/{NS}/secrets"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeAPI:
    """Secrets of one namespace; each watch request is answered by the next scripted behaviour."""

    def __init__(self) -> None:
        self.key = new_key()
        self.rv = 10
        self.objects: dict[str, dict[str, Any]] = {}
        self.requests: list[str] = []
        self.watches: list[str] = []  # "hold": open until `cut` is set; "gone": an ERROR 410 event; "500"
        self.cut = asyncio.Event()
        self.list_blocked: asyncio.Event | None = None
        self.after_list: list[Callable[[], object]] = []  # the n-th runs once the n-th list is answered
        self.put_key_secret()

    def next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    def put_key_secret(self) -> None:
        self.objects["portcullis-tenant-key"] = {
            "metadata": {"name": "portcullis-tenant-key", "resourceVersion": self.next_rv()},
            "data": {"key": base64.b64encode(self.key).decode()},
        }

    def put_credential(self, user: str, connection: str, value: str) -> None:
        name = credential_secret_name(user)
        sealed = seal(self.key, value, tenant="acme", user=user, connection=connection)
        self.objects[name] = {
            "metadata": {"name": name, "resourceVersion": self.next_rv(), "labels": {CREDENTIAL_LABEL: "true"},
                         "annotations": {USER_ANNOTATION: user}},
            "data": {connection: base64.b64encode(sealed.encode()).decode()},
        }

    def gets(self, name: str) -> int:
        return self.requests.count(f"GET {name}")

    async def collection(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") == "true":
            self.requests.append("WATCH")
            behaviour = self.watches.pop(0) if self.watches else "500"
            if behaviour == "500":
                return web.json_response({"kind": "Status", "code": 500, "reason": "InternalError", "message": "broken"}, status=500)
            response = web.StreamResponse()
            await response.prepare(request)
            if behaviour == "gone":
                event = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}}
                await response.write(json.dumps(event).encode() + b"\n")
            else:
                await self.cut.wait()
            return response
        self.requests.append("LIST")
        assert request.query.get("labelSelector") == f"{CREDENTIAL_LABEL}=true"
        if self.list_blocked is not None:
            await self.list_blocked.wait()
        # Like the emulator, ignore the selector: the copy must filter by itself.
        response = web.json_response({"metadata": {"resourceVersion": str(self.rv)}, "items": list(self.objects.values())})
        if self.after_list:
            self.after_list.pop(0)()
        return response

    async def one(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.requests.append(f"GET {name}")
        if name not in self.objects:
            return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound", "message": "not found"}, status=404)
        return web.json_response(self.objects[name])


@asynccontextmanager
async def fake_api() -> AsyncIterator[tuple[FakeAPI, str]]:
    api = FakeAPI()
    app = web.Application()
    app.router.add_get(SECRETS, api.collection)
    app.router.add_get(SECRETS + "/{name}", api.one)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        yield api, f"http://{host}:{port}"
    finally:
        api.cut.set()
        if api.list_blocked is not None:
            api.list_blocked.set()
        await runner.cleanup()


@asynccontextmanager
async def watching(vault: KubernetesVault) -> AsyncIterator[Loop]:
    loop = Loop("vault-watch", backoff=Backoff(0.01, 0.05))
    async with anyio.create_task_group() as tg:
        tg.start_soon(vault.watch, loop)
        yield loop
        tg.cancel_scope.cancel()


async def until(condition: Any, timeout: float = 10) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.005)


async def test_a_vault_whose_first_list_has_not_answered_reads_directly_and_never_says_not_connected() -> None:
    async with fake_api() as (api, url), KubeClient(url) as client:
        api.put_credential("alice", "gmail", "g-secret")
        api.list_blocked = asyncio.Event()  # the list never answers while the test runs
        # A monotonic clock can be near zero (a machine just booted): "never listed" must not
        # pass for "listed less than STALE_AFTER ago".
        vault = KubernetesVault(client, NS, clock=Clock(0.0))
        async with watching(vault):
            await until(lambda: "LIST" in api.requests)
            assert not vault.mirror.synced
            assert await vault.get("acme", "alice", "gmail") == "g-secret"
            assert await vault.connections_of("acme", "alice") == ["gmail"]
            assert api.gets(credential_secret_name("alice")) == 2  # both read the API server


async def test_a_broken_watch_is_trusted_for_the_bound_then_reads_go_to_the_api_server() -> None:
    clock = Clock()
    async with fake_api() as (api, url), KubeClient(url) as client:
        api.put_credential("alice", "gmail", "g-secret")
        api.watches = ["hold"]  # one stream, then every watch request fails
        vault = KubernetesVault(client, NS, clock=clock)
        name = credential_secret_name("alice")
        async with watching(vault):
            await until(lambda: vault.mirror.streaming)
            assert await vault.get("acme", "alice", "gmail") == "g-secret"
            assert api.gets(name) == 0  # served from the copy

            del api.objects[name]  # deleted while the watch is broken: the copy never hears of it
            api.cut.set()
            await until(lambda: not vault.mirror.streaming and api.requests.count("WATCH") >= 2)
            clock.now += STALE_AFTER - 1
            assert await vault.get("acme", "alice", "gmail") == "g-secret"  # within the documented bound
            assert api.gets(name) == 0

            clock.now += 1  # no stream for STALE_AFTER seconds: the copy is not used any more
            assert vault.mirror.lookup(name) is MISS
            assert await vault.get("acme", "alice", "gmail") is None
            assert api.gets(name) == 1


async def test_410_gone_lists_again_and_so_learns_of_deletions_the_watch_missed() -> None:
    async with fake_api() as (api, url), KubeClient(url) as client:
        api.put_credential("alice", "gmail", "a-secret")
        api.put_credential("bob", "gmail", "b-secret")
        api.watches = ["gone", "hold"]
        # Deleted between the first list and the 410: no watch event ever tells of it.
        api.after_list.append(lambda: api.objects.pop(credential_secret_name("bob")))
        vault = KubernetesVault(client, NS)
        async with watching(vault):
            await until(lambda: vault.mirror.lists >= 2 and vault.mirror.streaming)
            assert await vault.get("acme", "bob", "gmail") is None
            assert await vault.get("acme", "alice", "gmail") == "a-secret"
            assert api.gets(credential_secret_name("bob")) == 0  # the second list said so, no GET needed
            assert api.requests[:4] == ["LIST", "WATCH", "LIST", "WATCH"]


async def test_only_labelled_secrets_are_kept_even_when_the_server_ignores_the_selector() -> None:
    async with fake_api() as (api, url), KubeClient(url) as client:
        api.put_credential("alice", "gmail", "a-secret")
        api.watches = ["hold"]
        vault = KubernetesVault(client, NS)
        async with watching(vault):
            await until(lambda: vault.mirror.streaming)
            assert vault.mirror.lookup("portcullis-tenant-key") is None  # listed, but not a credential
            assert vault.mirror.lookup(credential_secret_name("alice")) not in (None, MISS)
