"""The gateway in a cluster, as the operator deploys it (`portcullis gateway --in-cluster`).

Everything comes from the Kubernetes API, read with the pod's ServiceAccount:

- the compiled config from ConfigMap `<server>-config`, *watched*: a changed
  allowlist is swapped in atomically within a second or two, with no restart,
  and connected 2026-07-28 clients are told with `notifications/tools/list_changed`;
- the signing keys from Secret `<server>-signing-keys`, watched the same way, so
  a rotation reaches every replica without rolling the pods;
- revocations from ConfigMap `<server>-revocations`, watched by every replica;
- user credentials from the vault namespace, read at call time from a copy that one
  label-selected watch keeps current (`KubernetesVault.watch`), so a call costs the API
  server nothing; a deleted credential is refused once the watch delivers the deletion;
- the Secrets that `secretRef`s name (`source: shared` credentials, OAuth client secrets,
  store URLs), each from a copy kept by a watch of that one Secret (`SharedSecrets`), started
  at its first read.

Nothing is mounted, so nothing goes stale between kubelet syncs. How the copies fall back to
direct reads (before their first list, after `STALE_AFTER` seconds without a watch stream,
right after this replica's own writes) is in `portcullis.vault.mirror`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from portcullis.api.config import GatewayConfig
from portcullis.api.resources import SecretKeyReference
from portcullis.gateway import tracing
from portcullis.gateway.admin import build_admin_app, build_metrics_app
from portcullis.gateway.identity.admission import KubernetesAdminAuth
from portcullis.gateway.audit import AuditSink, JsonLinesAuditSink
from portcullis.gateway.audit.keys import KubernetesAuditKeys
from portcullis.gateway.audit.trail import AuditTrail, store_for
from portcullis.gateway.core import Gateway
from portcullis.gateway.endpoint import build_app
from portcullis.gateway.loops import BackgroundTasks, Loop, StreamWatch
from portcullis.gateway.oauth.pages import build_connect_app
from portcullis.gateway.identity.revocation import KubernetesRevocations
from portcullis.gateway.runtime import Listener, Servers, bind, new_event_loop, with_lifespan
from portcullis.gateway.identity.tokens import SigningKeys, TokenVerifier
from portcullis.kube import KubeClient
from portcullis.vault.kubernetes import KubernetesVault
from portcullis.vault.mirror import MISS, SecretMirror

log = logging.getLogger("portcullis.gateway")

MCP_PORT, ADMIN_PORT, METRICS_PORT, CONNECT_PORT = 8080, 8081, 9090, 8083


def config_from(configmap: dict[str, Any]) -> GatewayConfig:
    return GatewayConfig.model_validate_json((configmap.get("data") or {})["config.json"])


def keys_from(secret: dict[str, Any]) -> SigningKeys:
    return SigningKeys.from_json(base64.b64decode((secret.get("data") or {})["keys.json"]).decode())


async def _wait_for(client: KubeClient, path: str, what: str, timeout: float = 120.0) -> dict[str, Any]:
    """The operator creates these before the Deployment, but a pod may start first: wait, bounded."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        obj = await client.get(path)
        if obj is not None:
            return obj
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(f"{what} ({path}) did not appear within {timeout:.0f}s; is the operator running?")
        log.info("waiting for %s", what)
        await asyncio.sleep(2)


