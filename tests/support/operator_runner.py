"""Running the real operator (kopf, all handlers) against the kmock emulator.

`running_operator(k8s)` starts `kopf run` through `kopf.testing.KopfRunner` in a thread
(its own event loop), logged in to the emulator, and stops it on exit. The emulator keeps
serving from the test's loop, so the test awaits (polls with a deadline) instead of blocking.

kopf imports this module as a second handler module: it adds a login handler that points
kopf at the current emulator and disables cluster scanning (kmock has no real discovery
of namespaces). Module state is one slot, because one test runs one operator at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import kmock
import kopf
from kopf.testing import KopfRunner

from portcullis.controller.options import Options, install
from tests.support.kmock_support import CORE_RESOURCES, Emulator, declare

_target: list[str] = [""]

RW = {"get", "list", "watch", "create", "patch", "delete"}
OPERATOR_RESOURCES: dict[str, kmock.ResourceInfo] = {
    "portcullis.dev/v1alpha1/virtualmcpservers": kmock.ResourceInfo(
        kind="VirtualMCPServer", namespaced=True, verbs=RW, subresources={"status"}, shortnames={"pvmcp"}
    ),
    "portcullis.dev/v1alpha1/toolmappings": kmock.ResourceInfo(
        kind="ToolMapping", namespaced=True, verbs=RW, subresources={"status"}, shortnames={"tmap"}
    ),
    "portcullis.dev/v1alpha1/mcpconnections": kmock.ResourceInfo(
        kind="MCPConnection", namespaced=True, verbs=RW, subresources={"status"}, shortnames={"mcpconn"}
    ),
    "apiextensions.k8s.io/v1/customresourcedefinitions": kmock.ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs=RW
    ),
    "v1/services": kmock.ResourceInfo(kind="Service", namespaced=True, verbs=RW),
    "v1/serviceaccounts": kmock.ResourceInfo(kind="ServiceAccount", namespaced=True, verbs=RW),
    "apps/v1/deployments": kmock.ResourceInfo(kind="Deployment", namespaced=True, verbs=RW, subresources={"status"}),
    "rbac.authorization.k8s.io/v1/roles": kmock.ResourceInfo(kind="Role", namespaced=True, verbs=RW),
    "rbac.authorization.k8s.io/v1/rolebindings": kmock.ResourceInfo(kind="RoleBinding", namespaced=True, verbs=RW),
    "rbac.authorization.k8s.io/v1/clusterrolebindings": kmock.ResourceInfo(
        kind="ClusterRoleBinding", namespaced=False, verbs=RW
    ),
    "autoscaling/v2/horizontalpodautoscalers": kmock.ResourceInfo(
        kind="HorizontalPodAutoscaler", namespaced=True, verbs=RW
    ),
    "policy/v1/poddisruptionbudgets": kmock.ResourceInfo(kind="PodDisruptionBudget", namespaced=True, verbs=RW),
}


@kopf.on.login()
def login_to_emulator(**_: Any) -> kopf.ConnectionInfo:
    """Points kopf at the emulator of the running test."""
    return kopf.ConnectionInfo(server=_target[0], insecure=True)


@kopf.on.startup()
def configure_for_emulator(settings: kopf.OperatorSettings, **_: Any) -> None:
    """kmock lists no real namespaces or CRDs: name the namespace, skip the scanning."""
    settings.scanning.disabled = True
    settings.watching.reconnect_backoff = 0.1


# The emulator the operator runs against is the shared one (its 422 for a failed JSON-patch
# `test`, which kopf's finalizer patches rely on, lives there); the name stays for callers.
OperatorEmulator = Emulator


@contextlib.asynccontextmanager
async def operator_emulator() -> AsyncIterator[OperatorEmulator]:
    """A running emulator with every resource the operator reads or writes declared."""
    async with OperatorEmulator() as k8s, kmock.Server(k8s):
        declare(k8s, CORE_RESOURCES | OPERATOR_RESOURCES)
        yield k8s


@contextlib.asynccontextmanager
async def running_operator(k8s: Emulator, *, namespace: str = "acme", options: Options | None = None) -> AsyncIterator[KopfRunner]:
    install(options or Options(resync_seconds=3600))
    _target[0] = str(k8s.url).rstrip("/")
    runner = KopfRunner(
        ["run", "--standalone", "-n", namespace, "-m", "portcullis.controller.handlers", "-m", __name__],
        timeout=30,
    )
    runner.__enter__()
    try:
        yield runner
    finally:
        # Joining the thread blocks; do it off the loop that serves the emulator.
        await anyio.to_thread.run_sync(runner.__exit__, None, None, None)
        install(Options())


async def eventually(check: Callable[[], Awaitable[bool] | bool], *, timeout: float = 10.0, what: str = "") -> None:
    """Poll `check` until it holds; fail after `timeout` seconds (a deadline, not a sleep)."""
    with anyio.fail_after(timeout):
        while True:
            result = check()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await anyio.sleep(0.02)
