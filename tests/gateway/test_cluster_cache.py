"""The cluster gateway serves credentials from watches: tool calls cost the API server nothing
once synced, and what changes in the cluster (a deleted user credential, a rotated or deleted
shared Secret) reaches the calls through the watch.

`portcullis.gateway.cluster` against the kmock emulator, in front of two inbox upstreams (one
demanding each user's own credential, one a shared credential), driven by the MCP SDK client.
Waits for a watch are bounded polls on what calls answer; nothing here asserts a duration.
"""

from __future__ import annotations

import base64
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from portcullis.api.manifests import Manifests
from portcullis.api.resources import MCPConnection, ToolMapping, VirtualMCPServer
from portcullis.compile import compile_strict
from portcullis.gateway.audit import MemoryAuditSink
from portcullis.gateway.cluster import build
from portcullis.gateway.identity.tokens import SigningKeys, mint_token
from portcullis.gateway.runtime import Servers
from portcullis.kube import KubeClient
from portcullis.vault.kubernetes import CREDENTIAL_LABEL, KubernetesVault, credential_secret_name
from portcullis.vault.mirror import MISS
from tests.gateway.conftest import ALICE_SECRET, inbox
from tests.support.agent import agent, result_text
from tests.support.kmock_support import Emulator, emulator
from tests.support.servers import run_asgi

pytestmark = pytest.mark.anyio
NS = "acme"
SECRETS = f"/api/v1/namespaces/{NS}/secrets"
ALICE = "alice@example.com"
TEAM_SECRET = "team-inbox"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def config_json(mine_url: str, team_url: str) -> str:
    m = Manifests(
        servers=[VirtualMCPServer.model_validate({"metadata": {"name": "summarizer", "namespace": NS}})],
        connections=[
            MCPConnection.model_validate({"metadata": {"name": "inbox", "namespace": NS},
                                          "spec": {"url": mine_url, "credential": {"source": "user"}}}),
            MCPConnection.model_validate({"metadata": {"name": "team", "namespace": NS}, "spec": {
                "url": team_url, "credential": {"source": "shared", "secretRef": {"name": TEAM_SECRET, "key": "token"}},
            }}),
        ],
        mappings=[
            ToolMapping.model_validate({"metadata": {"name": "mine", "namespace": NS}, "spec": {
                "serverRef": {"name": "summarizer"}, "connectionRef": {"name": "inbox"}, "tools": [{"name": "fetch_mails"}],
            }}),
            ToolMapping.model_validate({"metadata": {"name": "team", "namespace": NS}, "spec": {
                "serverRef": {"name": "summarizer"}, "connectionRef": {"name": "team"},
                "tools": [{"name": "fetch_mails", "as": "team_mails"}],
            }}),
        ],
    )
    return compile_strict(m.servers[0], m.mappings, m.connections).model_dump_json()


def reads_of(k8s: Emulator, name: str) -> int:
    return sum(
        1 for r in k8s
        if str(getattr(r.method, "value", r.method)).upper() == "GET" and r.name == name and (r.params or {}).get("watch") != "true"
    )


@asynccontextmanager
async def cluster(team_record: Any) -> AsyncIterator[tuple[Emulator, KubeClient, Servers, str]]:
    keys = SigningKeys.generate()
    mine = inbox.build_app(required_auth={f"Bearer {ALICE_SECRET}": ALICE})
    team = inbox.build_app(record=team_record, required_auth={"Bearer team-v1": "team", "Bearer team-v2": "team"})
    with run_asgi(mine) as mine_url, run_asgi(team) as team_url:
        async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
            await client.create(f"/api/v1/namespaces/{NS}/configmaps", {
                "metadata": {"name": "summarizer-config"}, "data": {"config.json": config_json(mine_url, team_url)},
            })
            await client.create(SECRETS, {"metadata": {"name": "summarizer-signing-keys"}, "data": {"keys.json": b64(keys.to_json())}})
            await client.create(SECRETS, {"metadata": {"name": TEAM_SECRET}, "data": {"token": b64("team-v1")}})
            await KubernetesVault(client, NS).put(NS, ALICE, "inbox", ALICE_SECRET)
            with tempfile.TemporaryDirectory() as state:
                servers = await build(client, "summarizer", NS, "127.0.0.1", (0, 0, 0, 0), audit=MemoryAuditSink(), state_dir=Path(state))
                async with anyio.create_task_group() as tg:
                    tg.start_soon(servers.serve)
                    with anyio.fail_after(20):
                        while not servers.started.is_set():
                            await anyio.sleep(0.01)
                    config = servers.gateway.config
                    token, _ = mint_token(keys, issuer=config.server.issuer, audience=config.server.url, user=ALICE, tenant=NS, ttl_seconds=600)
                    yield k8s, client, servers, token
                    servers.stop()