async def watch_object(
    client: KubeClient,
    collection: str,
    name: str,
    on_change: Callable[[dict[str, Any]], None],
    loop: Loop | None = None,
) -> None:
    """Call `on_change` with every new version of one named object, for ever (cancel to stop).

    The watch reconnects and paces itself; what it gives up on (a 403 until RBAC allows the
    watch, a 404 until the collection is served) is retried here with `loop`'s backoff. How
    the streams go, and every failure, is reported on `loop`.
    """
    loop = loop or Loop(f"watch {collection}/{name}")
    stream = StreamWatch(loop)
    path = f"{collection}?fieldSelector=metadata.name%3D{name}"
    try:
        while True:
            try:
                async for kind, obj in client.watch(path, observer=stream, sleep=loop.sleep, clock=loop.clock):
                    if kind in ("ADDED", "MODIFIED") and (obj.get("metadata") or {}).get("name") == name:
                        try:
                            on_change(obj)
                        except Exception:  # a bad version is logged and skipped; the last good one keeps serving
                            log.exception("ignoring unusable %s/%s", collection, name)
            except Exception as exc:
                stream.abandon()
                loop.failed(exc)
            await loop.pause()
    finally:
        stream.abandon()


class SharedSecrets:
    """Secrets named by `secretRef`s, read from a watch-fed copy of each once the gateway has started.

    The first read of a Secret GETs it and starts a watch of that one Secret (a fieldSelector on
    its name: what the gateway's Role allows); later reads use the copy, with the fallbacks of
    `SecretMirror`. A config names a handful of them; past `MAX_WATCHED`, reads GET directly.
    """

    MAX_WATCHED = 64

    def __init__(self, client: KubeClient) -> None:
        self._client = client
        self._mirrors: dict[tuple[str, str], SecretMirror] = {}
        self._tasks: BackgroundTasks | None = None

    def start(self, tasks: BackgroundTasks) -> None:
        """Watch from now on, as `tasks`' loops (reported in /v1/status, stopped with the gateway)."""
        self._tasks = tasks

    def _mirror(self, namespace: str, name: str) -> SecretMirror | None:
        mirror = self._mirrors.get((namespace, name))
        if mirror is None and self._tasks is not None and len(self._mirrors) < self.MAX_WATCHED:
            mirror = self._mirrors[(namespace, name)] = SecretMirror(self._client, namespace, name=name)
            watched = mirror
            self._tasks.run(f"secret-watch/{namespace}/{name}", lambda loop: watched.run(loop, StreamWatch(loop)))
        return mirror

    async def read(self, namespace: str, ref: SecretKeyReference) -> str | None:
        mirror = self._mirror(namespace, ref.name)
        secret = MISS if mirror is None else mirror.lookup(ref.name)
        if secret is MISS:
            secret = await self._client.get(f"/api/v1/namespaces/{namespace}/secrets/{ref.name}")
        value = ((secret or {}).get("data") or {}).get(ref.key)
        return base64.b64decode(value).decode() if value else None


