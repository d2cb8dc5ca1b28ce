"""The Helm chart: lints strictly, renders valid Kubernetes objects, and grants the operator
exactly what it needs to create its children (no `escalate`, no wildcards)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from tests.support.crd_schema import admit, structural_problems

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "portcullis"
K8S_VERSION = "1.33"
NAMESPACE = "portcullis-system"

CUSTOM = {
    "values": {
        "image": {"repository": "registry.example/portcullis", "tag": "1.2.3", "pullPolicy": "Always"},
        "gatewayImage": "registry.example/portcullis-gateway:1.2.3",
        "replicas": 2,
        "watchNamespaces": ["acme", "globex"],
        "resources": {"requests": {"cpu": "100m", "memory": "200Mi"}, "limits": {"memory": "300Mi"}},
        "extraArgs": ["--verbose"],
        "serviceAccount": {"create": True, "name": "gatekeeper"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "podAnnotations": {"example.com/scrape": "false"},
        "imagePullSecrets": [{"name": "regcred"}],
        "priorityClassName": "system-cluster-critical",
    }
}
VALUE_SETS = {"defaults": {}, "custom": CUSTOM["values"], "no peering": {"peering": {"enabled": False}}}


def render(values: dict[str, Any], name: str = "portcullis") -> list[dict[str, Any]]:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=name, namespace=NAMESPACE)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def notes(values: dict[str, Any]) -> str:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name="portcullis", namespace=NAMESPACE)
    return next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))


def chart_crds() -> dict[str, dict[str, Any]]:
    crds = {}
    for path in sorted((CHART / "crds").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        crds[doc["spec"]["names"]["kind"]] = doc
    return crds


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


# --- chart as a whole ------------------------------------------------------------------------


def test_chart_lints_strictly() -> None:
    report = helm.lint(CHART, strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_lint_catches_a_broken_template(tmp_path: Path) -> None:
    broken = tmp_path / "portcullis"
    with helm.Chart.load(CHART) as chart:
        chart.save_dir(tmp_path)
    (broken / "templates" / "broken.yaml").write_text("kind: {{ .Values.nope.missing }\n")
    report = helm.lint(broken, strict=True)
    assert any(m["severity"] >= 3 for m in report["messages"]) or report["errors"]


def test_chart_ships_the_generated_crds_unchanged() -> None:
    top = {p.name: p.read_text() for p in (ROOT / "crds").glob("*.yaml")}
    shipped = {p.name: p.read_text() for p in (CHART / "crds").glob("portcullis.dev_*.yaml")}
    assert shipped == top, "charts/portcullis/crds is out of sync: cp crds/*.yaml charts/portcullis/crds/"


def test_chart_crds_are_the_portcullis_ones_and_kopf_peering() -> None:
    crds = chart_crds()
    assert sorted(crds) == ["ClusterKopfPeering", "KopfPeering", "MCPConnection", "ToolMapping", "VirtualMCPServer"]
    assert crds["ClusterKopfPeering"]["spec"]["scope"] == "Cluster"
    assert crds["KopfPeering"]["spec"]["scope"] == "Namespaced"
    assert {crds[k]["metadata"]["name"] for k in ("ClusterKopfPeering", "KopfPeering")} == {
        "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev",
    }


@pytest.mark.parametrize("kind", ["ClusterKopfPeering", "KopfPeering"])
def test_peering_crds_are_valid_and_structural(kind: str) -> None:
    crd = chart_crds()[kind]
    kubernetes_validate.validate(crd, K8S_VERSION, strict=True)
    assert structural_problems(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]) == []


def test_peering_crd_holds_what_kopf_writes() -> None:
    # kopf's keep-alive: status.<identity> = {priority, lifetime, lastseen}.
    doc: dict[str, Any] = {
        "apiVersion": "kopf.dev/v1",
        "kind": "ClusterKopfPeering",
        "metadata": {"name": "portcullis"},
        "status": {"portcullis-7d9f@10.0.0.7": {"priority": 0, "lifetime": 60, "lastseen": "2026-01-01T00:00:00+00:00"}},
    }
    assert admit(doc, chart_crds()["ClusterKopfPeering"]) == []
    doc["status"]["portcullis-7d9f@10.0.0.7"]["priority"] = "high"
    assert admit(doc, chart_crds()["ClusterKopfPeering"]) != []


# --- rendered objects ------------------------------------------------------------------------


def validate(doc: dict[str, Any]) -> None:
    crds = chart_crds()
    if doc["kind"] in crds:
        assert admit(doc, crds[doc["kind"]]) == [], doc
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("values", list(VALUE_SETS.values()), ids=list(VALUE_SETS))
def test_every_rendered_object_is_valid(values: dict[str, Any]) -> None:
    docs = render(values)
    assert docs
    for doc in docs:
        validate(doc)


def test_default_render() -> None:
    docs = render({})
    assert sorted(d["kind"] for d in docs) == [
        "ClusterKopfPeering", "ClusterRole", "ClusterRoleBinding", "Deployment", "Pod", "Service", "ServiceAccount",
    ]
    deployment = one(docs, "Deployment")
    assert deployment["metadata"]["namespace"] == NAMESPACE
    assert deployment["spec"]["replicas"] == 1
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    # Where the release workflow publishes (tests/test_release.py holds the two together).
    assert container["image"] == "ghcr.io/portcullis/portcullis:0.1.0"
    assert container["args"] == ["operator", "--liveness-port=8080", "--peering=portcullis", "--all-namespaces"]
    assert {"name": "PORTCULLIS_IMAGE", "value": "ghcr.io/portcullis/portcullis:0.1.0"} in container["env"]
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == "portcullis"


def test_custom_render() -> None:
    docs = render(CUSTOM["values"], name="gate")
    deployment = one(docs, "Deployment")
    assert deployment["metadata"]["name"] == "gate-portcullis"
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/portcullis:1.2.3"
    assert container["imagePullPolicy"] == "Always"
    assert container["args"] == [
        "operator", "--liveness-port=8080", "--peering=portcullis", "--namespace=acme", "--namespace=globex", "--verbose",
    ]
    assert {"name": "PORTCULLIS_IMAGE", "value": "registry.example/portcullis-gateway:1.2.3"} in container["env"]
    # The gateways get the operator's pull policy and pull secrets (gateway.imagePullPolicy is empty).
    assert {"name": "PORTCULLIS_GATEWAY_PULL_POLICY", "value": "Always"} in container["env"]
    assert {"name": "PORTCULLIS_GATEWAY_PULL_SECRETS", "value": "regcred"} in container["env"]
    # Helm merges maps: the default CPU limit stays unless it is overridden too.
    assert container["resources"] == {
        "requests": {"cpu": "100m", "memory": "200Mi"},
        "limits": {"cpu": "500m", "memory": "300Mi"},
    }
    assert pod["serviceAccountName"] == "gatekeeper" == one(docs, "ServiceAccount")["metadata"]["name"]
    assert one(docs, "ClusterRoleBinding")["subjects"] == [
        {"kind": "ServiceAccount", "name": "gatekeeper", "namespace": NAMESPACE}
    ]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    peerings = [d for d in docs if d["kind"] == "KopfPeering"]
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["acme", "globex"]
    assert not [d for d in docs if d["kind"] == "ClusterKopfPeering"]


def test_without_peering_the_operator_runs_standalone() -> None:
    docs = render({"peering": {"enabled": False}})
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert not [a for a in container["args"] if a.startswith("--peering")]
    assert not [d for d in docs if "Peering" in d["kind"]]


def test_existing_service_account_must_be_named() -> None:
    with pytest.raises(helm.HelmError, match="serviceAccount.name is required"):
        render({"serviceAccount": {"create": False}})
    docs = render({"serviceAccount": {"create": False, "name": "ops"}})
    assert not [d for d in docs if d["kind"] == "ServiceAccount"]
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


def test_operator_pod_is_hardened_and_probed() -> None:
    pod = one(render({}), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    assert set(container["resources"]) == {"requests", "limits"}


def test_notes_say_where_the_operator_looks() -> None:
    assert "all namespaces" in notes({})
    assert "acme, globex" in notes(CUSTOM["values"])


# --- RBAC ------------------------------------------------------------------------------------


def grants(rules: list[dict[str, Any]]) -> Iterator[tuple[str, str, str, str]]:
    """Every (apiGroup, resource, verb, resourceName or "*") a list of rules allows."""
    for rule in rules:
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                for verb in rule["verbs"]:
                    for name in rule.get("resourceNames") or ["*"]:
                        yield group, resource, verb, name


def allows(rules: list[dict[str, Any]], group: str, resource: str, verb: str, name: str = "*") -> bool:
    return any(
        g == group and r == resource and v == verb and n in ("*", name) for g, r, v, n in grants(rules)
    )


def operator_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = one(render({}), "ClusterRole")["rules"]
    return rules


# The Roles the operator creates per VirtualMCPServer (DESIGN, "Fixed names"): it may create
# them only while holding every permission they grant.
GATEWAY_ROLE_RULES = [
    {"apiGroups": [""], "resources": ["configmaps", "secrets"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["summarizer-revocations"], "verbs": ["patch", "update"]},
]
VAULT_ROLE_RULES = [
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
]


def test_no_escalate_and_no_wildcards() -> None:
    for group, resource, verb, _ in grants(operator_rules()):
        assert "*" not in (group, resource, verb)
        assert verb not in ("escalate", "impersonate")


def test_operator_holds_what_the_gateway_roles_grant() -> None:
    rules = operator_rules()
    for role_rules in (GATEWAY_ROLE_RULES, VAULT_ROLE_RULES):
        for grant in grants(role_rules):
            assert allows(rules, *grant), f"operator cannot grant {grant}"


def test_operator_holds_what_the_rendered_gateway_roles_grant() -> None:
    rbac = pytest.importorskip("portcullis.render.rbac", reason="render.rbac not available")
    from portcullis.api.resources import VirtualMCPServer

    server = VirtualMCPServer.model_validate(
        {"metadata": {"name": "summarizer", "namespace": "acme", "uid": "0000-1111"}, "spec": {"vault": {"namespace": "acme-vault"}}}
    )
    rules = operator_rules()
    for role in (rbac.build_gateway_role(server), rbac.build_vault_role(server)):
        for grant in grants(role["rules"]):
            assert allows(rules, *grant), f"operator cannot grant {grant} of {role['metadata']['name']}"


def test_operator_may_bind_only_auth_delegator() -> None:
    rules = operator_rules()
    assert allows(rules, "rbac.authorization.k8s.io", "clusterroles", "bind", "system:auth-delegator")
    assert not allows(rules, "rbac.authorization.k8s.io", "clusterroles", "bind", "cluster-admin")
    assert allows(rules, "rbac.authorization.k8s.io", "clusterrolebindings", "create")


@pytest.mark.parametrize(
    ("group", "resource", "verbs"),
    [
        ("portcullis.dev", "virtualmcpservers", ["get", "list", "watch", "patch"]),
        ("portcullis.dev", "toolmappings", ["get", "list", "watch", "patch"]),
        ("portcullis.dev", "mcpconnections", ["get", "list", "watch", "patch"]),
        ("portcullis.dev", "virtualmcpservers/status", ["patch"]),
        ("portcullis.dev", "toolmappings/status", ["patch"]),
        ("portcullis.dev", "mcpconnections/status", ["patch"]),
        ("", "configmaps", ["create", "patch", "delete"]),
        ("", "secrets", ["create", "patch", "delete"]),
        ("", "services", ["create", "patch", "delete"]),
        ("", "serviceaccounts", ["create", "patch", "delete"]),
        ("apps", "deployments", ["create", "patch", "delete"]),
        ("autoscaling", "horizontalpodautoscalers", ["create", "patch", "delete"]),
        ("policy", "poddisruptionbudgets", ["create", "patch", "delete"]),
        ("rbac.authorization.k8s.io", "roles", ["create", "patch", "delete"]),
        ("rbac.authorization.k8s.io", "rolebindings", ["create", "patch", "delete"]),
        ("rbac.authorization.k8s.io", "clusterrolebindings", ["create", "patch", "delete"]),
        ("", "events", ["create"]),
        ("", "namespaces", ["list", "watch"]),
        ("kopf.dev", "clusterkopfpeerings", ["list", "watch", "patch"]),  # kopfpeerings: test_rbac.py
        ("apiextensions.k8s.io", "customresourcedefinitions", ["list", "watch"]),
    ],
)
def test_operator_may_do_its_job(group: str, resource: str, verbs: list[str]) -> None:
    rules = operator_rules()
    for verb in verbs:
        assert allows(rules, group, resource, verb), (group, resource, verb)


def test_operator_cannot_touch_pods_or_nodes() -> None:
    rules = operator_rules()
    assert not any(allows(rules, "", r, v) for r in ("pods", "nodes", "pods/exec") for v in ("get", "create", "delete"))


def test_several_replicas_peer_and_share_no_priority() -> None:
    # Every pod gets the same args: a --priority here would tie all replicas at the top, and
    # kopf pauses every replica that ties. Each process draws its own instead.
    deployment = one(render({"replicas": 3}), "Deployment")
    assert deployment["spec"]["replicas"] == 3
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "--peering=portcullis" in container["args"]
    assert not [a for a in container["args"] if a.startswith("--priority")]
    assert '3 operator replicas peer through "portcullis".' in notes({"replicas": 3})