async def vault_watch_delivers(servers: Servers, client: KubeClient) -> None:
    """Until a canary credential Secret rewritten by another client shows in the gateway's copy
    (the emulator may drop events written while a stream is being set up)."""
    vault: Any = servers.gateway.credentials.vault
    await client.create(SECRETS, {"metadata": {"name": "portcullis-cred-canary", "labels": {CREDENTIAL_LABEL: "true"}}, "data": {"n": b64("0")}})
    with anyio.fail_after(10):
        for n in range(1, 10_000):
            seen = vault.mirror.lookup("portcullis-cred-canary")
            if seen is not MISS and seen is not None and seen["data"]["n"] == b64(str(n - 1)):
                return
            await client.merge_patch(f"{SECRETS}/portcullis-cred-canary", {"data": {"n": b64(str(n))}})
            await anyio.sleep(0.005)


async def test_tool_calls_read_no_credential_from_the_api_server_once_the_watch_has_synced() -> None:
    async with cluster(inbox.CallRecord()) as (k8s, client, servers, token):
        await vault_watch_delivers(servers, client)
        async with agent(f"http://127.0.0.1:{servers.listeners[0].port}/mcp", token, "2026-07-28") as session:
            name = credential_secret_name(ALICE)
            before = reads_of(k8s, name)
            for _ in range(20):
                assert not (await session.call_tool("fetch_mails", {"limit": 1})).is_error
            assert reads_of(k8s, name) == before


async def test_a_credential_deleted_elsewhere_is_refused_once_the_watch_delivers_the_deletion() -> None:
    async with cluster(inbox.CallRecord()) as (k8s, client, servers, token):
        await vault_watch_delivers(servers, client)
        async with agent(f"http://127.0.0.1:{servers.listeners[0].port}/mcp", token, "2026-07-28") as session:
            assert not (await session.call_tool("fetch_mails", {"limit": 1})).is_error
            await client.delete(f"{SECRETS}/{credential_secret_name(ALICE)}")  # an administrator, not this replica
            with anyio.fail_after(10):
                while True:
                    result = await session.call_tool("fetch_mails", {"limit": 1})
                    if result.is_error:
                        break
            assert "connect inbox first" in result_text(result)


async def test_a_shared_secret_is_read_once_then_followed_by_its_watch() -> None:
    record = inbox.CallRecord()
    async with cluster(record) as (k8s, client, servers, token):
        async with agent(f"http://127.0.0.1:{servers.listeners[0].port}/mcp", token, "2026-07-28") as session:
            assert not (await session.call_tool("team_mails", {"limit": 1})).is_error
            assert record.calls[-1].authorization == "Bearer team-v1"

            # Rotated in the cluster: the new value reaches the upstream without a restart.
            await client.merge_patch(f"{SECRETS}/{TEAM_SECRET}", {"data": {"token": b64("team-v2")}})
            with anyio.fail_after(10):
                while True:
                    assert not (await session.call_tool("team_mails", {"limit": 1})).is_error
                    if record.calls[-1].authorization == "Bearer team-v2":
                        break

            before = reads_of(k8s, TEAM_SECRET)
            for _ in range(10):
                assert not (await session.call_tool("team_mails", {"limit": 1})).is_error
            assert reads_of(k8s, TEAM_SECRET) == before  # served from the watch

            await client.delete(f"{SECRETS}/{TEAM_SECRET}")
            with anyio.fail_after(10):
                while True:
                    sent = len(record.calls)
                    result = await session.call_tool("team_mails", {"limit": 1})
                    if result.is_error:
                        break
            assert len(record.calls) == sent  # refused before any upstream traffic
