"""Optional NetworkPolicies: the operator takes only metrics and health traffic; each gateway keeps
its MCP port open and its admin port for the operator and whoever may mint, in every namespace
the chart knows gateways run in."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from portcullis.api.resources import VirtualMCPServer
from portcullis.render.deployment import GatewayPod, build_deployment
from portcullis.render.metadata import ADMIN_PORT, CONNECT_PORT, MCP_PORT, METRICS_PORT
from tests.chart.test_chart import K8S_VERSION, NAMESPACE, one, render

MINTERS = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "backend"}},
            "podSelector": {"matchLabels": {"app": "app-backend"}}}]
SCRAPERS = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


def policies(values: dict[str, Any]) -> list[dict[str, Any]]:
    found = [d for d in render(values) if d["kind"] == "NetworkPolicy"]
    for policy in found:
        kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
    return found


def gateway_policies(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["metadata"]["namespace"]: p for p in policies(values) if p["metadata"]["name"].endswith("-gateways")}


def rule_for(policy: dict[str, Any], port: int) -> dict[str, Any]:
    rules: list[dict[str, Any]] = [r for r in policy["spec"]["ingress"] if {"port": port, "protocol": "TCP"} in r["ports"]]
    (rule,) = rules
    return rule


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def gateway_pod() -> dict[str, Any]:
    """The pod template the operator renders for a gateway."""
    server = VirtualMCPServer.model_validate({"metadata": {"name": "summarizer", "namespace": "acme", "uid": "u"}, "spec": {}})
    template: dict[str, Any] = build_deployment(server, pod=GatewayPod(image="x"), keys_digest="d")["spec"]["template"]
    return template


def test_no_network_policies_by_default() -> None:
    assert policies({}) == []
    assert policies({"watchNamespaces": ["acme"]}) == []


def test_operator_takes_metrics_and_health_from_the_allowed_peers_and_the_test_pod() -> None:
    docs = render({"networkPolicy": {"enabled": True, "metricsFrom": SCRAPERS}})
    policy = one([d for d in docs if d["kind"] == "NetworkPolicy"], "NetworkPolicy")
    assert policy["metadata"]["namespace"] == NAMESPACE
    assert selects(policy["spec"]["podSelector"]["matchLabels"], one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"])
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = [{"port": 9090, "protocol": "TCP"}, {"port": 8080, "protocol": "TCP"}]
    scrapers, tester = policy["spec"]["ingress"]
    assert scrapers == {"ports": ports, "from": SCRAPERS}
    assert tester["ports"] == ports
    (peer,) = tester["from"]
    assert selects(peer["podSelector"]["matchLabels"], one(docs, "Pod")["metadata"]["labels"])


def test_operator_ports_are_open_when_no_peers_are_listed() -> None:
    (policy,) = policies({"networkPolicy": {"enabled": True}})
    assert policy["spec"]["ingress"] == [{"ports": [{"port": 9090, "protocol": "TCP"}, {"port": 8080, "protocol": "TCP"}]}]


def test_one_gateway_policy_per_watched_namespace() -> None:
    found = gateway_policies({"watchNamespaces": ["acme", "globex"], "networkPolicy": {"enabled": True}})
    assert sorted(found) == ["acme", "globex"]
    for policy in found.values():
        assert selects(policy["spec"]["podSelector"]["matchLabels"], gateway_pod()["metadata"]["labels"])
        assert policy["spec"]["policyTypes"] == ["Ingress"]


def test_gateway_namespaces_win_over_watch_namespaces() -> None:
    values = {"watchNamespaces": ["acme"], "networkPolicy": {"enabled": True, "gatewayNamespaces": ["tenant-a", "tenant-b"]}}
    assert sorted(gateway_policies(values)) == ["tenant-a", "tenant-b"]


def test_watching_the_whole_cluster_renders_no_gateway_policy() -> None:
    # The chart cannot know where the operator will create gateways; NOTES and the README say so.
    (policy,) = policies({"networkPolicy": {"enabled": True}})
    assert policy["metadata"]["name"] == "portcullis"


def test_admin_port_only_for_the_operator_and_the_minters_while_mcp_stays_open() -> None:
    values = {"watchNamespaces": ["acme"], "networkPolicy": {"enabled": True, "adminFrom": MINTERS, "metricsFrom": SCRAPERS}}
    docs = render(values)
    policy = gateway_policies(values)["acme"]
    # The ports the rules name are the gateway's own (render/metadata.py).
    (container,) = gateway_pod()["spec"]["containers"]
    assert {(p["name"], p["containerPort"]) for p in container["ports"]} == {
        ("mcp", MCP_PORT), ("admin", ADMIN_PORT), ("metrics", METRICS_PORT), ("connect", CONNECT_PORT),
    }
    assert "from" not in rule_for(policy, MCP_PORT)
    assert "from" not in rule_for(policy, CONNECT_PORT)  # browsers, through the Ingress
    assert rule_for(policy, METRICS_PORT)["from"] == SCRAPERS
    operator_peer, *minters = rule_for(policy, ADMIN_PORT)["from"]
    assert minters == MINTERS
    # The operator reads each gateway's /v1/status on the admin port.
    assert operator_peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}
    assert selects(operator_peer["podSelector"]["matchLabels"], one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"])


@pytest.mark.parametrize("admin_from", [[], MINTERS], ids=["operator only", "minters"])
def test_admin_port_is_never_open_to_everyone(admin_from: list[dict[str, Any]]) -> None:
    values = {"watchNamespaces": ["acme"], "networkPolicy": {"enabled": True, "adminFrom": admin_from}}
    rule = rule_for(gateway_policies(values)["acme"], ADMIN_PORT)
    assert rule["from"] and all(peer for peer in rule["from"])
    assert {"port": ADMIN_PORT, "protocol": "TCP"} not in rule_for(gateway_policies(values)["acme"], MCP_PORT)["ports"]


def test_connect_port_follows_connect_from_and_never_opens_admin() -> None:
    ingress = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
    values = {"watchNamespaces": ["acme"], "networkPolicy": {"enabled": True, "connectFrom": ingress}}
    rule = rule_for(gateway_policies(values)["acme"], CONNECT_PORT)
    assert rule["from"] == ingress
    assert [p["port"] for p in rule["ports"]] == [CONNECT_PORT]
