"""Every kopf handler of the operator, in one registry module.

Handlers are thin: they gather inputs from kopf (bodies, indexes, settings) and hand off
to named functions in `reconcile.py`. kopf has no cross-resource triggers, so ToolMappings
and MCPConnections are kept in kopf indexes (in memory): mappings by the server they name
and by the connection they use, connections by name. A change to one re-reconciles exactly
the servers it touches, and each of those reconciles reads only its own mappings and their
connections: the work per server does not grow with the namespace (one Gmail connection
shared by 500 servers costs each of them what it costs one). A connection's own status
(`Accepted`, and whether any mapping uses it) depends on the connection and the mappings
that name it, never on a server, so it is written from the connection's and the mappings'
events, not by every server's reconcile. Children are watched through their
`managed-by` label, so an edited or deleted child is put back at once; the per-server
resync daemon covers what no watch sees (the cluster-scoped binding, the vault
namespace) and refreshes the gateway-reported tool counts and the key schedule.

Mappings, connections and children are observed with `on.event`, which writes nothing
to the objects it watches (no finalizers, no kopf annotations); only servers get kopf's
change handlers, because only their deletion needs a finalizer.

Every hand-off runs inside `metrics.observe_reconcile(kind)`, which times it and counts it as a
success or an error (kopf's TemporaryError and PermanentError too) for Prometheus; the
kind is the one the handler fired for, and children count under their server.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from typing import Any

import kopf

from portcullis.api.resources import GROUP, VERSION
from portcullis.controller import metrics
from portcullis.controller import options as options_module
from portcullis.controller.cluster import JsonObject, KopfCluster
from portcullis.controller.gateway_report import read_gateway_status
from portcullis.controller.reconcile import (
    MappingRefs,
    Memory,
    ServerKey,
    World,
    clean_up_server,
    mapping_connection_ref,
    mapping_server_ref,
    reconcile_server,
    report_orphan_mapping,
    write_connection_status,
)
from portcullis.render.metadata import MANAGED_BY, MANAGED_BY_LABEL, SERVER_LABEL

SERVERS = (GROUP, VERSION, "virtualmcpservers")
MAPPINGS = (GROUP, VERSION, "toolmappings")
CONNECTIONS = (GROUP, VERSION, "mcpconnections")
# Namespaced children, watched by label. (The ClusterRoleBinding and the vault-namespace
# Role are left to the resync: watching them would need cluster-wide list/watch RBAC.)
CHILDREN = (
    ("", "v1", "configmaps"),
    ("", "v1", "secrets"),
    ("", "v1", "services"),
    ("", "v1", "serviceaccounts"),
    ("apps", "v1", "deployments"),
    ("rbac.authorization.k8s.io", "v1", "roles"),
    ("rbac.authorization.k8s.io", "v1", "rolebindings"),
    ("autoscaling", "v2", "horizontalpodautoscalers"),
    ("policy", "v1", "poddisruptionbudgets"),
)
OURS = {MANAGED_BY_LABEL: MANAGED_BY}
FINALIZER = "portcullis.dev/cleanup"
KOPF_PREFIX = "kopf.portcullis.dev"
METRICS_MEMO = "portcullis_metrics"

# kopf passes every index to handlers by name; indexes are not in kopf's handler
# protocols, so they take a default to keep the handlers assignable to those protocols.
Index = Any  # kopf.Index[key, value]: a mapping of key -> iterable store of values


def _ns(namespace: str | None) -> str:
    # All three kinds are namespaced; kopf types namespace as optional for cluster-scoped kinds.
    if namespace is None:
        raise kopf.PermanentError("expected a namespaced object")
    return namespace


def _snapshot(body: Any) -> JsonObject:
    return {k: copy.deepcopy(dict(body.get(k) or {})) for k in ("metadata", "spec", "status")}


def _cluster(memo: Any, logger: Any) -> KopfCluster:
    # kopf hands `settings` to activity handlers only; the startup handler keeps them.
    memory = _memory(memo)
    return KopfCluster(memory.settings, logger, observe=memory)


def _memory(memo: Any) -> Memory:
    memory: Memory = memo.portcullis
    return memory


def _world(mappings_by_server: Index, connections_by_name: Index) -> World:
    def world(key: ServerKey) -> tuple[list[JsonObject], list[JsonObject]]:
        mappings = list(mappings_by_server.get(key, []))
        names = sorted({ref for m in mappings if (ref := mapping_connection_ref(m)) is not None})
        connections = [c for name in names for c in connections_by_name.get((key[0], name), [])]
        return mappings, connections

    return world


def _connection_users(mappings_by_connection: Index, namespace: str, connection: str) -> list[str | None]:
    """The server each mapping that names `connection` names (None for a mapping naming none)."""
    return list(mappings_by_connection.get((namespace, connection), []))


def _known_servers(servers_by_key: Index, keys: set[ServerKey]) -> list[ServerKey]:
    return sorted(k for k in keys if k in servers_by_key)


# --- startup --------------------------------------------------------------------------


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Fires once when the operator starts: settings and per-operator memory."""
    memo.portcullis = Memory(settings=settings)
    settings.persistence.finalizer = FINALIZER
    # kopf's own annotations get a prefix of their own: kopf leaves every annotation under
    # its storage prefix out of the diff it watches, and `portcullis.dev/rotate-keys` on a
    # server is a change the update handler must see.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=KOPF_PREFIX, key="last-handled-configuration"
    )
    # kopf reports every handler run as a Kubernetes Event; keep only the ones worth reading.
    settings.posting.level = logging.WARNING
    for group, version, plural in CHILDREN:
        settings.watching.label_selectors[group, version, plural] = f"{MANAGED_BY_LABEL}={MANAGED_BY}"


