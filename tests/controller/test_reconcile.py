"""The operator end to end against the kmock emulator: kopf, handlers, real HTTP."""

from __future__ import annotations

import json
from typing import Any

import pytest

from portcullis.api.resources import API_VERSION
from portcullis.controller.options import Options, from_environment
from tests.support.kmock_support import Emulator
from tests.support.operator_runner import eventually, operator_emulator, running_operator

NS = "acme"
VMS = "portcullis.dev/v1alpha1/virtualmcpservers"
TMAPS = "portcullis.dev/v1alpha1/toolmappings"
CONNS = "portcullis.dev/v1alpha1/mcpconnections"


def exists(k8s: Emulator, resource: str, name: str, namespace: str | None = NS) -> bool:
    try:
        return not k8s.objects[resource, namespace, name].deleted
    except KeyError:
        return False


def obj(k8s: Emulator, resource: str, name: str, namespace: str | None = NS) -> dict[str, Any]:
    return dict(k8s.objects[resource, namespace, name].raw)


async def post(k8s: Emulator, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with k8s.post(path, json=body) as response:
        assert response.status < 300, await response.text()
        result: dict[str, Any] = await response.json()
        return result


async def patch(k8s: Emulator, path: str, body: dict[str, Any]) -> None:
    async with k8s.patch(path, json=body, headers={"Content-Type": "application/merge-patch+json"}) as response:
        assert response.status < 300, await response.text()


async def delete(k8s: Emulator, path: str) -> None:
    async with k8s.delete(path) as response:
        assert response.status < 300, await response.text()


def crd_path(plural: str, name: str | None = None) -> str:
    base = f"/apis/{API_VERSION}/namespaces/{NS}/{plural}"
    return f"{base}/{name}" if name else base


async def create_world(k8s: Emulator, *, tools: list[dict[str, Any]] | None = None, server_spec: dict[str, Any] | None = None) -> None:
    await post(k8s, crd_path("mcpconnections"), {
        "apiVersion": API_VERSION, "kind": "MCPConnection", "metadata": {"name": "gmail", "namespace": NS},
        "spec": {"url": "http://gmail-mcp.tools.svc:8080/mcp", "credential": {"source": "user"}},
    })
    await post(k8s, crd_path("toolmappings"), {
        "apiVersion": API_VERSION, "kind": "ToolMapping", "metadata": {"name": "summarizer-gmail", "namespace": NS},
        "spec": {"serverRef": {"name": "summarizer"}, "connectionRef": {"name": "gmail"},
                 "tools": tools if tools is not None else [{"name": "fetch_mails"}]},
    })
    await post(k8s, crd_path("virtualmcpservers"), {
        "apiVersion": API_VERSION, "kind": "VirtualMCPServer", "metadata": {"name": "summarizer", "namespace": NS},
        "spec": server_spec if server_spec is not None else {"replicas": 2},
    })


def condition(body: dict[str, Any], type_: str) -> dict[str, Any]:
    for cond in (body.get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return dict(cond)
    return {}


def config_tools(k8s: Emulator) -> list[str]:
    data = obj(k8s, "v1/configmaps", "summarizer-config")["data"]["config.json"]
    return [t["name"] for t in json.loads(data)["tools"]]


CHILDREN = [
    ("v1/serviceaccounts", "summarizer-gateway", NS),
    ("rbac.authorization.k8s.io/v1/roles", "summarizer-gateway", NS),
    ("rbac.authorization.k8s.io/v1/rolebindings", "summarizer-gateway", NS),
    ("rbac.authorization.k8s.io/v1/roles", "summarizer-vault", NS),
    ("rbac.authorization.k8s.io/v1/rolebindings", "summarizer-vault", NS),
    ("rbac.authorization.k8s.io/v1/clusterrolebindings", "portcullis:acme:summarizer:auth-delegator", None),
    ("v1/configmaps", "summarizer-config", NS),
    ("v1/configmaps", "summarizer-revocations", NS),
    ("v1/secrets", "summarizer-signing-keys", NS),
    ("apps/v1/deployments", "summarizer", NS),
    ("v1/services", "summarizer", NS),
    ("policy/v1/poddisruptionbudgets", "summarizer", NS),
]


@pytest.mark.anyio
async def test_create_makes_every_child_and_reports_status() -> None:
    async with operator_emulator() as k8s, running_operator(k8s):
        await create_world(k8s)
        await eventually(lambda: all(exists(k8s, *c) for c in CHILDREN))
        await eventually(lambda: condition(obj(k8s, VMS, "summarizer"), "ConfigValid").get("status") == "True")
        server = obj(k8s, VMS, "summarizer")
        uid = server["metadata"]["uid"]
        for resource, name, namespace in CHILDREN:
            meta = obj(k8s, resource, name, namespace)["metadata"]
            assert meta["labels"]["portcullis.dev/server"] == "summarizer"
            if namespace is not None:
                assert [o["uid"] for o in meta["ownerReferences"]] == [uid]
        assert config_tools(k8s) == ["fetch_mails"]
        status = server["status"]
        assert status["url"] == "http://summarizer.acme.svc:8080/mcp"
        assert status["phase"] == "Pending"  # no pods yet: the emulator runs no Deployment controller
        assert status["tools"] == {"exposed": 1}
        assert status["toolsSummary"] == "1/?"
        assert condition(server, "Ready")["reason"] == "DeploymentProgressing"
        await eventually(lambda: condition(obj(k8s, TMAPS, "summarizer-gmail"), "Accepted").get("status") == "True")
        await eventually(lambda: condition(obj(k8s, CONNS, "gmail"), "Accepted").get("reason") == "Accepted")


@pytest.mark.anyio
async def test_mapping_added_changed_and_removed_update_the_config() -> None:
    async with operator_emulator() as k8s, running_operator(k8s):
        await create_world(k8s)
        await eventually(lambda: exists(k8s, "v1/configmaps", "summarizer-config"))
        assert config_tools(k8s) == ["fetch_mails"]

        await patch(k8s, crd_path("toolmappings", "summarizer-gmail"),
                    {"spec": {"tools": [{"name": "fetch_mails"}, {"name": "send_mail", "as": "gmail_send"}]}})
        await eventually(lambda: config_tools(k8s) == ["fetch_mails", "gmail_send"])

        await post(k8s, crd_path("toolmappings"), {
            "apiVersion": API_VERSION, "kind": "ToolMapping", "metadata": {"name": "summarizer-more", "namespace": NS},
            "spec": {"serverRef": {"name": "summarizer"}, "connectionRef": {"name": "gmail"}, "tools": [{"name": "label"}]},
        })
        await eventually(lambda: config_tools(k8s) == ["fetch_mails", "gmail_send", "label"])

        await eventually(lambda: condition(obj(k8s, TMAPS, "summarizer-gmail"), "Accepted").get("observedGeneration") == 2)
        await eventually(lambda: condition(obj(k8s, TMAPS, "summarizer-more"), "Accepted").get("status") == "True")
        # Every status write to a mapping says something new (no rewrite from a stale copy).
        for name in ("summarizer-gmail", "summarizer-more"):
            path = crd_path("toolmappings", name) + "/status"
            written = [r.data["status"] for r in request_log(k8s) if r.method.value == "PATCH" and r.url.path == path]
            assert written and all(a != b for a, b in zip(written, written[1:], strict=False)), written

        await delete(k8s, crd_path("toolmappings", "summarizer-gmail"))
        await eventually(lambda: config_tools(k8s) == ["label"])
        await eventually(lambda: (obj(k8s, VMS, "summarizer").get("status") or {}).get("tools") == {"exposed": 1})


@pytest.mark.anyio
async def test_connection_change_updates_the_config() -> None:
    async with operator_emulator() as k8s, running_operator(k8s):
        await create_world(k8s)
        await eventually(lambda: exists(k8s, "v1/configmaps", "summarizer-config"))

        def connection_url() -> str:
            config = json.loads(obj(k8s, "v1/configmaps", "summarizer-config")["data"]["config.json"])
            return str(config["connections"]["gmail"]["url"])

        assert connection_url() == "http://gmail-mcp.tools.svc:8080/mcp"
        await patch(k8s, crd_path("mcpconnections", "gmail"), {"spec": {"url": "http://gmail-v2.tools.svc:8080/mcp"}})
        await eventually(lambda: connection_url() == "http://gmail-v2.tools.svc:8080/mcp")


@pytest.mark.anyio
async def test_server_deletion_removes_the_cluster_scoped_binding_and_vault_rbac() -> None:
    async with operator_emulator() as k8s, running_operator(k8s):
        await create_world(k8s, server_spec={"vault": {"namespace": "acme-vault"}})
        crb = ("rbac.authorization.k8s.io/v1/clusterrolebindings", "portcullis:acme:summarizer:auth-delegator", None)
        vault_role = ("rbac.authorization.k8s.io/v1/roles", "summarizer-vault", "acme-vault")
        await eventually(lambda: exists(k8s, *crb) and exists(k8s, *vault_role))
        await eventually(lambda: "portcullis.dev/cleanup" in obj(k8s, VMS, "summarizer")["metadata"].get("finalizers", []))

        await delete(k8s, crd_path("virtualmcpservers", "summarizer"))
        await eventually(lambda: not exists(k8s, VMS, "summarizer"))
        assert not exists(k8s, *crb)
        assert not exists(k8s, *vault_role)
        assert not exists(k8s, "rbac.authorization.k8s.io/v1/rolebindings", "summarizer-vault", "acme-vault")
        await eventually(lambda: condition(obj(k8s, TMAPS, "summarizer-gmail"), "Accepted").get("reason") == "ServerNotFound")


@pytest.mark.anyio
async def test_edited_and_deleted_children_are_put_back() -> None:
    async with operator_emulator() as k8s, running_operator(k8s):
        await create_world(k8s)
        await eventually(lambda: all(exists(k8s, *c) for c in CHILDREN))
        deployment = "/apis/apps/v1/namespaces/acme/deployments/summarizer"
        await patch(k8s, deployment, {"spec": {"replicas": 7}})
        await eventually(lambda: obj(k8s, "apps/v1/deployments", "summarizer")["spec"]["replicas"] == 2)

        await delete(k8s, "/api/v1/namespaces/acme/services/summarizer")
        await eventually(lambda: exists(k8s, "v1/services", "summarizer"))
        assert [p["port"] for p in obj(k8s, "v1/services", "summarizer")["spec"]["ports"]] == [8080, 8081, 9090, 8083]


WRITES = {"POST", "PUT", "PATCH", "DELETE"}


def request_log(k8s: Emulator) -> list[Any]:
    """The emulator's log of every request it served, oldest first."""
    return list(k8s)


def writes_since(k8s: Emulator, start: int) -> list[str]:
    """Every write request after the `start`-th request, except kopf's own Events."""
    return [
        f"{r.method.value} {r.url.path}"
        for r in request_log(k8s)[start:]
        if r.method.value in WRITES and "/events" not in r.url.path
    ]


@pytest.mark.anyio
async def test_reconciling_an_unchanged_world_writes_nothing() -> None:
    from portcullis.controller.options import Options

    async with operator_emulator() as k8s:
        async with running_operator(k8s):
            await create_world(k8s)
            await eventually(lambda: condition(obj(k8s, TMAPS, "summarizer-gmail"), "Accepted").get("status") == "True")
            await eventually(lambda: condition(obj(k8s, CONNS, "gmail"), "Accepted").get("status") == "True")
            await eventually(lambda: condition(obj(k8s, VMS, "summarizer"), "ConfigValid").get("status") == "True")
        # A restarted operator resumes every object and, with a fast resync, reconciles the
        # server again and again: none of that may write.
        start = len(request_log(k8s))
        resyncs = Options(resync_seconds=0.05)
        async with running_operator(k8s, options=resyncs):
            gets = "/apis/portcullis.dev/v1alpha1/namespaces/acme/virtualmcpservers/summarizer"

            def reconciles() -> int:
                return sum(1 for r in request_log(k8s)[start:] if r.method.value == "GET" and r.url.path == gets)

            await eventually(lambda: reconciles() >= 5, what="five reconciles")
        assert writes_since(k8s, start) == []


@pytest.mark.anyio
async def test_invalid_specs_become_conditions_with_reasons() -> None:
    async with operator_emulator() as k8s, running_operator(k8s):
        await create_world(k8s, tools=[{"name": "fetch_mails", "as": "bad name!"}])
        await post(k8s, crd_path("toolmappings"), {
            "apiVersion": API_VERSION, "kind": "ToolMapping", "metadata": {"name": "no-conn", "namespace": NS},
            "spec": {"serverRef": {"name": "summarizer"}, "connectionRef": {"name": "nope"}, "tools": [{"name": "x"}]},
        })
        await post(k8s, crd_path("toolmappings"), {
            "apiVersion": API_VERSION, "kind": "ToolMapping", "metadata": {"name": "good", "namespace": NS},
            "spec": {"serverRef": {"name": "summarizer"}, "connectionRef": {"name": "gmail"}, "tools": [{"name": "ok"}]},
        })
        await post(k8s, crd_path("toolmappings"), {
            "apiVersion": API_VERSION, "kind": "ToolMapping", "metadata": {"name": "orphan", "namespace": NS},
            "spec": {"serverRef": {"name": "ghost"}, "connectionRef": {"name": "gmail"}, "tools": [{"name": "y"}]},
        })

        def reason(name: str) -> str | None:
            return condition(obj(k8s, TMAPS, name), "Accepted").get("reason")

        await eventually(lambda: reason("summarizer-gmail") == "InvalidToolName")
        await eventually(lambda: reason("no-conn") == "ConnectionNotFound")
        await eventually(lambda: reason("orphan") == "ServerNotFound")
        await eventually(lambda: reason("good") == "Accepted")
        # The bad mappings are left out; the good one is still served.
        await eventually(lambda: exists(k8s, "v1/configmaps", "summarizer-config") and config_tools(k8s) == ["ok"])
        server = obj(k8s, VMS, "summarizer")
        assert condition(server, "ConfigValid")["reason"] == "SomeMappingsRejected"
        assert condition(server, "ConfigValid")["observedGeneration"] == server["metadata"]["generation"]


@pytest.mark.anyio
async def test_an_invalid_server_spec_fails_without_children() -> None:
    async with operator_emulator() as k8s, running_operator(k8s):
        await create_world(k8s, server_spec={"autoscaling": {"minReplicas": 5, "maxReplicas": 2}})
        await eventually(lambda: (obj(k8s, VMS, "summarizer").get("status") or {}).get("phase") == "Failed")
        server = obj(k8s, VMS, "summarizer")
        assert condition(server, "ConfigValid")["reason"] == "InvalidSpec"
        assert "minReplicas" in condition(server, "ConfigValid")["message"]
        assert not exists(k8s, "apps/v1/deployments", "summarizer")


def gateway_container(k8s: Emulator) -> dict[str, Any]:
    (container,) = obj(k8s, "apps/v1/deployments", "summarizer")["spec"]["template"]["spec"]["containers"]
    return dict(container)


@pytest.mark.anyio
async def test_gateways_get_the_operators_pod_defaults_until_the_server_sets_its_resources() -> None:
    # What the chart hands the operator (tests/chart/test_install_path.py renders these).
    options = from_environment(
        {
            "PORTCULLIS_IMAGE": "registry.example/portcullis:2",
            "PORTCULLIS_GATEWAY_PULL_POLICY": "Always",
            "PORTCULLIS_GATEWAY_PULL_SECRETS": "regcred",
            "PORTCULLIS_GATEWAY_RESOURCES": '{"requests": {"cpu": "200m"}, "limits": {"cpu": 1, "memory": "256Mi"}}',
        },
        Options(resync_seconds=3600),
    )
    async with operator_emulator() as k8s, running_operator(k8s, options=options):
        await create_world(k8s, server_spec={"replicas": 1})
        await eventually(lambda: exists(k8s, "apps/v1/deployments", "summarizer"))
        container = gateway_container(k8s)
        assert (container["image"], container["imagePullPolicy"]) == ("registry.example/portcullis:2", "Always")
        assert container["resources"] == {"requests": {"cpu": "200m"}, "limits": {"cpu": "1", "memory": "256Mi"}}
        pod = obj(k8s, "apps/v1/deployments", "summarizer")["spec"]["template"]["spec"]
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]

        # The server's own resources replace the default as a whole.
        await patch(k8s, crd_path("virtualmcpservers", "summarizer"), {"spec": {"resources": {"limits": {"memory": "1Gi"}}}})
        await eventually(lambda: gateway_container(k8s)["resources"] == {"limits": {"memory": "1Gi"}})
        assert gateway_container(k8s)["imagePullPolicy"] == "Always"

        # A request above its limit is the server's error, said on the server, not a failed write.
        await patch(k8s, crd_path("virtualmcpservers", "summarizer"), {"spec": {"resources": {"requests": {"memory": "2Gi"}}}})
        await eventually(lambda: condition(obj(k8s, VMS, "summarizer"), "ConfigValid").get("reason") == "InvalidSpec")
        assert "requests.memory (2Gi) must not exceed limits.memory (1Gi)" in condition(obj(k8s, VMS, "summarizer"), "ConfigValid")["message"]
        assert gateway_container(k8s)["resources"] == {"limits": {"memory": "1Gi"}}


def gateway_status_body(unknown: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """What the gateway's GET /v1/status answers (portcullis.gateway.admin.status)."""
    return {
        "server": "summarizer", "url": "http://summarizer.acme.svc:8080/mcp", "ready": True,
        "exposed": 1, "upstream": 30, "schemaTokens": {"exposed": 180, "upstream": 6100},
        "unknownTools": unknown or [],
        "connections": {"gmail": {"toolCount": 30, "error": None}},
    }


@pytest.mark.anyio
async def test_an_available_deployment_makes_the_server_ready_with_gateway_counts() -> None:
    from portcullis.controller.options import Options

    async def gateway_status(server: Any) -> dict[str, Any]:
        return gateway_status_body()

    async with operator_emulator() as k8s, running_operator(k8s, options=Options(resync_seconds=0.05, fetch_status=gateway_status)):
        await create_world(k8s)
        await eventually(lambda: exists(k8s, "apps/v1/deployments", "summarizer"))
        await patch(k8s, "/apis/apps/v1/namespaces/acme/deployments/summarizer/status",
                    {"status": {"availableReplicas": 2, "readyReplicas": 2}})
        await eventually(lambda: (obj(k8s, VMS, "summarizer").get("status") or {}).get("phase") == "Ready")
        await eventually(lambda: (obj(k8s, VMS, "summarizer").get("status") or {}).get("toolsSummary") == "1/30")
        status = obj(k8s, VMS, "summarizer")["status"]
        assert status["tools"] == {"exposed": 1, "upstream": 30, "schemaTokens": {"exposed": 180, "upstream": 6100}}
        assert condition(obj(k8s, VMS, "summarizer"), "Ready")["reason"] == "DeploymentAvailable"


@pytest.mark.anyio
async def test_rotate_keys_annotation_rotates_and_rolls_the_pods() -> None:
    from portcullis.gateway.identity.tokens import SigningKeys

    async with operator_emulator() as k8s, running_operator(k8s):
        await create_world(k8s)
        await eventually(lambda: exists(k8s, "apps/v1/deployments", "summarizer"))

        def digest() -> str:
            template = obj(k8s, "apps/v1/deployments", "summarizer")["spec"]["template"]
            return str(template["metadata"]["annotations"]["portcullis.dev/signing-keys-digest"])

        def key_count() -> int:
            import base64

            data = obj(k8s, "v1/secrets", "summarizer-signing-keys")["data"]["keys.json"]
            return len(SigningKeys.from_json(base64.b64decode(data).decode()).keys)

        before = digest()
        assert key_count() == 1
        await patch(k8s, crd_path("virtualmcpservers", "summarizer"),
                    {"metadata": {"annotations": {"portcullis.dev/rotate-keys": "2026-11-22T05:00:00Z"}}})
        await eventually(lambda: key_count() == 2)
        await eventually(lambda: digest() != before)


def test_memory_tells_echoes_of_our_own_writes_from_news() -> None:
    from portcullis.controller.reconcile import Memory

    memory = Memory()
    child = {"kind": "ConfigMap", "metadata": {"namespace": NS, "name": "summarizer-config", "resourceVersion": "7"}}
    assert not memory.already_seen("ADDED", child)
    memory.saw(child)  # what KopfCluster does with every object it reads or writes
    memory.saw({**child, "metadata": {**child["metadata"], "resourceVersion": "9"}})
    # An older echo arriving after a newer write is still ours.
    assert memory.already_seen("MODIFIED", child)
    assert not memory.already_seen("MODIFIED", {**child, "metadata": {**child["metadata"], "resourceVersion": "8"}})
    # A deletion is news even when it repeats the last version, and forgets the object.
    assert not memory.already_seen("DELETED", child)
    assert not memory.already_seen("MODIFIED", child)


def test_memory_acts_on_each_mapping_generation_once() -> None:
    from portcullis.controller.reconcile import Memory

    memory = Memory()
    mapping = {"kind": "ToolMapping", "metadata": {"namespace": NS, "name": "m", "generation": 1}}
    assert not memory.spec_already_handled("ADDED", mapping)
    assert memory.spec_already_handled("MODIFIED", mapping)  # a status write: same generation
    changed = {**mapping, "metadata": {**mapping["metadata"], "generation": 2}}
    assert not memory.spec_already_handled("MODIFIED", changed)
    assert memory.spec_already_handled("MODIFIED", mapping)  # a late echo of generation 1
    assert not memory.spec_already_handled("DELETED", changed)
    assert not memory.spec_already_handled("ADDED", mapping)  # recreated under the same name


@pytest.mark.anyio
async def test_a_tool_the_upstream_lacks_is_reported_on_its_own_mapping() -> None:
    from portcullis.controller.options import Options

    async def gateway_status(server: Any) -> dict[str, Any]:
        return gateway_status_body(
            [{"mapping": "summarizer-gmail", "name": "fetch_mails", "exposedAs": "fetch_mails", "connection": "gmail"}]
        )

    async with operator_emulator() as k8s, running_operator(k8s, options=Options(resync_seconds=0.05, fetch_status=gateway_status)):
        await create_world(k8s)
        await post(k8s, crd_path("toolmappings"), {
            "apiVersion": API_VERSION, "kind": "ToolMapping", "metadata": {"name": "summarizer-labels", "namespace": NS},
            "spec": {"serverRef": {"name": "summarizer"}, "connectionRef": {"name": "gmail"}, "tools": [{"name": "label"}]},
        })

        def accepted(name: str) -> dict[str, Any]:
            return condition(obj(k8s, TMAPS, name), "Accepted")

        await eventually(lambda: accepted("summarizer-gmail").get("reason") == "UnknownUpstreamTool")
        assert accepted("summarizer-gmail")["status"] == "False"
        assert "'gmail' does not offer fetch_mails" in accepted("summarizer-gmail")["message"]
        await eventually(lambda: accepted("summarizer-labels").get("reason") == "Accepted")
        # Reported, not removed: the tool stays in the config for when the upstream offers it.
        assert config_tools(k8s) == ["fetch_mails", "label"]


@pytest.mark.anyio
async def test_moving_the_vault_namespace_removes_the_old_vault_grant() -> None:
    roles, bindings = "rbac.authorization.k8s.io/v1/roles", "rbac.authorization.k8s.io/v1/rolebindings"
    async with operator_emulator() as k8s, running_operator(k8s):
        await create_world(k8s, server_spec={"vault": {"namespace": "acme-vault"}})
        await eventually(lambda: exists(k8s, roles, "summarizer-vault", "acme-vault"))
        await eventually(lambda: exists(k8s, bindings, "summarizer-vault", "acme-vault"))

        await patch(k8s, crd_path("virtualmcpservers", "summarizer"), {"spec": {"vault": {"namespace": "vault-two"}}})
        await eventually(lambda: exists(k8s, roles, "summarizer-vault", "vault-two"))
        await eventually(lambda: exists(k8s, bindings, "summarizer-vault", "vault-two"))
        await eventually(lambda: not exists(k8s, roles, "summarizer-vault", "acme-vault"))
        assert not exists(k8s, bindings, "summarizer-vault", "acme-vault")

        def recorded() -> str:
            return str(obj(k8s, "v1/serviceaccounts", "summarizer-gateway")["metadata"]["annotations"]
                       ["portcullis.dev/vault-namespace"])

        await eventually(lambda: recorded() == "vault-two")

        # Back to the server's own namespace (spec.vault.namespace unset): vault-two is cleared too.
        await patch(k8s, crd_path("virtualmcpservers", "summarizer"), {"spec": {"vault": None}})
        await eventually(lambda: not exists(k8s, roles, "summarizer-vault", "vault-two"))
        assert not exists(k8s, bindings, "summarizer-vault", "vault-two")
        await eventually(lambda: exists(k8s, roles, "summarizer-vault", NS) and exists(k8s, bindings, "summarizer-vault", NS))


@pytest.mark.anyio
async def test_a_foreign_role_with_the_vault_name_is_left_alone() -> None:
    roles = "rbac.authorization.k8s.io/v1/roles"
    async with operator_emulator() as k8s, running_operator(k8s):
        await post(k8s, "/apis/rbac.authorization.k8s.io/v1/namespaces/shared/roles", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "summarizer-vault", "namespace": "shared"}, "rules": [],
        })
        await create_world(k8s, server_spec={"vault": {"namespace": "acme-vault"}})
        await eventually(lambda: exists(k8s, roles, "summarizer-vault", "acme-vault"))
        # Someone points the account's record at a namespace holding a Role that is not ours.
        await patch(k8s, "/api/v1/namespaces/acme/serviceaccounts/summarizer-gateway",
                    {"metadata": {"annotations": {"portcullis.dev/vault-namespace": "shared"}}})
        await eventually(lambda: obj(k8s, "v1/serviceaccounts", "summarizer-gateway")["metadata"]["annotations"]
                         ["portcullis.dev/vault-namespace"] == "acme-vault")
        assert exists(k8s, roles, "summarizer-vault", "shared")


