"""Reconciling one VirtualMCPServer: parse, compile, render, apply, report.

Everything here is a named function over plain data and a `Cluster`; the kopf handlers
only gather inputs (from kopf's in-memory indexes of servers, mappings and connections)
and call in. That keeps the control flow readable top to bottom and testable.

Apply is create-if-missing, else merge-patch-if-different (see `desired.py`), so an
unchanged world produces reads and no writes. Status is written the same way: built
from what was observed, compared with what is there, patched only when it differs
(for mappings and connections, "what is there" is the live object whenever kopf's
index copy disagrees, because that copy lags our own writes).

Reconciles of one server are serialised by a per-server lock: a server can be triggered
by its own change, by a mapping, by a connection, by a child's event and by the resync
daemon, all at once.

A reconcile reads only its own server's mappings and the connections they name (the
`World` the handlers build from kopf's indexes), and writes only its own children and
statuses (the server's and its mappings'): nothing in it grows with the number of other
servers in the namespace. It was not so: every reconcile parsed every mapping of the
namespace and rewrote the status of every connection, so N servers sharing one connection
cost O(N) each (benchmarks/operator_scale.py, benchmarks/results/operator-scale-2026-12-02.md).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from pydantic import ValidationError

from portcullis.api.manifests import format_validation_error
from portcullis.api.resources import API_VERSION, MCPConnection, ToolMapping, VirtualMCPServer
from portcullis.api.status import ConditionType, Reason
from portcullis.compile import Problem, cluster_url, compile
from portcullis.controller.cluster import Cluster, JsonObject, ObjectKey, Ref, object_key
from portcullis.controller.conditions import (
    Condition,
    ServerState,
    accepted_status,
    mapping_condition,
    server_status,
)
from portcullis.controller.desired import is_subset, without
from portcullis.controller.gateway_report import GatewayReport, UnknownTool
from portcullis.controller.keys import decide_keys
from portcullis.controller.options import Options
from portcullis.render.autoscaler import build_autoscaler
from portcullis.render.children import build_children
from portcullis.render.disruption_budget import build_disruption_budget
from portcullis.render.metadata import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    SERVER_LABEL,
    VAULT_NAMESPACE_ANNOTATION,
    gateway_account_name,
    signing_keys_name,
    vault_role_name,
)

ServerKey = tuple[str, str]
_SEEN_VERSIONS = 8
# One server's mappings and the connections they name, as kopf's indexes hold them right now.
World = Callable[[ServerKey], tuple[list[JsonObject], list[JsonObject]]]


class MappingRefs(NamedTuple):
    """What a ToolMapping named when last seen: its server and its connection."""

    server: str | None
    connection: str | None


@dataclass
class Memory:
    """Per-operator state that outlives one handler call."""

    settings: Any = None  # kopf.OperatorSettings, for kopf's API client
    locks: dict[ServerKey, asyncio.Lock] = field(default_factory=dict)
    waiting: set[ServerKey] = field(default_factory=set)
    # (namespace, mapping) -> the server and connection it named when last seen, to
    # re-reconcile the old server (and re-report the old connection) when a mapping is
    # retargeted or deleted.
    mapping_refs: dict[ServerKey, MappingRefs] = field(default_factory=dict)
    gateway_status: dict[ServerKey, GatewayReport] = field(default_factory=dict)
    # Recent resourceVersions of each object as this operator read or wrote them (shown by
    # KopfCluster). Every write comes back as a watch event, and kopf delivers one object's
    # events in order, one at a time, so echoes can arrive after newer versions: without
    # this, each child created and each status patched re-triggered a full reconcile.
    seen: dict[ObjectKey, deque[str]] = field(default_factory=dict)
    # The generation of each ToolMapping and MCPConnection last acted on: only their spec
    # feeds a reconcile, and status writes (ours) do not move the generation.
    generations: dict[ObjectKey, int] = field(default_factory=dict)

    def lock(self, key: ServerKey) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())

    def saw(self, obj: JsonObject) -> None:
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if isinstance(version, str):
            versions = self.seen.setdefault(object_key(obj), deque(maxlen=_SEEN_VERSIONS))
            if version not in versions:
                versions.append(version)

    def forget(self, key: ObjectKey) -> None:
        self.seen.pop(key, None)
        self.generations.pop(key, None)

    def already_seen(self, event_type: str | None, body: Mapping[str, Any]) -> bool:
        """True if this event carries a version of the object we already acted on.

        A deletion is always news (an emulator may repeat the last version in it), and
        forgets the object.
        """
        if event_type == "DELETED":
            self.forget(object_key(body))
            return False
        version = (body.get("metadata") or {}).get("resourceVersion")
        return version is not None and version in self.seen.get(object_key(body), ())

    def spec_already_handled(self, event_type: str | None, body: Mapping[str, Any]) -> bool:
        """True if this event's generation (its spec) was already acted on; else record it."""
        key = object_key(body)
        if event_type == "DELETED":
            self.forget(key)
            return False
        generation = (body.get("metadata") or {}).get("generation")
        if not isinstance(generation, int):
            return False
        if generation <= self.generations.get(key, 0):
            return True
        self.generations[key] = generation
        return False


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def server_key(raw: JsonObject) -> ServerKey:
    meta = raw.get("metadata") or {}
    return (str(meta.get("namespace", "default")), str(meta.get("name")))


