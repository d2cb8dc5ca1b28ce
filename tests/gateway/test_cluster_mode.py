"""The gateway as deployed in a cluster: config, keys, vault and revocations come from the API.

Runs `portcullis.gateway.cluster` against kmock's emulator (real HTTP, real watches) in front
of the real inbox upstream, and drives it with the MCP SDK client.
"""

from __future__ import annotations

import base64
import tempfile
import time
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
from portcullis.gateway.runtime import Servers
from portcullis.gateway.identity.tokens import SigningKeys, mint_token
from portcullis.kube import KubeClient
from portcullis.vault.kubernetes import KubernetesVault
from tests.gateway.conftest import ALICE_SECRET, inbox
from tests.support.agent import agent
from tests.support.kmock_support import emulator
from tests.support.servers import run_asgi

pytestmark = pytest.mark.anyio
NS = "acme"


def manifests(inbox_url: str, tools: list[str]) -> Manifests:
    return Manifests(
        servers=[VirtualMCPServer.model_validate({"metadata": {"name": "summarizer", "namespace": NS}})],
        connections=[
            MCPConnection.model_validate(
                {"metadata": {"name": "inbox", "namespace": NS}, "spec": {"url": inbox_url, "credential": {"source": "user"}}}
            )
        ],
        mappings=[
            ToolMapping.model_validate(
                {
                    "metadata": {"name": "m", "namespace": NS},
                    "spec": {"serverRef": {"name": "summarizer"}, "connectionRef": {"name": "inbox"}, "tools": [{"name": t} for t in tools]},
                }
            )
        ],
    )


def config_json(inbox_url: str, tools: list[str]) -> str:
    m = manifests(inbox_url, tools)
    return compile_strict(m.servers[0], m.mappings, m.connections).model_dump_json()


async def wait_started(servers: Servers) -> None:
    with anyio.fail_after(20):
        while not servers.started.is_set():
            await anyio.sleep(0.01)


@asynccontextmanager
async def cluster_gateway(client: KubeClient, inbox_url: str, keys: SigningKeys) -> AsyncIterator[Servers]:
    base = f"/api/v1/namespaces/{NS}"
    await client.create(f"{base}/configmaps", {"metadata": {"name": "summarizer-config"}, "data": {"config.json": config_json(inbox_url, ["fetch_mails"])}})
    await client.create(
        f"{base}/secrets",
        {"metadata": {"name": "summarizer-signing-keys"}, "data": {"keys.json": base64.b64encode(keys.to_json().encode()).decode()}},
    )
    await KubernetesVault(client, NS).put(NS, "alice@example.com", "inbox", ALICE_SECRET)
    with tempfile.TemporaryDirectory() as state:
        servers = await build(client, "summarizer", NS, "127.0.0.1", (0, 0, 0, 0), audit=MemoryAuditSink(), state_dir=Path(state))
        async with anyio.create_task_group() as tg:
            tg.start_soon(servers.serve)
            await wait_started(servers)
            yield servers
            servers.stop()


def token_for(servers: Servers, keys: SigningKeys, user: str = "alice@example.com") -> str:
    config = servers.gateway.config
    token, _ = mint_token(keys, issuer=config.server.issuer, audience=config.server.url, user=user, tenant=NS, ttl_seconds=600)
    return token


def mcp_url(servers: Servers) -> str:
    return f"http://127.0.0.1:{servers.listeners[0].port}/mcp"


async def test_a_changed_allowlist_reaches_connected_agents_without_a_restart() -> None:
    keys = SigningKeys.generate()
    record = inbox.CallRecord()
    with run_asgi(inbox.build_app(record=record, required_auth={f"Bearer {ALICE_SECRET}": "alice@example.com"})) as inbox_url:
        async with emulator() as k8s, KubeClient(str(k8s.url)) as client, cluster_gateway(client, inbox_url, keys) as servers:
            token = token_for(servers, keys)
            async with agent(mcp_url(servers), token, "2026-07-28") as client_a:
                assert [t.name for t in (await client_a.list_tools()).tools] == ["fetch_mails"]
                async with client_a.listen(tools_list_changed=True) as subscription:
                    started = time.perf_counter()
                    await client.merge_patch(
                        f"/api/v1/namespaces/{NS}/configmaps/summarizer-config",
                        {"data": {"config.json": config_json(inbox_url, ["fetch_mails", "whoami"])}},
                    )
                    with anyio.fail_after(10):
                        async for event in subscription:
                            break
                    elapsed = time.perf_counter() - started
                tools = [t.name for t in (await client_a.list_tools()).tools]
                assert tools == ["fetch_mails", "whoami"]
                result = await client_a.call_tool("whoami", {})
                assert result.structured_content == {"user": "alice@example.com", "authenticated": True}
            print(f"allowlist change -> list_changed on a connected client: {elapsed * 1000:.0f} ms")


