"""Least-privilege RBAC with watchNamespaces: namespaced permissions (Secrets among them) come
from Roles in the watched and vault namespaces; the ClusterRole keeps only the cluster-scoped."""

from __future__ import annotations

from typing import Any

import pytest

from portcullis.api.resources import VirtualMCPServer
from portcullis.render import rbac
from tests.chart.test_chart import NAMESPACE, allows, grants, one, render

WATCHED = {"watchNamespaces": ["acme", "globex"], "rbac": {"vaultNamespaces": ["acme", "vaults"]}}


def roles(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in docs if d["kind"] == "Role"}


def bindings(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in docs if d["kind"] == "RoleBinding"}


def server(namespace: str, vault: str) -> VirtualMCPServer:
    return VirtualMCPServer.model_validate(
        {"metadata": {"name": "summarizer", "namespace": namespace, "uid": "u"}, "spec": {"vault": {"namespace": vault}}}
    )


def test_watching_everything_needs_no_roles() -> None:
    docs = render({})
    assert roles(docs) == {} and bindings(docs) == {}
    assert allows(one(docs, "ClusterRole")["rules"], "", "secrets", "get")


def test_with_watch_namespaces_no_cluster_rule_grants_secrets() -> None:
    cluster_rules = one(render(WATCHED), "ClusterRole")["rules"]
    assert not [g for g in grants(cluster_rules) if g[1] == "secrets"]
    # Nothing namespaced is left cluster-wide: CRDs, namespaces and the auth-delegator bindings only.
    assert {(g, r) for g, r, _, _ in grants(cluster_rules)} == {
        ("apiextensions.k8s.io", "customresourcedefinitions"),
        ("", "namespaces"),
        ("rbac.authorization.k8s.io", "clusterrolebindings"),
        ("rbac.authorization.k8s.io", "clusterroles"),
    }


def test_a_role_and_binding_in_each_watched_and_vault_namespace() -> None:
    docs = render(WATCHED)
    assert sorted(roles(docs)) == [("acme", "portcullis"), ("globex", "portcullis"), ("vaults", "portcullis-vault")]
    assert sorted(bindings(docs)) == sorted(roles(docs))
    for (namespace, name), binding in bindings(docs).items():
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "portcullis", "namespace": NAMESPACE}]


@pytest.mark.parametrize(
    ("group", "resource", "verbs"),
    [
        ("portcullis.dev", "virtualmcpservers", ["get", "list", "watch", "patch"]),
        ("portcullis.dev", "toolmappings", ["list", "watch"]),
        ("portcullis.dev", "mcpconnections/status", ["patch"]),
        ("", "secrets", ["list", "watch", "create", "patch", "delete"]),
        ("", "configmaps", ["list", "watch", "create", "patch", "delete"]),
        ("", "services", ["create", "patch"]),
        ("", "serviceaccounts", ["create", "patch"]),
        ("apps", "deployments", ["list", "watch", "create", "patch", "delete"]),
        ("autoscaling", "horizontalpodautoscalers", ["create", "delete"]),
        ("policy", "poddisruptionbudgets", ["create", "delete"]),
        ("rbac.authorization.k8s.io", "roles", ["create", "patch", "delete"]),
        ("rbac.authorization.k8s.io", "rolebindings", ["create", "patch", "delete"]),
        ("", "events", ["create"]),
        ("kopf.dev", "kopfpeerings", ["list", "watch", "patch"]),
    ],
)
def test_watched_namespace_roles_let_the_operator_do_its_job(group: str, resource: str, verbs: list[str]) -> None:
    for (namespace, name), role in roles(render(WATCHED)).items():
        if name == "portcullis":
            for verb in verbs:
                assert allows(role["rules"], group, resource, verb), (namespace, group, resource, verb)


def test_cluster_role_keeps_what_only_a_cluster_role_can_grant() -> None:
    rules = one(render(WATCHED), "ClusterRole")["rules"]
    assert allows(rules, "rbac.authorization.k8s.io", "clusterroles", "bind", "system:auth-delegator")
    assert not allows(rules, "rbac.authorization.k8s.io", "clusterroles", "bind", "cluster-admin")
    for verb in ("get", "create", "patch", "delete"):
        assert allows(rules, "rbac.authorization.k8s.io", "clusterrolebindings", verb)
    assert allows(rules, "apiextensions.k8s.io", "customresourcedefinitions", "watch")
    assert allows(rules, "", "namespaces", "watch")
    # Watching namespaces, kopf peers through a KopfPeering in each, never the cluster-wide one.
    assert not allows(rules, "kopf.dev", "clusterkopfpeerings", "patch")


def test_operator_can_create_every_gateway_role_in_its_namespaces() -> None:
    docs = render(WATCHED)
    by_namespace = {ns: role["rules"] for (ns, _), role in roles(docs).items()}
    cluster_rules = one(docs, "ClusterRole")["rules"]
    for gateway in (server("acme", "acme"), server("acme", "vaults"), server("globex", "acme")):
        for role in (rbac.build_gateway_role(gateway), rbac.build_vault_role(gateway)):
            held = by_namespace[role["metadata"]["namespace"]] + cluster_rules
            assert allows(held, "rbac.authorization.k8s.io", "roles", "create")
            for grant in grants(role["rules"]):
                assert allows(held, *grant), f"operator cannot grant {grant} in {role['metadata']['namespace']}"
        binding = rbac.build_auth_delegator_binding(gateway)
        assert allows(cluster_rules, "rbac.authorization.k8s.io", "clusterrolebindings", "create")
        assert allows(cluster_rules, "rbac.authorization.k8s.io", "clusterroles", "bind", binding["roleRef"]["name"])


def test_vault_roles_hold_only_secrets_and_the_roles_that_grant_them() -> None:
    (role,) = [r for (ns, _), r in roles(render(WATCHED)).items() if ns == "vaults"]
    assert {(g, r) for g, r, _, _ in grants(role["rules"])} == {
        ("", "secrets"), ("rbac.authorization.k8s.io", "roles"), ("rbac.authorization.k8s.io", "rolebindings"),
    }


def test_vault_namespaces_alone_change_nothing() -> None:
    # Watching the whole cluster, the ClusterRole already reaches every vault.
    assert roles(render({"rbac": {"vaultNamespaces": ["vaults"]}})) == {}


def test_no_escalate_or_wildcards_in_any_role() -> None:
    docs = render(WATCHED)
    for doc in docs:
        if doc["kind"] in ("Role", "ClusterRole"):
            for group, resource, verb, _ in grants(doc["rules"]):
                assert "*" not in (group, resource, verb)
                assert verb not in ("escalate", "impersonate")