# --- parsing at the edge -------------------------------------------------------------


def parse_server(raw: JsonObject) -> VirtualMCPServer:
    return VirtualMCPServer.model_validate({"metadata": raw["metadata"], "spec": raw.get("spec") or {}})


@dataclass(frozen=True)
class Parsed:
    mappings: list[ToolMapping]
    connections: list[MCPConnection]
    invalid: list[Problem]


def parse_world(raw_mappings: Iterable[JsonObject], raw_connections: Iterable[JsonObject]) -> Parsed:
    """Parse what can be parsed; an unparseable object is a Problem, not a failure of all."""
    mappings, connections, invalid = [], [], []
    for raw in raw_mappings:
        try:
            mappings.append(ToolMapping.model_validate({"metadata": raw["metadata"], "spec": raw.get("spec") or {}}))
        except ValidationError as exc:
            invalid.append(_invalid("ToolMapping", raw, exc))
    for raw in raw_connections:
        try:
            connections.append(MCPConnection.model_validate({"metadata": raw["metadata"], "spec": raw.get("spec") or {}}))
        except ValidationError as exc:
            invalid.append(_invalid("MCPConnection", raw, exc))
    return Parsed(mappings, connections, invalid)


def _invalid(kind: str, raw: JsonObject, exc: ValidationError) -> Problem:
    name = str((raw.get("metadata") or {}).get("name"))
    return Problem(kind, name, "spec", Reason.INVALID_SPEC, format_validation_error(exc).strip())


def mapping_server_ref(raw: Mapping[str, Any]) -> str | None:
    ref = (raw.get("spec") or {}).get("serverRef") or {}
    name = ref.get("name")
    return name if isinstance(name, str) else None


def mapping_connection_ref(raw: Mapping[str, Any]) -> str | None:
    ref = (raw.get("spec") or {}).get("connectionRef") or {}
    name = ref.get("name")
    return name if isinstance(name, str) else None


# --- applying children --------------------------------------------------------------

# Fields we create but do not keep in step: the keys (rotated by their own schedule, not by
# drift) and the revocation list (written by the gateways).
_UNOWNED_FIELDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("Secret", "-signing-keys"): ("data",),
    ("ConfigMap", "-revocations"): ("data",),
}


def owned_part(obj: JsonObject) -> JsonObject:
    name = obj["metadata"]["name"]
    for (kind, suffix), keys in _UNOWNED_FIELDS.items():
        if obj["kind"] == kind and name.endswith(suffix):
            return without(obj, *keys)
    return obj


async def apply(cluster: Cluster, desired: JsonObject) -> JsonObject:
    """Create `desired` if missing; else patch it only where it differs. Returns the observed object."""
    return await apply_over(cluster, desired, await cluster.get(Ref.of(desired)))