async def test_credentials_and_revocations_live_in_the_cluster() -> None:
    keys = SigningKeys.generate()
    with run_asgi(inbox.build_app(required_auth={f"Bearer {ALICE_SECRET}": "alice@example.com"})) as inbox_url:
        async with emulator() as k8s, KubeClient(str(k8s.url)) as client, cluster_gateway(client, inbox_url, keys) as servers:
            token = token_for(servers, keys)
            async with agent(mcp_url(servers), token, "2026-07-28") as session:
                ok = await session.call_tool("fetch_mails", {"limit": 1})
                assert not ok.is_error
                # Deleted through another vault object (another replica): this replica's copy learns
                # of it from its watch, so the cut-off is the watch's latency, not the next call.
                await KubernetesVault(client, NS).delete(NS, "alice@example.com", "inbox")
                with anyio.fail_after(10):
                    while not (cut := await session.call_tool("fetch_mails", {"limit": 1})).is_error:
                        await anyio.sleep(0.02)
                assert "connect inbox first" in " ".join(c.text for c in cut.content)  # type: ignore[union-attr]
            # A revocation written by another replica's store reaches this one through the watch.
            from portcullis.gateway.identity.revocation import KubernetesRevocations

            other_replica = KubernetesRevocations(client, NS, "summarizer-revocations")
            await other_replica.revoke_user("alice@example.com", int(time.time()) + 1)
            gateway: Any = servers.gateway
            from portcullis.gateway.core import Unauthenticated

            with anyio.fail_after(10):
                while True:
                    try:
                        gateway.authenticate(token)
                    except Unauthenticated as exc:
                        assert str(exc) == "revoked"
                        break
                    await anyio.sleep(0.02)


async def test_an_application_backend_mints_with_its_service_account_as_rbac_allows() -> None:
    import httpx2

    from tests.gateway.test_admission import _serve_reviews

    keys = SigningKeys.generate()
    with run_asgi(inbox.build_app(required_auth={f"Bearer {ALICE_SECRET}": "alice@example.com"})) as inbox_url:
        async with emulator() as k8s, KubeClient(str(k8s.url)) as client, cluster_gateway(client, inbox_url, keys) as servers:
            _serve_reviews(k8s)  # "good-token" is a ServiceAccount RBAC allows to mint on summarizer
            admin = f"http://127.0.0.1:{servers.listeners[1].port}/v1/tokens"
            async with httpx2.AsyncClient(timeout=10) as http:
                allowed = await http.post(admin, json={"user": "alice@example.com"}, headers={"Authorization": "Bearer good-token"})
                stolen = await http.post(admin, json={"user": "alice@example.com"}, headers={"Authorization": "Bearer stolen-token"})
                anonymous = await http.post(admin, json={"user": "alice@example.com"})
                revoke = await http.post(admin.replace("tokens", "revocations"), json={"user": "alice@example.com"},
                                         headers={"Authorization": "Bearer good-token"})
                metrics = f"http://127.0.0.1:{servers.listeners[2].port}"
                scraped = await http.get(metrics + "/metrics")
                minted_there = await http.post(metrics + "/v1/tokens", json={"user": "alice@example.com"},
                                               headers={"Authorization": "Bearer good-token"})
            assert allowed.status_code == 201, allowed.text
            assert (stolen.status_code, anonymous.status_code, revoke.status_code) == (403, 401, 403)
            # The metrics port, open to scrapers, serves metrics only: nothing mints there.
            assert scraped.status_code == 200 and "portcullis_calls_total" in scraped.text
            assert minted_there.status_code == 404
            async with agent(mcp_url(servers), allowed.json()["token"], "2026-07-28") as session:
                assert not (await session.call_tool("fetch_mails", {"limit": 1})).is_error