# A port that cannot be bound is a misconfiguration, not a passing fault: fail the start
# (as kopf does for its liveness port) instead of retrying while the operator runs unseen.
@kopf.on.startup(errors=kopf.ErrorsMode.PERMANENT)
def serve_metrics(memo: kopf.Memo, **_: Any) -> None:
    """Fires once when the operator starts: serve Prometheus metrics, if a port is set."""
    port = options_module.current().metrics_port
    if port is not None:
        memo[METRICS_MEMO] = metrics.serve(port)


@kopf.on.cleanup()
def stop_metrics(memo: kopf.Memo, **_: Any) -> None:
    """Fires once when the operator stops: close the metrics port."""
    server = memo.pop(METRICS_MEMO, None)
    if server is not None:
        server.stop()


# --- indexes ------------------------------------------------------------------------


@kopf.index(*SERVERS)
def servers_by_key(namespace: str | None, name: str, **_: Any) -> dict[ServerKey, bool]:
    """Indexes every VirtualMCPServer so mapping and child events can find it."""
    return {(_ns(namespace), name): True}


@kopf.index(*MAPPINGS)
def mappings_by_server(namespace: str | None, body: kopf.Body, **_: Any) -> dict[ServerKey, JsonObject]:
    """Indexes every ToolMapping by the server it names (the compile input of that server)."""
    server = mapping_server_ref(body)
    return {} if server is None else {(_ns(namespace), server): _snapshot(body)}


@kopf.index(*MAPPINGS)
def mappings_by_connection(namespace: str | None, body: kopf.Body, **_: Any) -> dict[tuple[str, str], str | None]:
    """Indexes every ToolMapping's server by the connection it names (who uses a connection)."""
    connection = mapping_connection_ref(body)
    return {} if connection is None else {(_ns(namespace), connection): mapping_server_ref(body)}


@kopf.index(*CONNECTIONS)
def connections_by_name(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], JsonObject]:
    """Indexes every MCPConnection by name (the compile input of the servers that use it)."""
    return {(_ns(namespace), name): _snapshot(body)}


# --- servers ------------------------------------------------------------------------