async def apply_over(cluster: Cluster, desired: JsonObject, observed: JsonObject | None) -> JsonObject:
    """`apply` when the current object (`observed`, None if missing) was already read."""
    if observed is None:
        return await cluster.create(desired)
    owned = owned_part(desired)
    if is_subset(owned, observed):
        return observed
    patched = await cluster.patch(Ref.of(desired), owned)
    return patched if patched is not None else await cluster.create(desired)


def _is_ours(obj: JsonObject, server: str) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return bool(labels.get(MANAGED_BY_LABEL) == MANAGED_BY and labels.get(SERVER_LABEL) == server)


async def remove_vault_grant(cluster: Cluster, server: VirtualMCPServer, namespace: str) -> None:
    """Delete the server's vault Role and RoleBinding in `namespace`, if they are ours."""
    name = vault_role_name(server)
    for kind in ("RoleBinding", "Role"):
        ref = Ref("rbac.authorization.k8s.io/v1", kind, name, namespace)
        found = await cluster.get(ref)
        if found is not None and _is_ours(found, server.metadata.name):
            await cluster.delete(ref)


async def remove_if_present(cluster: Cluster, ref: Ref) -> None:
    if await cluster.get(ref) is not None:
        await cluster.delete(ref)


async def write_status(cluster: Cluster, ref: Ref, current: JsonObject | None, desired: JsonObject) -> bool:
    if is_subset(desired, current or {}):
        return False
    await cluster.patch(ref, {"status": desired}, subresource="status")
    return True


# --- the reconcile ------------------------------------------------------------------


async def reconcile_server(cluster: Cluster, key: ServerKey, world: World, *, options: Options, memory: Memory) -> None:
    """Bring one server's children and status (and its mappings' status) in line.

    Triggers coalesce: while one reconcile of a server runs, at most one more waits, and it
    reads the server and the indexes only once it runs, so it sees every change made meanwhile.
    """
    if key in memory.waiting:
        return
    memory.waiting.add(key)
    try:
        async with memory.lock(key):
            memory.waiting.discard(key)
            # Re-read the server: a trigger's copy may be stale, and a server being
            # deleted must not get its children back.
            fresh = await cluster.get(Ref(API_VERSION, "VirtualMCPServer", key[1], key[0]))
            if fresh is None or (fresh.get("metadata") or {}).get("deletionTimestamp"):
                return
            mappings, connections = world(key)
            await _reconcile_locked(cluster, fresh, mappings, connections, options, memory)
    finally:
        memory.waiting.discard(key)


