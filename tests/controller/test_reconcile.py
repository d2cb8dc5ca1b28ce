"""The operator end to end against the kmock emulator: kopf, handlers, real HTTP."""

from __future__ import annotations

import json
from typing import Any

import pytest

from portcullis.api.resources import API_VERSION
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