@kopf.on.resume(*SERVERS)
@kopf.on.create(*SERVERS)
@kopf.on.update(*SERVERS)
async def server_changed(
    *,
    namespace: str | None,
    name: str,
    memo: kopf.Memo,
    logger: kopf.Logger,
    mappings_by_server: Index = None,
    connections_by_name: Index = None,
    **_: Any,
) -> None:
    """Fires when a VirtualMCPServer is created, changed, or found at startup: reconcile it."""
    with metrics.observe_reconcile("VirtualMCPServer"):
        await reconcile_server(
            _cluster(memo, logger),
            (_ns(namespace), name),
            _world(mappings_by_server, connections_by_name),
            options=options_module.current(),
            memory=_memory(memo),
        )


@kopf.on.delete(*SERVERS)
async def server_deleted(
    *,
    body: kopf.Body,
    namespace: str | None,
    memo: kopf.Memo,
    logger: kopf.Logger,
    mappings_by_server: Index = None,
    **_: Any,
) -> None:
    """Fires when a VirtualMCPServer is deleted: remove what owner references cannot."""
    with metrics.observe_reconcile("VirtualMCPServer"):
        cluster = _cluster(memo, logger)
        await clean_up_server(cluster, _snapshot(body), _memory(memo))
        for raw in list(mappings_by_server.get((_ns(namespace), str(body.get("metadata", {}).get("name"))), [])):
            await report_orphan_mapping(cluster, raw)


@kopf.daemon(*SERVERS, cancellation_timeout=5.0)
async def server_resync(
    *,
    namespace: str | None,
    name: str,
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    memo: kopf.Memo,
    logger: kopf.Logger,
    mappings_by_server: Index = None,
    connections_by_name: Index = None,
    **_: Any,
) -> None:
    """Runs for each live VirtualMCPServer: refresh tool counts, rotate keys when due, repair drift."""
    from portcullis.controller.reconcile import parse_server

    memory = _memory(memo)
    while not stopped:
        options = options_module.current()
        # A plain sleep: kopf cancels async daemons when they must stop (cancellation_timeout
        # is set). `await stopped.wait(n)` races that cancellation on Python 3.11: a
        # cancellation landing as the wait times out escaped as a TimeoutError and failed
        # the operator's shutdown.
        await asyncio.sleep(options.resync_seconds)
        try:
            report = read_gateway_status(await options.fetch_status(parse_server(_snapshot(body))))
        except Exception as exc:  # a bad spec or a broken fetch must not end the daemon
            logger.debug(f"No gateway status: {exc!r}")
            report = None
        if report is not None:
            memory.gateway_status[(_ns(namespace), name)] = report
        try:
            with metrics.observe_reconcile("VirtualMCPServer"):  # inside the try: a failed resync still counts
                await reconcile_server(
                    _cluster(memo, logger),
                    (_ns(namespace), name),
                    _world(mappings_by_server, connections_by_name),
                    options=options,
                    memory=memory,
                )
        except kopf.PermanentError:
            raise
        except Exception as exc:  # retried at the next resync; the change handlers retry on their own
            logger.warning(f"Resync failed, will retry: {exc!r}")


# --- mappings and connections -----------------------------------------------------


