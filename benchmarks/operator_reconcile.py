"""Operator latency in the kmock emulator: apply -> Ready, and ToolMapping change -> ConfigMap.

Runs the real operator (kopf and every handler, over real HTTP) against the kmock API
emulator, as the tests do. The emulator runs no Deployment controller, so a tiny stand-in
marks each gateway Deployment available as soon as it appears (what kubelet and the
Deployment controller do in a cluster, minus image pulls and probes).

    python benchmarks/operator_reconcile.py [--runs N]

Figures are medians over N runs; polling every 5 ms bounds their resolution. The gateway
half of the allowlist path (ConfigMap watch -> tools/list) is measured by the gateway's
own benchmark.

Figures (10 runs, 2-core VM, operator and emulator in one process): apply -> status
written 90 ms, apply -> Ready 130 ms, ToolMapping change -> ConfigMap 27 ms. They were
seconds, growing with every server, until the emulator stopped rescanning its request log
per request (tests/support/kmock_support.py) and the operator stopped re-reconciling on
the echoes of its own writes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from portcullis.api.resources import API_VERSION  # noqa: E402
from portcullis.controller.options import Options  # noqa: E402
from tests.support.operator_runner import OperatorEmulator, operator_emulator, running_operator  # noqa: E402

NS = "bench"
POLL = 0.005
TIMEOUT = 30.0


def _get(k8s: OperatorEmulator, resource: str, name: str) -> dict[str, Any] | None:
    try:
        found = k8s.objects[resource, NS, name]
    except KeyError:
        return None
    return None if found.deleted else dict(found.raw)


async def _until(check: Any) -> float:
    start = time.perf_counter()
    with anyio.fail_after(TIMEOUT):
        while not check():
            await anyio.sleep(POLL)
    return time.perf_counter() - start


async def _send(k8s: OperatorEmulator, method: str, path: str, body: dict[str, Any]) -> None:
    headers = {"Content-Type": "application/merge-patch+json"} if method == "patch" else {}
    async with k8s.request(method, path, json=body, headers=headers) as response:
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: {response.status} {await response.text()}")


def _path(plural: str, name: str | None = None) -> str:
    base = f"/apis/{API_VERSION}/namespaces/{NS}/{plural}"
    return f"{base}/{name}" if name else base


async def _deployment_controller(k8s: OperatorEmulator, names: list[str]) -> None:
    """Mark each gateway Deployment available once it exists."""
    done: set[str] = set()
    while True:
        for name in names:
            if name not in done and _get(k8s, "apps/v1/deployments", name) is not None:
                await _send(k8s, "patch", f"/apis/apps/v1/namespaces/{NS}/deployments/{name}/status",
                            {"status": {"availableReplicas": 1, "readyReplicas": 1}})
                done.add(name)
        await anyio.sleep(POLL)


def _tools(k8s: OperatorEmulator, server: str) -> list[str]:
    cm = _get(k8s, "v1/configmaps", f"{server}-config")
    if cm is None:
        return []
    return [t["name"] for t in json.loads(cm["data"]["config.json"])["tools"]]


async def measure(runs: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"apply -> status written": [], "apply -> Ready": [], "ToolMapping change -> ConfigMap": []}
    names = [f"s{i}" for i in range(runs)]
    async with operator_emulator() as k8s, running_operator(k8s, namespace=NS, options=Options(resync_seconds=3600)):
        await _send(k8s, "post", _path("mcpconnections"), {
            "apiVersion": API_VERSION, "kind": "MCPConnection", "metadata": {"name": "inbox", "namespace": NS},
            "spec": {"url": "http://inbox.tools.svc:8080/mcp"},
        })
        async with anyio.create_task_group() as tg:
            tg.start_soon(_deployment_controller, k8s, names)
            for name in names:
                await _send(k8s, "post", _path("toolmappings"), {
                    "apiVersion": API_VERSION, "kind": "ToolMapping", "metadata": {"name": name, "namespace": NS},
                    "spec": {"serverRef": {"name": name}, "connectionRef": {"name": "inbox"}, "tools": [{"name": "a"}]},
                })
                start = time.perf_counter()
                await _send(k8s, "post", _path("virtualmcpservers"), {
                    "apiVersion": API_VERSION, "kind": "VirtualMCPServer", "metadata": {"name": name, "namespace": NS},
                    "spec": {"replicas": 1},
                })

                def status(n: str = name) -> dict[str, Any]:
                    return (_get(k8s, "portcullis.dev/v1alpha1/virtualmcpservers", n) or {}).get("status") or {}

                await _until(lambda: bool(status().get("conditions")))
                results["apply -> status written"].append(time.perf_counter() - start)
                await _until(lambda: status().get("phase") == "Ready")
                results["apply -> Ready"].append(time.perf_counter() - start)

                start = time.perf_counter()
                await _send(k8s, "patch", _path("toolmappings", name), {"spec": {"tools": [{"name": "a"}, {"name": "b"}]}})
                await _until(lambda n=name: _tools(k8s, n) == ["a", "b"])
                results["ToolMapping change -> ConfigMap"].append(time.perf_counter() - start)
            tg.cancel_scope.cancel()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    results = anyio.run(measure, args.runs)
    print(f"operator in the kmock emulator, {args.runs} runs (ms)")
    print(f"{'path':<34} {'median':>8} {'min':>8} {'max':>8}")
    for label, values in results.items():
        ms = [v * 1000 for v in values]
        print(f"{label:<34} {statistics.median(ms):>8.1f} {min(ms):>8.1f} {max(ms):>8.1f}")


if __name__ == "__main__":
    main()
