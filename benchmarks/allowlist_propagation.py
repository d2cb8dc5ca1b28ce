"""ToolMapping change -> a connected agent's tools/list, end to end, in the emulator.

Everything real but the API server: the operator (kopf, every handler) reconciles a
VirtualMCPServer in the kmock emulator; the in-cluster gateway (`portcullis gateway
--in-cluster`'s code) reads the ConfigMap and signing keys the operator wrote, watches
them, and fronts the example inbox upstream; an agent (the MCP SDK client, 2026-07-28)
holds a `subscriptions/listen` stream open. Each run patches the ToolMapping and times

- patch -> `notifications/tools/list_changed` on the agent's stream, and
- patch -> the agent's next `tools/list` shows the new allowlist.

    python benchmarks/allowlist_propagation.py [--runs N]

Target (issue 3): the second figure <= 2 s.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from portcullis.api.resources import API_VERSION  # noqa: E402
from portcullis.controller.options import Options  # noqa: E402
from portcullis.gateway.audit import MemoryAuditSink  # noqa: E402
from portcullis.gateway.cluster import build  # noqa: E402
from portcullis.gateway.identity.tokens import SigningKeys, mint_token  # noqa: E402
from portcullis.kube import KubeClient  # noqa: E402
from portcullis.vault.kubernetes import KubernetesVault  # noqa: E402
from tests.support.agent import agent  # noqa: E402
from tests.support.operator_runner import operator_emulator, running_operator  # noqa: E402
from tests.support.servers import load_example, run_asgi  # noqa: E402

NS = "acme"
SECRET = "alice-inbox-token"
TOOL_SETS = (["fetch_mails"], ["fetch_mails", "whoami"])


def _crd(plural: str, name: str | None = None) -> str:
    base = f"/apis/{API_VERSION}/namespaces/{NS}/{plural}"
    return f"{base}/{name}" if name else base


async def _wait_for(client: KubeClient, path: str, timeout: float = 30.0) -> dict[str, Any]:
    with anyio.fail_after(timeout):
        while (found := await client.get(path)) is None:
            await anyio.sleep(0.01)
    return found


async def propagate(runs: int) -> dict[str, list[float]]:
    inbox = load_example("examples/inbox/server.py")
    results: dict[str, list[float]] = {"patch -> list_changed on the agent": [], "patch -> agent's tools/list updated": []}
    upstream = inbox.build_app(required_auth={f"Bearer {SECRET}": "alice@example.com"})
    with run_asgi(upstream) as inbox_url:
        async with operator_emulator() as k8s, running_operator(k8s, namespace=NS, options=Options(resync_seconds=3600)):
            async with KubeClient(str(k8s.url)) as client:
                await client.create(_crd("mcpconnections"), {
                    "apiVersion": API_VERSION, "kind": "MCPConnection", "metadata": {"name": "inbox"},
                    "spec": {"url": inbox_url, "credential": {"source": "user"}},
                })
                await client.create(_crd("toolmappings"), {
                    "apiVersion": API_VERSION, "kind": "ToolMapping", "metadata": {"name": "summarizer-inbox"},
                    "spec": {"serverRef": {"name": "summarizer"}, "connectionRef": {"name": "inbox"},
                             "tools": [{"name": t} for t in TOOL_SETS[0]]},
                })
                await client.create(_crd("virtualmcpservers"), {
                    "apiVersion": API_VERSION, "kind": "VirtualMCPServer", "metadata": {"name": "summarizer"}, "spec": {},
                })
                base = f"/api/v1/namespaces/{NS}"
                await _wait_for(client, f"{base}/configmaps/summarizer-config")
                secret = await _wait_for(client, f"{base}/secrets/summarizer-signing-keys")
                keys = SigningKeys.from_json(base64.b64decode(secret["data"]["keys.json"]).decode())
                await KubernetesVault(client, NS).put(NS, "alice@example.com", "inbox", SECRET)

                servers = await build(
                    client, "summarizer", NS, "127.0.0.1", (0, 0, 0, 0), audit=MemoryAuditSink(), state_dir=Path(tempfile.mkdtemp())
                )
                async with anyio.create_task_group() as tg:
                    tg.start_soon(servers.serve)
                    with anyio.fail_after(20):
                        while not servers.started.is_set():
                            await anyio.sleep(0.01)
                    config = servers.gateway.config
                    token, _ = mint_token(keys, issuer=config.server.issuer, audience=config.server.url,
                                          user="alice@example.com", tenant=NS, ttl_seconds=900)
                    url = f"http://127.0.0.1:{servers.listeners[0].port}/mcp"
                    async with agent(url, token, "2026-07-28") as session:
                        for run in range(runs):
                            wanted = TOOL_SETS[(run + 1) % 2]
                            async with session.listen(tools_list_changed=True) as subscription:
                                start = time.perf_counter()
                                await client.merge_patch(_crd("toolmappings", "summarizer-inbox"),
                                                         {"spec": {"tools": [{"name": t} for t in wanted]}})
                                with anyio.fail_after(30):
                                    async for _event in subscription:
                                        break
                                results["patch -> list_changed on the agent"].append(time.perf_counter() - start)
                                with anyio.fail_after(30):
                                    while sorted(t.name for t in (await session.list_tools()).tools) != sorted(wanted):
                                        await anyio.sleep(0.005)
                                results["patch -> agent's tools/list updated"].append(time.perf_counter() - start)
                    servers.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    results = anyio.run(propagate, args.runs)
    print(f"ToolMapping change -> connected agent, operator + gateway in the kmock emulator, {args.runs} runs (ms)")
    print(f"{'path':<40} {'median':>8} {'min':>8} {'max':>8}")
    for label, values in results.items():
        ms = [v * 1000 for v in values]
        print(f"{label:<40} {statistics.median(ms):>8.1f} {min(ms):>8.1f} {max(ms):>8.1f}")


if __name__ == "__main__":
    main()