class RecordingCluster:
    """A `Cluster` holding objects in a dict and recording every call, for the status writers."""

    def __init__(self, *objects: dict[str, Any]) -> None:
        self.objects = {(o["kind"], o["metadata"]["name"]): o for o in objects}
        self.calls: list[str] = []

    async def get(self, ref: Any) -> dict[str, Any] | None:
        self.calls.append(f"GET {ref.kind}/{ref.name}")
        return self.objects.get((ref.kind, ref.name))

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("status writers never create")

    async def patch(self, ref: Any, patch: dict[str, Any], *, subresource: str | None = None) -> dict[str, Any] | None:
        self.calls.append(f"PATCH {ref.kind}/{ref.name}/{subresource}")
        self.objects[(ref.kind, ref.name)] = {**self.objects[(ref.kind, ref.name)], **patch}
        return self.objects[(ref.kind, ref.name)]

    async def delete(self, ref: Any) -> bool:
        raise AssertionError("status writers never delete")


def mapping_copy(generation: int, status: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": "ToolMapping", "metadata": {"name": "m", "namespace": NS, "generation": generation}}
    return {**body, "status": status} if status is not None else body


@pytest.mark.anyio
async def test_a_stale_index_copy_does_not_rewrite_a_status_the_live_object_has() -> None:
    from portcullis.controller.conditions import mapping_condition
    from portcullis.controller.reconcile import write_accepted

    accepted = mapping_condition([])
    # What an earlier reconcile wrote; kopf's copy of the mapping has not seen it yet.
    cluster = RecordingCluster(mapping_copy(1))
    await write_accepted(cluster, "ToolMapping", mapping_copy(1), accepted, "2026-11-22T05:00:00Z")
    assert cluster.calls == ["GET ToolMapping/m", "PATCH ToolMapping/m/status"]
    written = cluster.objects[("ToolMapping", "m")]["status"]

    cluster.calls.clear()
    await write_accepted(cluster, "ToolMapping", mapping_copy(1), accepted, "2026-11-22T05:00:09Z")
    assert cluster.calls == ["GET ToolMapping/m"]  # the live object already says it: no write

    cluster.calls.clear()
    await write_accepted(cluster, "ToolMapping", mapping_copy(1, written), accepted, "2026-11-22T05:00:09Z")
    assert cluster.calls == []  # a settled world: not even a read

    # The live spec moved on (generation 2): the old condition is not written over it.
    cluster.objects[("ToolMapping", "m")]["metadata"]["generation"] = 2
    cluster.calls.clear()
    await write_accepted(cluster, "ToolMapping", mapping_copy(1), mapping_condition([]), "2026-11-22T05:00:09Z")
    assert cluster.calls == ["GET ToolMapping/m"]
