"""The operator story against a real cluster: apply, Ready, columns, mint, change, delete.

Runs only with PORTCULLIS_E2E=1 and a kubeconfig (KUBECONFIG or ~/.kube/config); the
operator must already be installed with the chart (the kind workflow does that). Every
wait is a watch with a deadline. Each run works in a fresh namespace and deletes it.

Environment:
  PORTCULLIS_E2E=1                    opt in
  PORTCULLIS_E2E_IMAGE                image with the example upstream (default portcullis:e2e)
  PORTCULLIS_E2E_OPERATOR_NAMESPACE   where the chart is installed (default portcullis-system)
  PORTCULLIS_E2E_TIMEOUT              seconds for each wait (default 180)
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml


def _skip_reason() -> str | None:
    if os.environ.get("PORTCULLIS_E2E") != "1":
        return "cluster e2e: set PORTCULLIS_E2E=1 and give a kubeconfig to run against a real cluster"
    configured = os.environ.get("KUBECONFIG")
    paths = configured.split(os.pathsep) if configured else [str(Path.home() / ".kube" / "config")]
    if not any(Path(p).is_file() for p in paths if p):
        return f"cluster e2e: no kubeconfig found at {', '.join(paths)}"
    return None


if (_reason := _skip_reason()) is not None:
    pytest.skip(_reason, allow_module_level=True)

# Only the dynamic client: it speaks plain dicts and raw paths, the same on every client version.
from kubernetes import client, config  # noqa: E402  (only imported when the suite runs)
from kubernetes.dynamic import DynamicClient  # noqa: E402
from kubernetes.dynamic.exceptions import DynamicApiError, NotFoundError  # noqa: E402

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION = "portcullis.dev", "v1alpha1"
IMAGE = os.environ.get("PORTCULLIS_E2E_IMAGE", "portcullis:e2e")
OPERATOR_NAMESPACE = os.environ.get("PORTCULLIS_E2E_OPERATOR_NAMESPACE", "portcullis-system")
TIMEOUT = int(os.environ.get("PORTCULLIS_E2E_TIMEOUT", "180"))
UPSTREAM_PORT = 8765
FIELD_MANAGER = "portcullis-e2e"

Obj = dict[str, Any]


# --- helpers ---------------------------------------------------------------------------------


def _plain(obj: Any) -> Obj:
    return obj if isinstance(obj, dict) else dict(obj.to_dict())


def resource(dyn: DynamicClient, api_version: str, kind: str) -> Any:
    return dyn.resources.get(api_version=api_version, kind=kind)


def wait_for(
    dyn: DynamicClient, api_version: str, kind: str, *, until: Callable[[Obj], Any], what: str,
    namespace: str | None = None, name: str | None = None, label_selector: str | None = None,
) -> Obj:
    """List, then watch from that version, until an object satisfies `until`; fail after TIMEOUT."""
    res = resource(dyn, api_version, kind)
    selector = f"metadata.name={name}" if name else None
    listing = _plain(res.get(namespace=namespace, field_selector=selector, label_selector=label_selector))
    for item in listing.get("items") or []:
        if until(item):
            return dict(item)
    for event in dyn.watch(
        res, namespace=namespace, field_selector=selector, label_selector=label_selector,
        resource_version=listing["metadata"]["resourceVersion"], timeout=TIMEOUT,
    ):
        obj = _plain(event["raw_object"])
        if event["type"] in ("ADDED", "MODIFIED") and until(obj):
            return obj
    raise AssertionError(f"timed out after {TIMEOUT}s waiting for {what}")


def wait_gone(dyn: DynamicClient, api_version: str, kind: str, name: str, namespace: str | None = None) -> None:
    res = resource(dyn, api_version, kind)
    selector = f"metadata.name={name}"
    listing = _plain(res.get(namespace=namespace, field_selector=selector))
    if not listing.get("items"):
        return
    for event in dyn.watch(
        res, namespace=namespace, field_selector=selector,
        resource_version=listing["metadata"]["resourceVersion"], timeout=TIMEOUT,
    ):
        if event["type"] == "DELETED":
            return
    raise AssertionError(f"timed out after {TIMEOUT}s waiting for {kind} {name} to go")


def condition(obj: Obj, kind: str) -> str | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return str(cond.get("status"))
    return None


def load(path: Path, namespace: str) -> list[Obj]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for doc in docs:
        if "namespace" in doc.get("metadata", {}):
            doc["metadata"]["namespace"] = namespace
        for subject in doc.get("subjects", []):
            subject["namespace"] = namespace
    return docs


def apply(dyn: DynamicClient, doc: Obj) -> Obj:
    res = resource(dyn, doc["apiVersion"], doc["kind"])
    return _plain(res.server_side_apply(
        body=doc, namespace=doc["metadata"].get("namespace"), field_manager=FIELD_MANAGER, force_conflicts=True
    ))


def get(dyn: DynamicClient, api_version: str, kind: str, name: str, namespace: str | None = None) -> Obj:
    return _plain(resource(dyn, api_version, kind).get(name=name, namespace=namespace))


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dyn() -> Iterator[DynamicClient]:
    config.load_kube_config()
    with client.ApiClient() as api_client:
        yield DynamicClient(api_client)


@pytest.fixture(scope="module")
def crds(dyn: DynamicClient) -> list[str]:
    """The CRDs of this checkout, applied over whatever the chart installed."""
    names = []
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        apply(dyn, doc)
        names.append(doc["metadata"]["name"])
    for name in names:
        wait_for(
            dyn, "apiextensions.k8s.io/v1", "CustomResourceDefinition", name=name,
            until=lambda o: condition(o, "Established") == "True", what=f"CRD {name} established",
        )
    return names


@pytest.fixture(scope="module")
def operator(dyn: DynamicClient) -> Obj:
    return wait_for(
        dyn, "apps/v1", "Deployment", namespace=OPERATOR_NAMESPACE,
        label_selector="app.kubernetes.io/name=portcullis-operator",
        until=lambda d: (d.get("status") or {}).get("availableReplicas", 0) >= 1,
        what=f"the operator Deployment in {OPERATOR_NAMESPACE} (install the chart first)",
    )


@pytest.fixture(scope="module")
def namespace(dyn: DynamicClient) -> Iterator[str]:
    name = f"portcullis-e2e-{secrets.token_hex(3)}"
    namespaces = resource(dyn, "v1", "Namespace")
    namespaces.create(body={"metadata": {"name": name, "labels": {"portcullis.dev/e2e": "true"}}})
    yield name
    namespaces.delete(name=name)


@pytest.fixture(scope="module")
def upstream(dyn: DynamicClient, namespace: str) -> str:
    """The example inbox MCP server, from the Portcullis image, behind a Service."""
    labels = {"app.kubernetes.io/name": "inbox-upstream"}
    apply(dyn, {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "inbox", "namespace": namespace, "labels": labels},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [{
                        "name": "inbox",
                        "image": IMAGE,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["python", "/opt/portcullis/examples/inbox/server.py"],
                        "args": ["--host", "0.0.0.0", "--port", str(UPSTREAM_PORT)],
                        "ports": [{"containerPort": UPSTREAM_PORT}],
                        "readinessProbe": {"tcpSocket": {"port": UPSTREAM_PORT}},
                    }],
                },
            },
        },
    })
    apply(dyn, {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "inbox", "namespace": namespace},
        "spec": {"selector": labels, "ports": [{"port": UPSTREAM_PORT, "targetPort": UPSTREAM_PORT}]},
    })
    wait_for(
        dyn, "apps/v1", "Deployment", namespace=namespace, name="inbox",
        until=lambda d: (d.get("status") or {}).get("availableReplicas", 0) >= 1, what="the example upstream",
    )
    return f"http://inbox.{namespace}.svc:{UPSTREAM_PORT}/mcp"


@pytest.fixture(scope="module")
def story(dyn: DynamicClient, crds: list[str], operator: Obj, namespace: str, upstream: str) -> str:
    """The inbox example (connection, summarizer, mapping) in the test namespace; returns the server name."""
    for path in sorted((ROOT / "examples" / "inbox" / "manifests").glob("*.yaml")):
        for doc in load(path, namespace):
            if doc["kind"] == "MCPConnection":
                doc["spec"]["url"] = upstream
            apply(dyn, doc)
    return "summarizer"


def wait_for_server(dyn: DynamicClient, namespace: str, name: str, until: Callable[[Obj], Any], what: str) -> Obj:
    return wait_for(dyn, f"{GROUP}/{VERSION}", "VirtualMCPServer", namespace=namespace, name=name, until=until, what=what)


# --- the story -------------------------------------------------------------------------------


def test_crds_are_established(crds: list[str]) -> None:
    assert sorted(crds) == [f"{p}.{GROUP}" for p in ("mcpconnections", "toolmappings", "virtualmcpservers")]


def test_server_becomes_ready_with_its_url(dyn: DynamicClient, story: str, namespace: str) -> None:
    server = wait_for_server(
        dyn, namespace, story, lambda o: condition(o, "Ready") == "True", f"VirtualMCPServer {story} Ready"
    )
    assert server["status"]["url"] == f"http://{story}.{namespace}.svc:8080/mcp"
    assert condition(server, "ConfigValid") == "True"


def test_children_are_in_place(dyn: DynamicClient, story: str, namespace: str) -> None:
    assert "config.json" in (get(dyn, "v1", "ConfigMap", f"{story}-config", namespace).get("data") or {})
    assert "keys.json" in (get(dyn, "v1", "Secret", f"{story}-signing-keys", namespace).get("data") or {})
    service = get(dyn, "v1", "Service", story, namespace)
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"mcp": 8080, "admin": 8081, "metrics": 9090}
    get(dyn, "rbac.authorization.k8s.io/v1", "ClusterRoleBinding", f"portcullis:{namespace}:{story}:auth-delegator")


def test_kubectl_get_pvmcp_columns(dyn: DynamicClient, story: str, namespace: str) -> None:
    wait_for_server(
        dyn, namespace, story,
        lambda o: re.fullmatch(r"2/\d+", (o.get("status") or {}).get("toolsSummary", "")) is not None,
        "the gateway to report upstream tool counts",
    )
    # What `kubectl get pvmcp` prints: the server-side Table, printer columns included.
    table = _plain(dyn.request(
        "get",
        f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/virtualmcpservers",
        header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
    ))
    columns = [c["name"] for c in table["columnDefinitions"] if c.get("priority", 0) == 0]
    assert columns == ["Name", "URL", "Ready", "Tools", "Age"]
    (row,) = table["rows"]
    cells = dict(zip([c["name"] for c in table["columnDefinitions"]], row["cells"], strict=False))
    assert cells["URL"] == f"http://{story}.{namespace}.svc:8080/mcp"
    assert cells["Ready"] == "True"
    assert re.fullmatch(r"2/\d+", cells["Tools"])


# The answer goes to the termination message, which the pod's status carries: no log API needed.
MINT_SCRIPT = """
import json, sys, urllib.request, urllib.error
token = open("/var/run/secrets/kubernetes.io/serviceaccount/token").read()
req = urllib.request.Request(sys.argv[1], data=json.dumps({"user": "alice"}).encode(), method="POST",
    headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=20) as r: line = "STATUS %d" % r.status