async def _reconcile_locked(
    cluster: Cluster,
    raw_server: JsonObject,
    raw_mappings: list[JsonObject],
    raw_connections: list[JsonObject],
    options: Options,
    memory: Memory,
) -> None:
    now = now_utc()
    stamp = now.isoformat().replace("+00:00", "Z")
    key = server_key(raw_server)
    ref = Ref(API_VERSION, "VirtualMCPServer", key[1], key[0])
    generation = (raw_server.get("metadata") or {}).get("generation")
    previous_status = raw_server.get("status") or {}

    try:
        server = parse_server(raw_server)
    except ValidationError as exc:
        state = ServerState(url="", generation=generation, invalid_spec=format_validation_error(exc).strip())
        await write_status(cluster, ref, previous_status, server_status(state, previous_status, now=stamp))
        return

    parsed = parse_world(raw_mappings, raw_connections)
    compilation = compile(server, parsed.mappings, parsed.connections)

    secret_ref = Ref("v1", "Secret", signing_keys_name(server), server.metadata.namespace)
    account_ref = Ref("v1", "ServiceAccount", gateway_account_name(server), server.metadata.namespace)
    secret, account = await asyncio.gather(cluster.get(secret_ref), cluster.get(account_ref))
    decision = decide_keys(
        secret,
        server_annotations=server.metadata.annotations,
        now=now,
        rotation_seconds=options.key_rotation_seconds,
        keep_seconds=server.spec.session_tokens.max_ttl_seconds,
    )
    children = build_children(server, compilation.config, pod=options.gateway, keys_json=decision.keys_json)

    # The gateway ServiceAccount remembers where its vault Role was granted: when
    # spec.vault.namespace moves, remove the old grant first, and only then record the
    # new namespace on the account (so a failure in between is retried, not forgotten).
    granted_in = ((account or {}).get("metadata", {}).get("annotations") or {}).get(VAULT_NAMESPACE_ANNOTATION)
    if granted_in and granted_in != server.vault_namespace:
        await remove_vault_grant(cluster, server, granted_in)

    async def apply_child(child: JsonObject) -> JsonObject:
        if child["kind"] == "ServiceAccount":
            return await apply_over(cluster, child, account)
        if child["kind"] != "Secret":
            return await apply(cluster, child)
        if secret is None:
            return await cluster.create({**child, "metadata": {**child["metadata"], "annotations": decision.annotations}})
        if decision.changed:
            patch = {**child, "metadata": {**child["metadata"], "annotations": decision.annotations}}
            return await cluster.patch(secret_ref, patch) or secret
        return await apply_over(cluster, child, secret)

    # Children are independent objects, so they are read and written concurrently: a
    # reconcile costs about one round trip per phase, not one per child. The Deployment
    # goes last, once the ServiceAccount, config and keys its pods mount exist (a pod
    # refused for a missing ServiceAccount is retried only after a backoff).
    first = [c for c in children if c["kind"] != "Deployment"]
    last = [c for c in children if c["kind"] == "Deployment"]
    observed: dict[str, JsonObject] = {}
    for phase in (first, last):
        for child, result in zip(phase, await asyncio.gather(*(apply_child(c) for c in phase)), strict=True):
            observed[child["kind"]] = result

    ns = server.metadata.namespace
    unwanted = []
    if build_autoscaler(server) is None:
        unwanted.append(Ref("autoscaling/v2", "HorizontalPodAutoscaler", server.metadata.name, ns))
    if build_disruption_budget(server) is None:
        unwanted.append(Ref("policy/v1", "PodDisruptionBudget", server.metadata.name, ns))
    await asyncio.gather(*(remove_if_present(cluster, ref) for ref in unwanted))

    # --- status of the server
    gateway = memory.gateway_status.get(key)
    mine = [m for m in raw_mappings if mapping_server_ref(m) == server.metadata.name]
    mine_names = {str(m["metadata"]["name"]) for m in mine}
    problems = [p for p in compilation.problems] + [
        p for p in parsed.invalid if p.kind == "ToolMapping" and p.name in mine_names
    ]
    rejected = {p.name for p in problems if p.kind == "ToolMapping"}
    deployment_status = observed.get("Deployment", {}).get("status") or {}
    wanted = server.spec.autoscaling.min_replicas if server.spec.autoscaling else server.spec.replicas
    state = ServerState(
        url=cluster_url(server),
        generation=generation,
        problems=problems,
        rejected_mappings=len(rejected),
        exposed_tools=len(compilation.config.tools),
        available_replicas=int(deployment_status.get("availableReplicas") or 0),
        wanted_replicas=wanted,
        gateway=gateway,
    )
    await write_status(cluster, ref, previous_status, server_status(state, previous_status, now=stamp))

    # --- status of the mappings that name this server (a connection's own status is not
    # a server's business: see `write_connection_status`)
    unknown = gateway.still_unknown(compilation.config.tools) if gateway is not None else {}
    for raw in mine:
        name = str(raw["metadata"]["name"])
        mapping_problems = [p for p in problems if p.kind == "ToolMapping" and p.name == name]
        if not mapping_problems and unknown.get(name):
            mapping_problems = [unknown_tools_problem(name, unknown[name])]
        await write_accepted(cluster, "ToolMapping", raw, mapping_condition(mapping_problems), stamp)


def unknown_tools_problem(mapping: str, tools: list[UnknownTool]) -> Problem:
    """A mapping that names tools its (listed) upstream does not offer: not fatal, but said."""
    by_connection: dict[str, list[str]] = {}
    for tool in tools:
        shown = tool.name if tool.exposed_as == tool.name else f"{tool.name} (as {tool.exposed_as})"
        by_connection.setdefault(tool.connection, []).append(shown)
    message = "; ".join(
        f"connection {conn!r} does not offer {', '.join(sorted(names))}" for conn, names in sorted(by_connection.items())
    )
    return Problem("ToolMapping", mapping, "spec.tools", Reason.UNKNOWN_UPSTREAM_TOOL, message)


