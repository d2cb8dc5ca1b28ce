"""The operator story against a real cluster: apply, Ready, columns, mint, change, delete.

Runs only with PORTCULLIS_E2E=1 and a kubeconfig (see environment.py). The operator is the one
the README's quickstart installs (conftest.py runs it first). Every wait is a watch with a
deadline. Each run works in a fresh namespace and deletes it; the example upstream is
examples/cluster/inbox-upstream.yaml, moved into that namespace.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.e2e.environment import IMAGE, OPERATOR_NAMESPACE, skip_reason

if (_reason := skip_reason()) is not None:
    pytest.skip(_reason, allow_module_level=True)

from kubernetes import client, config  # noqa: E402  (only imported when the suite runs)
from kubernetes.dynamic import DynamicClient  # noqa: E402
from kubernetes.dynamic.exceptions import DynamicApiError, NotFoundError  # noqa: E402

from tests.e2e.quickstart import QuickstartRun  # noqa: E402
from tests.e2e.support import (  # noqa: E402
    GROUP,
    ROOT,
    VERSION,
    Obj,
    admin,
    apply,
    call_tool,
    condition,
    eventually,
    get,
    load,
    plain,
    port_forward,
    resource,
    service_account_token,
    wait_for,
    wait_gone,
)

pytestmark = pytest.mark.cluster


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dyn(readme_quickstart: QuickstartRun) -> Iterator[DynamicClient]:
    config.load_kube_config()
    with client.ApiClient() as api_client:
        yield DynamicClient(api_client)


@pytest.fixture(scope="module")
def crds(dyn: DynamicClient) -> list[str]:
    """The CRDs of this checkout, applied over whatever the chart installed."""
    names = []
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        (doc,) = load(path)
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
        what=f"the operator Deployment in {OPERATOR_NAMESPACE} (the README's helm install)",
    )


@pytest.fixture(scope="module")
def namespace(dyn: DynamicClient) -> Iterator[str]:
    name = f"portcullis-e2e-{secrets.token_hex(3)}"
    namespaces = resource(dyn, "v1", "Namespace")
    namespaces.create(body={"metadata": {"name": name, "labels": {"portcullis.dev/e2e": "true"}}})
    yield name
    namespaces.delete(name=name)


UPSTREAM = ROOT / "examples" / "cluster" / "inbox-upstream.yaml"


@pytest.fixture(scope="module")
def upstream(dyn: DynamicClient, namespace: str) -> str:
    """The quickstart's example inbox upstream (from the Portcullis image), moved into `namespace`."""
    docs = load(UPSTREAM, namespace)
    for doc in docs:
        if doc["kind"] == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                container["image"] = IMAGE
        apply(dyn, doc)
    wait_for(
        dyn, "apps/v1", "Deployment", namespace=namespace, name="inbox",
        until=lambda d: (d.get("status") or {}).get("availableReplicas", 0) >= 1, what="the example upstream",
    )
    (service,) = [d for d in docs if d["kind"] == "Service"]
    return f"http://inbox.{namespace}.svc:{service['spec']['ports'][0]['port']}/mcp"


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
    table = plain(dyn.request(
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
req = urllib.request.Request(sys.argv[1], data=json.dumps({"user": sys.argv[2]}).encode(), method="POST",
    headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=20) as r: line = "STATUS %d %s" % (r.status, r.read().decode()[:3000])
except urllib.error.HTTPError as e: line = "STATUS %d %s" % (e.code, e.read().decode()[:500])
open("/dev/termination-log", "w").write(line)
print(line)
"""

USER, SECRET = "alice@example.com", "alice-inbox-secret"  # what the example upstream accepts (--auth)


def run_mint_job(dyn: DynamicClient, namespace: str, account: str, server: str, *, user: str = USER, name: str = "") -> str:
    """Mint from a pod running as `account`; returns the `STATUS <code> <body>` line it printed."""
    name = name or f"mint-{account}"
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
                        "command": ["python", "-c", MINT_SCRIPT, f"http://{server}.{namespace}.svc:8081/v1/tokens", user],
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
    # With it, the caller gets past authentication and authorization: alice has connected
    # nothing yet, so the answer lists the connection she must connect first.
    allowed = run_mint_job(dyn, namespace, "app-backend", story)
    assert allowed.startswith("STATUS 409 "), allowed
    assert json.loads(allowed.split(" ", 2)[2])["missing"] == ["inbox"]

    with port_forward(namespace, f"svc/{story}", 8080, 8081) as ports:
        gateway, admin_url = f"http://127.0.0.1:{ports[8080]}", f"http://127.0.0.1:{ports[8081]}"
        backend = service_account_token("app-backend", namespace)
        path = f"/v1/users/{USER}/connections/inbox"
        # `mint` alone does not let the backend store credentials: that is the verb `credentials`.
        assert admin(admin_url, "PUT", path, backend, {"secret": SECRET}).status_code == 403
        for doc in load(ROOT / "examples" / "rbac" / "app-backend.yaml", namespace):
            apply(dyn, doc)

        def store() -> bool:
            return admin(admin_url, "PUT", path, backend, {"secret": SECRET}).status_code == 204

        # A new RoleBinding reaches the authorizer within moments, not necessarily at once.
        eventually(store, "the app backend to be allowed to store alice's credential")
        # Sealed in the vault namespace (here the server's own), never in the clear.
        (sealed,) = [s for s in resource(dyn, "v1", "Secret").get(namespace=namespace).to_dict()["items"]
                     if s["metadata"].get("annotations", {}).get("portcullis.dev/user") == USER]
        assert set(sealed["data"]) == {"inbox"} and SECRET not in json.dumps(sealed)
        minted = run_mint_job(dyn, namespace, "app-backend", story, name="mint-app-backend-connected")
        assert minted.startswith("STATUS 201 "), minted
        token = json.loads(minted.split(" ", 2)[2])["token"]
        answer = call_tool(gateway, token, "inbox_fetch_mails", {"limit": 1})
        assert answer.status_code == 200, answer.text
        result = answer.json()["result"]
        # The upstream answers only a credential it knows (else a 401 error result): alice's reached it.
        assert result["isError"] is False, result
        assert result["structuredContent"]["mails"][0]["to"] == [USER]


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