@kopf.on.event(*MAPPINGS)
async def mapping_event(
    *,
    event: kopf.RawEvent,
    namespace: str | None,
    name: str,
    body: kopf.Body,
    memo: kopf.Memo,
    logger: kopf.Logger,
    servers_by_key: Index = None,
    mappings_by_server: Index = None,
    mappings_by_connection: Index = None,
    connections_by_name: Index = None,
    **_: Any,
) -> None:
    """Fires on every ToolMapping event: re-reconcile the servers it names now and named before."""
    namespace = _ns(namespace)
    memory = _memory(memo)
    if memory.spec_already_handled(event.get("type"), body):
        return  # a status write (ours): the spec, all that a reconcile reads, is unchanged
    cluster = _cluster(memo, logger)
    raw = _snapshot(body)
    now = MappingRefs(mapping_server_ref(raw), mapping_connection_ref(raw))
    before = memory.mapping_refs.pop((namespace, name), MappingRefs(None, None))
    if event.get("type") != "DELETED":
        memory.mapping_refs[(namespace, name)] = now
    keys = {(namespace, t) for t in (now.server, before.server) if t is not None}
    with metrics.observe_reconcile("ToolMapping"):
        for key in _known_servers(servers_by_key, keys):
            await reconcile_server(
                cluster, key, _world(mappings_by_server, connections_by_name),
                options=options_module.current(), memory=memory,
            )
        if event.get("type") != "DELETED" and now.server is not None and (namespace, now.server) not in servers_by_key:
            await report_orphan_mapping(cluster, raw)
        # Whether a connection is used changes only with the mappings that name it.
        for connection in sorted({c for c in (now.connection, before.connection) if c is not None}):
            for raw_connection in list(connections_by_name.get((namespace, connection), [])):
                users = _connection_users(mappings_by_connection, namespace, connection)
                await write_connection_status(cluster, raw_connection, used=bool(users))


@kopf.on.event(*CONNECTIONS)
async def connection_event(
    *,
    event: kopf.RawEvent,
    namespace: str | None,
    name: str,
    body: kopf.Body,
    memo: kopf.Memo,
    logger: kopf.Logger,
    servers_by_key: Index = None,
    mappings_by_server: Index = None,
    mappings_by_connection: Index = None,
    connections_by_name: Index = None,
    **_: Any,
) -> None:
    """Fires on every MCPConnection event: re-reconcile the servers whose mappings use it."""
    namespace = _ns(namespace)
    if _memory(memo).spec_already_handled(event.get("type"), body):
        return  # a status write (ours): the spec, all that a reconcile reads, is unchanged
    cluster = _cluster(memo, logger)
    users = _connection_users(mappings_by_connection, namespace, name)
    known = _known_servers(servers_by_key, {(namespace, s) for s in users if s is not None})
    with metrics.observe_reconcile("MCPConnection"):
        # One reconcile per server that uses it, each reading only that server's mappings
        # and their connections: a shared connection's change costs O(servers), not O(servers²).
        for key in known:
            await reconcile_server(
                cluster, key, _world(mappings_by_server, connections_by_name),
                options=options_module.current(), memory=_memory(memo),
            )
        if event.get("type") != "DELETED":
            await write_connection_status(cluster, _snapshot(body), used=bool(users))


# --- children -------------------------------------------------------------------------


async def child_event(
    *,
    event: kopf.RawEvent,
    namespace: str | None,
    labels: kopf.Labels,
    body: kopf.Body,
    memo: kopf.Memo,
    logger: kopf.Logger,
    servers_by_key: Index = None,
    mappings_by_server: Index = None,
    connections_by_name: Index = None,
    **_: Any,
) -> None:
    """Fires on every event of a labelled child: put it back if it drifted, refresh readiness."""
    server = labels.get(SERVER_LABEL)
    if server is None or namespace is None or (namespace, server) not in servers_by_key:
        return
    if _memory(memo).already_seen(event.get("type"), body):
        return  # a version a reconcile already wrote or compared: nothing new to repair
    with metrics.observe_reconcile("VirtualMCPServer"):  # a child's repair is a reconcile of its server
        await reconcile_server(
            _cluster(memo, logger),
            (namespace, server),
            _world(mappings_by_server, connections_by_name),
            options=options_module.current(),
            memory=_memory(memo),
        )


for _group, _version, _plural in CHILDREN:
    kopf.on.event(_group, _version, _plural, labels=OURS, id=f"child_event/{_plural}")(child_event)


@kopf.on.probe(id="servers")
def servers_known(servers_by_key: Index = None, **_: Any) -> int:
    """Answers liveness probes with the number of servers this operator tracks."""
    return len(servers_by_key)