async def write_accepted(cluster: Cluster, kind: str, raw: JsonObject, condition: Condition, stamp: str) -> None:
    """Write the `Accepted` status of a mapping or connection, if the live object differs.

    `raw` is kopf's index copy, which lags our own writes: kopf delivers one object's
    events in order, so while a handler of that object runs, its copy still lacks the
    status we just wrote, and every reconcile in between wrote the same status again
    (11 PATCHes to one mapping in a benchmark run). When the copy differs, the live
    object decides: one GET instead of a redundant PATCH (and its watch echo). If the
    live spec is newer than the copy, this condition describes an old spec: the event
    of the newer one is on its way and its reconcile reports it.
    """
    meta = raw.get("metadata") or {}
    ref = Ref(API_VERSION, kind, str(meta.get("name")), str(meta.get("namespace", "default")))
    generation = meta.get("generation")
    desired = accepted_status(condition, raw.get("status") or {}, generation=generation, now=stamp)
    if is_subset(desired, raw.get("status") or {}):
        return
    live = await cluster.get(ref)
    if live is None or (live.get("metadata") or {}).get("generation") != generation:
        return
    previous = live.get("status") or {}
    await write_status(cluster, ref, previous, accepted_status(condition, previous, generation=generation, now=stamp))


async def write_connection_status(cluster: Cluster, raw: JsonObject, *, used: bool) -> None:
    """Write a connection's `Accepted` status: its spec parses, and whether any mapping names it.

    Called on the connection's own events and on the events of mappings that name it (now
    or before), which are all that can change it; not by server reconciles, which would
    make each of N servers sharing the connection pay for it.
    """
    invalid = parse_world([], [raw]).invalid
    if invalid:
        condition = Condition(ConditionType.ACCEPTED, False, Reason.INVALID_SPEC, invalid[0].message)
    elif used:
        condition = Condition(ConditionType.ACCEPTED, True, Reason.ACCEPTED, "referenced by a ToolMapping")
    else:
        condition = Condition(ConditionType.ACCEPTED, True, Reason.UNUSED, "no ToolMapping references it")
    await write_accepted(cluster, "MCPConnection", raw, condition, now_utc().isoformat().replace("+00:00", "Z"))


async def report_orphan_mapping(cluster: Cluster, raw: JsonObject) -> None:
    """A mapping whose server does not exist: say so on the mapping."""
    meta = raw.get("metadata") or {}
    server = mapping_server_ref(raw)
    condition = Condition(
        ConditionType.ACCEPTED,
        False,
        Reason.SERVER_NOT_FOUND,
        f"no VirtualMCPServer {server!r} in namespace {meta.get('namespace')!r}",
    )
    await write_accepted(cluster, "ToolMapping", raw, condition, now_utc().isoformat().replace("+00:00", "Z"))


# --- deletion ---------------------------------------------------------------------


async def clean_up_server(cluster: Cluster, raw_server: JsonObject, memory: Memory) -> None:
    """Delete what owner references cannot reach: the cluster-scoped binding and the vault-namespace RBAC."""
    key = server_key(raw_server)
    ns, name = key
    vault_ns = ((raw_server.get("spec") or {}).get("vault") or {}).get("namespace") or ns
    async with memory.lock(key):
        await cluster.delete(
            Ref("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", f"portcullis:{ns}:{name}:auth-delegator")
        )
        if vault_ns != ns:
            await cluster.delete(Ref("rbac.authorization.k8s.io/v1", "RoleBinding", f"{name}-vault", vault_ns))
            await cluster.delete(Ref("rbac.authorization.k8s.io/v1", "Role", f"{name}-vault", vault_ns))
    memory.gateway_status.pop(key, None)
    memory.locks.pop(key, None)
    memory.forget(("VirtualMCPServer", ns, name))