async def build(
    client: KubeClient,
    server: str,
    namespace: str,
    host: str,
    ports: tuple[int, int, int, int] = (MCP_PORT, ADMIN_PORT, METRICS_PORT, CONNECT_PORT),
    *,
    audit: AuditSink | None = None,
    state_dir: Path | None = None,
) -> Servers:
    """Read the server's config and keys from the API and bind its ports; `serve()` the result."""
    base = f"/api/v1/namespaces/{namespace}"
    config = config_from(await _wait_for(client, f"{base}/configmaps/{server}-config", "the config ConfigMap"))
    keys = [keys_from(await _wait_for(client, f"{base}/secrets/{server}-signing-keys", "the signing-key Secret"))]

    shared = SharedSecrets(client)
    shared_secret = shared.read

    revocations = KubernetesRevocations(client, namespace, f"{server}-revocations")
    state = state_dir or Path(os.environ.get("PORTCULLIS_STATE_DIR", "/var/lib/portcullis"))
    ref = config.audit.postgres_url
    trail = AuditTrail(
        server=f"{namespace}/{server}",
        tenant=config.tenant,
        keys=KubernetesAuditKeys(client, config.vault_namespace),
        sinks=[audit or JsonLinesAuditSink(sys.stdout)],
        store=store_for(
            config.audit.store,
            sqlite_path=state / "audit" / "audit.db",
            postgres_url=await shared_secret(namespace, ref) if ref else None,
        ),
        on_store_failure=config.audit.on_store_failure,
        retention_days=config.audit.retention_days,
        capacity=config.audit.queue_size,
        # The default writer id starts with the host name, which in a pod is the pod's name:
        # an auditor can tell which replica wrote what.
    )
    vault = KubernetesVault(client, config.vault_namespace, key_secret=config.vault_key_secret)
    gateway = Gateway(
        config,
        verifier=TokenVerifier(lambda: keys[0], issuer=config.server.issuer, audience=config.server.url),
        vault=vault,
        revocations=revocations,
        audit=trail,
        secrets=shared_secret,
    )

    def on_config(obj: dict[str, Any]) -> None:
        new = config_from(obj)
        if new != gateway.config:
            log.info("config changed: %d tools exposed", len(new.tools))
            gateway.swap_config(new)

    def on_keys(obj: dict[str, Any]) -> None:
        keys[0] = keys_from(obj)

    async def start() -> None:
        await gateway.start()
        # The watches are the gateway's background tasks: kept, reported in /v1/status, and
        # stopped by gateway.stop(). Two gate readiness until they first sync: a replica that
        # never saw its config stream open would miss allowlist changes (a narrowed allowlist
        # included), and one that never read the revocations would accept revoked tokens.
        # Failing later (an API server outage) does not make replicas unready: they keep
        # serving what they last read, rather than all leaving their Service at once.
        loops = gateway.background
        loops.run(
            "config-watch",
            lambda loop: watch_object(client, f"{base}/configmaps", f"{server}-config", on_config, loop),
            gates_readiness=True,
        )
        loops.run("keys-watch", lambda loop: watch_object(client, f"{base}/secrets", f"{server}-signing-keys", on_keys, loop))
        loops.run("revocations-watch", revocations.run, gates_readiness=True)
        # Not a readiness gate: until it has listed, and whenever it is stale, reads GET directly.
        loops.run("vault-watch", lambda loop: vault.watch(loop, StreamWatch(loop)))
        shared.start(loops)

    async def stop() -> None:
        await gateway.stop()  # cancels and awaits the watches with its other tasks, raising none of their failures

    auth = KubernetesAdminAuth(client, namespace=namespace, server=server)
    admin_app = build_admin_app(gateway, auth=auth, keys=lambda: keys[0])
    mcp_port, admin_port, metrics_port, connect_port = ports
    return Servers(
        [
            Listener(with_lifespan(build_app(gateway, replica_url=_replica_url(mcp_port)), start, stop), bind(host, mcp_port), "mcp"),
            Listener(admin_app, bind(host, admin_port), "admin"),
            Listener(build_metrics_app(), bind(host, metrics_port), "metrics"),
            Listener(build_connect_app(gateway.credentials.oauth), bind(host, connect_port), "connect"),
        ],
        gateway=gateway,
    )


async def run(server: str, namespace: str, host: str) -> None:
    async with KubeClient.in_cluster() as client:
        servers = await build(client, server, namespace, host)
        servers.freeze_heap_when_started = True
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, servers.stop)
        await servers.serve()


def main(*, server: str | None, namespace: str | None, host: str) -> int:
    if not server or not namespace:
        print("portcullis gateway: --server and --namespace (or PORTCULLIS_SERVER/PORTCULLIS_NAMESPACE) are required", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    tracing.configure_from_env()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(run(server, namespace, host))
    return 0


def _replica_url(mcp_port: int) -> str:
    """Where the other replicas reach this pod's MCP port: its pod IP (the downward API's POD_IP)."""
    pod_ip = os.environ.get("POD_IP", "")
    if not pod_ip:
        log.warning(
            "POD_IP is not set: answers to requests relayed from this replica must land on it "
            "(set POD_IP from status.podIP, as the operator's Deployment does)"
        )
        return ""
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    return f"http://{host}:{mcp_port}/mcp"