except urllib.error.HTTPError as e: line = "STATUS %d %s" % (e.code, e.read().decode()[:500])
open("/dev/termination-log", "w").write(line)
print(line)
"""


def run_mint_job(dyn: DynamicClient, namespace: str, account: str, server: str) -> str:
    """Call the admin API from a pod running as `account`; returns the `STATUS ...` line it printed."""
    name = f"mint-{account}"
    apply(dyn, {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "serviceAccountName": account,
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "mint",
                        "image": IMAGE,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["python", "-c", MINT_SCRIPT, f"http://{server}.{namespace}.svc:8081/v1/tokens"],
                    }],
                },
            },
        },
    })
    wait_for(
        dyn, "batch/v1", "Job", namespace=namespace, name=name,
        until=lambda j: (j.get("status") or {}).get("succeeded") or (j.get("status") or {}).get("failed"),
        what=f"job {name}",
    )
    pod = wait_for(
        dyn, "v1", "Pod", namespace=namespace, label_selector=f"job-name={name}",
        until=lambda o: any("terminated" in (c.get("state") or {}) for c in (o.get("status") or {}).get("containerStatuses") or []),
        what=f"the pod of job {name} to finish",
    )
    (status,) = pod["status"]["containerStatuses"]
    return str(status["state"]["terminated"].get("message", "")).strip()


def test_minting_is_ordinary_rbac(dyn: DynamicClient, story: str, namespace: str) -> None:
    apply(dyn, {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "stranger", "namespace": namespace}})
    for doc in load(ROOT / "examples" / "rbac" / "app-backend-minter.yaml", namespace):
        apply(dyn, doc)
    # Without a grant for `mint`, the SubjectAccessReview says no.
    assert run_mint_job(dyn, namespace, "stranger", story).startswith("STATUS 403")
    # With it, the caller gets past authentication and authorization: a token, or (alice has
    # connected nothing yet) the answer that lists the connections she must connect first.
    allowed = run_mint_job(dyn, namespace, "app-backend", story)
    assert not allowed.startswith(("STATUS 401", "STATUS 403")), allowed
    # TODO(e2e): store alice's inbox credential in the cluster vault, then assert 201, call
    # a tool through the gateway with the token, and see the credential reach the upstream.


def test_a_mapping_change_reaches_the_status(dyn: DynamicClient, story: str, namespace: str) -> None:
    mappings = resource(dyn, f"{GROUP}/{VERSION}", "ToolMapping")
    patch = {"spec": {"tools": [
        {"name": "fetch_mails", "as": "inbox_fetch_mails"}, {"name": "search_mails"}, {"name": "get_mail"},
    ]}}
    mappings.patch(body=patch, name="summarizer-inbox", namespace=namespace, content_type="application/merge-patch+json")
    wait_for_server(
        dyn, namespace, story,
        lambda o: ((o.get("status") or {}).get("tools") or {}).get("exposed") == 3,
        "three exposed tools after the mapping change",
    )


def test_a_typo_in_a_mapping_is_a_condition(dyn: DynamicClient, story: str, namespace: str) -> None:
    apply(dyn, {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ToolMapping",
        "metadata": {"name": "typo", "namespace": namespace},
        "spec": {"serverRef": {"name": "summariser"}, "connectionRef": {"name": "inbox"}, "tools": [{"name": "fetch_mails"}]},
    })
    mapping = wait_for(
        dyn, f"{GROUP}/{VERSION}", "ToolMapping", namespace=namespace, name="typo",
        until=lambda o: condition(o, "Accepted") == "False", what="the typo mapping to be rejected",
    )
    reasons = [c.get("reason") for c in mapping["status"]["conditions"] if c["type"] == "Accepted"]
    assert reasons == ["ServerNotFound"]


def test_the_api_server_rejects_an_invalid_spec(dyn: DynamicClient, crds: list[str], namespace: str) -> None:
    bad = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VirtualMCPServer",
        "metadata": {"name": "bad", "namespace": namespace},
        "spec": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}},
    }
    with pytest.raises(DynamicApiError) as caught:
        resource(dyn, f"{GROUP}/{VERSION}", "VirtualMCPServer").create(body=bad, namespace=namespace)
    assert caught.value.status == 422
    assert "minReplicas must not exceed maxReplicas" in str(caught.value.body)


def test_deleting_the_server_removes_its_cluster_binding(dyn: DynamicClient, story: str, namespace: str) -> None:
    binding = f"portcullis:{namespace}:{story}:auth-delegator"
    get(dyn, "rbac.authorization.k8s.io/v1", "ClusterRoleBinding", binding)
    resource(dyn, f"{GROUP}/{VERSION}", "VirtualMCPServer").delete(name=story, namespace=namespace)
    # Cluster-scoped, so no owner reference: the operator's finalizer must remove it.
    wait_gone(dyn, "rbac.authorization.k8s.io/v1", "ClusterRoleBinding", binding)
    with pytest.raises(NotFoundError):
        get(dyn, "rbac.authorization.k8s.io/v1", "ClusterRoleBinding", binding)
