"""From `helm install` to an agent's first call: the operator's Service and ServiceMonitor, the
gateways' PodMonitor, the `helm test` pod, security contexts from values, the gateway defaults
handed to the operator, and the notes that say what to do next. Every object is valid on the chart's lowest and on the
latest Kubernetes version."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from portcullis.api.quantities import QUANTITY_PATTERN
from portcullis.api.resources import VirtualMCPServer
from portcullis.controller.options import ConfigurationError, Options, from_environment
from portcullis.render.deployment import DEFAULT_PULL_POLICY, DEFAULT_RESOURCES, build_deployment
from tests.chart.test_chart import CHART, CUSTOM, K8S_VERSION, NAMESPACE, notes, one, render, validate

FLOOR = re.fullmatch(r">=(\d+\.\d+)\.\d+(-0)?", yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"])
assert FLOOR is not None, "Chart.yaml's kubeVersion is not a plain >=X.Y.Z floor any more"
VERSIONS = sorted({FLOOR[1], K8S_VERSION, kubernetes_validate.latest_version()})
MONITORED = {"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}}
EVERYTHING_ON = {
    "watchNamespaces": ["acme"], "rbac": {"vaultNamespaces": ["vaults"]},
    "networkPolicy": {"enabled": True, "metricsFrom": [{"podSelector": {}}]}, "grafanaDashboard": {"enabled": True}, **MONITORED,
    "imagePullSecrets": [{"name": "regcred"}], "gateway": {"imagePullPolicy": "Always"},
}
# prometheus-operator's duration pattern (monitoring.coreos.com_servicemonitors.yaml).
PROMETHEUS_DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")


def check_service_monitor(monitor: dict[str, Any], service: dict[str, Any]) -> None:
    """kubernetes_validate has no schema for prometheus-operator's CRD: the fields we write, by hand."""
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert all(isinstance(v, str) for v in monitor["metadata"]["labels"].values())
    spec = monitor["spec"]
    assert set(spec) == {"namespaceSelector", "selector", "endpoints"}
    assert spec["namespaceSelector"] == {"matchNames": [service["metadata"]["namespace"]]}
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
        assert endpoint["port"] in ports
        assert endpoint["path"].startswith("/")
        for duration in ("interval", "scrapeTimeout"):
            if duration in endpoint:
                assert PROMETHEUS_DURATION.match(endpoint[duration]), endpoint


def gateway_template(**spec: Any) -> dict[str, Any]:
    """The pod template the operator renders for a gateway, with its built-in defaults."""
    server = VirtualMCPServer.model_validate({"metadata": {"name": "summarizer", "namespace": "acme", "uid": "u"}, "spec": spec})
    template: dict[str, Any] = build_deployment(server, pod=Options().gateway, keys_digest="d")["spec"]["template"]
    return template


def check_pod_monitor(monitor: dict[str, Any]) -> None:
    """prometheus-operator's PodMonitor, the fields we write, by hand (no schema offline either)."""
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert all(isinstance(v, str) for v in monitor["metadata"]["labels"].values())
    spec = monitor["spec"]
    assert set(spec) == {"namespaceSelector", "selector", "podMetricsEndpoints"}
    assert spec["namespaceSelector"] == {"any": True} or (
        set(spec["namespaceSelector"]) == {"matchNames"} and all(isinstance(n, str) for n in spec["namespaceSelector"]["matchNames"])
    )
    # It selects the gateway pods the operator renders, by labels every one of them carries.
    template = gateway_template()
    assert spec["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    (container,) = template["spec"]["containers"]
    ports = {p["name"] for p in container["ports"]}
    for endpoint in spec["podMetricsEndpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
        assert endpoint["port"] in ports
        assert endpoint["path"].startswith("/")
        for duration in ("interval", "scrapeTimeout"):
            if duration in endpoint:
                assert PROMETHEUS_DURATION.match(endpoint[duration]), endpoint


def valid_everywhere(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            check_service_monitor(doc, one(docs, "Service"))
        elif doc["kind"] == "PodMonitor":
            check_pod_monitor(doc)
        elif doc["apiVersion"].startswith(("kopf.dev/", "portcullis.dev/")):
            validate(doc)
        else:
            for version in VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize(
    "values",
    [{}, CUSTOM["values"], MONITORED, EVERYTHING_ON],
    ids=["defaults", "custom", "service monitor", "everything on"],
)
def test_every_object_is_valid_across_the_supported_versions(values: dict[str, Any]) -> None:
    valid_everywhere(render(values))


def test_chart_with_every_option_on_lints_strictly() -> None:
    report = helm.lint(CHART, EVERYTHING_ON, strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


# --- the operator's Service and ServiceMonitor -----------------------------------------------


def test_a_service_exposes_the_operators_metrics_and_health_ports() -> None:
    docs = render({})
    service = one(docs, "Service")
    assert service["metadata"] == {
        "name": "portcullis", "namespace": NAMESPACE, "labels": one(docs, "Deployment")["metadata"]["labels"],
    }
    assert service["spec"]["type"] == "ClusterIP"
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {(p["name"], p["port"]) for p in service["spec"]["ports"]} == {("metrics", 9090), ("health", 8080)}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in named and named[port["targetPort"]] == port["port"]
    # It selects the operator's pods, and no other pod of the chart.
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert not service["spec"]["selector"].items() <= one(docs, "Pod")["metadata"]["labels"].items()


def test_no_service_monitor_by_default() -> None:
    assert not [d for d in render({}) if d["kind"] == "ServiceMonitor"]


def test_an_enabled_service_monitor_scrapes_the_metrics_port() -> None:
    values = {"metrics": {"serviceMonitor": {
        "enabled": True, "interval": "15s", "scrapeTimeout": "10s", "labels": {"release": "kps"}, "namespace": "monitoring",
    }}}
    docs = render(values)
    monitor = one(docs, "ServiceMonitor")
    check_service_monitor(monitor, one(docs, "Service"))
    assert monitor["metadata"]["namespace"] == "monitoring"
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}]


def test_service_monitor_defaults_to_the_release_namespace_and_prometheus_timeout() -> None:
    monitor = one(render(MONITORED), "ServiceMonitor")
    assert monitor["metadata"]["namespace"] == NAMESPACE
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]


# --- the gateways' PodMonitor ------------------------------------------------------------------


def test_no_pod_monitor_by_default() -> None:
    assert not [d for d in render({}) if d["kind"] == "PodMonitor"]


def test_an_enabled_pod_monitor_scrapes_every_gateways_metrics_port_in_any_namespace() -> None:
    values = {"metrics": {"podMonitor": {
        "enabled": True, "interval": "15s", "scrapeTimeout": "10s", "labels": {"release": "kps"}, "namespace": "monitoring",
    }}}
    monitor = one(render(values), "PodMonitor")
    check_pod_monitor(monitor)
    assert monitor["metadata"]["name"] == "portcullis-gateways"
    assert monitor["metadata"]["namespace"] == "monitoring"
    assert monitor["metadata"]["labels"]["release"] == "kps"
    # The operator watches every namespace, so gateways may run in any of them.
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    assert monitor["spec"]["selector"] == {"matchLabels": {
        "app.kubernetes.io/name": "portcullis-gateway", "app.kubernetes.io/part-of": "portcullis",
    }}
    assert monitor["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}]


def test_the_pod_monitor_looks_only_where_the_operator_watches() -> None:
    monitor = one(render({"watchNamespaces": ["acme", "globex"], "metrics": {"podMonitor": {"enabled": True}}}), "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["acme", "globex"]}
    assert monitor["metadata"]["namespace"] == NAMESPACE
    assert monitor["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]


def test_the_pod_monitor_and_the_gateway_network_policy_select_the_same_pods() -> None:
    docs = render({"watchNamespaces": ["acme"], "networkPolicy": {"enabled": True}, "metrics": {"podMonitor": {"enabled": True}}})
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["namespace"] == "acme"]
    assert one(docs, "PodMonitor")["spec"]["selector"] == policy["spec"]["podSelector"]


def test_the_pod_monitor_does_not_select_the_operator_or_the_test_pod() -> None:
    docs = render({"metrics": {"podMonitor": {"enabled": True}}})
    selector = one(docs, "PodMonitor")["spec"]["selector"]["matchLabels"]
    for labels in (one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"], one(docs, "Pod")["metadata"]["labels"]):
        assert not selector.items() <= labels.items()


# --- helm test ---------------------------------------------------------------------------------


def test_helm_test_pod_is_a_test_hook_in_the_operators_image_and_security_context() -> None:
    docs = render(CUSTOM["values"], name="gate")
    pod = one(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["metadata"]["namespace"] == NAMESPACE
    operator = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["securityContext"] == operator["securityContext"]
    assert pod["spec"]["imagePullSecrets"] == operator["imagePullSecrets"]
    assert pod["spec"]["automountServiceAccountToken"] is False
    (container,) = pod["spec"]["containers"]
    (operator_container,) = operator["containers"]
    assert container["image"] == operator_container["image"] == "registry.example/portcullis:1.2.3"
    assert container["securityContext"] == operator_container["securityContext"]
    assert container["command"][:2] == ["python", "-c"]
    assert set(container["resources"]) == {"requests", "limits"}


def script(pod: dict[str, Any]) -> str:
    (container,) = pod["spec"]["containers"]
    text: str = container["command"][2]
    return text


class FakeOperator:
    """Stands in for urllib.request.urlopen: answers the URLs it knows, refuses the others."""

    def __init__(self, answers: dict[str, str]):
        self.answers = answers
        self.asked: list[str] = []

    def __call__(self, url: str, timeout: float) -> io.BytesIO:
        self.asked.append(url)
        if url not in self.answers:
            raise urllib.error.URLError("connection refused")
        return io.BytesIO(self.answers[url].encode())


HEALTHZ = "http://portcullis.portcullis-system.svc:8080/healthz"
METRICS = "http://portcullis.portcullis-system.svc:9090/metrics"


def test_helm_test_asks_the_operators_service_and_passes_when_it_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render({})
    service = one(docs, "Service")
    assert {p["port"] for p in service["spec"]["ports"]} == {8080, 9090}
    operator = FakeOperator({HEALTHZ: '{"servers": 0}', METRICS: "portcullis_operator_reconciles_total 0\n"})
    monkeypatch.setattr(urllib.request, "urlopen", operator)
    exec(script(one(docs, "Pod")), {})
    assert operator.asked == [HEALTHZ, METRICS]


@pytest.mark.parametrize(
    ("answers", "failure"),
    [
        ({}, f"{HEALTHZ} did not answer"),
        ({HEALTHZ: "{}", METRICS: "go_goroutines 7\n"}, "the metrics port does not serve the operator's metrics"),
    ],
    ids=["no answer", "not the operator's metrics"],
)
def test_helm_test_fails_when_the_operator_does_not_answer(
    monkeypatch: pytest.MonkeyPatch, answers: dict[str, str], failure: str
) -> None:
    operator = FakeOperator(answers)
    monkeypatch.setattr(urllib.request, "urlopen", operator)
    monkeypatch.setattr("time.sleep", lambda _: None)  # its retries are bounded; no need to wait them out
    with pytest.raises(SystemExit, match=re.escape(failure)):
        exec(script(one(render({}), "Pod")), {})
    assert len(operator.asked) <= 11


# --- security contexts -------------------------------------------------------------------------


def test_security_contexts_default_to_the_restricted_standard() -> None:
    pod = one(render({}), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
    }


def test_security_contexts_come_from_values() -> None:
    values = {
        "podSecurityContext": {"runAsUser": 20002, "runAsGroup": 20002, "fsGroup": 20002},
        "securityContext": {"capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}},
    }
    docs = render(values)
    for pod in (one(docs, "Deployment")["spec"]["template"]["spec"], one(docs, "Pod")["spec"]):
        # Helm merges maps: what is not overridden keeps its restricted default.
        assert pod["securityContext"]["runAsUser"] == 20002
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        (container,) = pod["containers"]
        assert container["securityContext"]["capabilities"]["add"] == ["NET_BIND_SERVICE"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
    valid_everywhere(docs)


# --- gateway defaults ------------------------------------------------------------------------


def operator_env(values: dict[str, Any]) -> dict[str, str]:
    (container,) = one(render(values), "Deployment")["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


GATEWAY_VALUES = {
    "gatewayImage": "registry.example/gw:2",
    "gatewayKeyRotationSeconds": 7200,
    "imagePullSecrets": [{"name": "regcred"}, {"name": "mirror"}],
    "gateway": {"imagePullPolicy": "Always", "resources": {"requests": {"cpu": 0.25}, "limits": {"cpu": 2, "memory": "1Gi"}}},
}


def test_gateway_defaults_reach_the_operators_options() -> None:
    env = operator_env(GATEWAY_VALUES)
    assert env["PORTCULLIS_IMAGE"] == "registry.example/gw:2"
    assert env["PORTCULLIS_KEY_ROTATION_SECONDS"] == "7200"
    assert env["PORTCULLIS_GATEWAY_PULL_POLICY"] == "Always"
    assert env["PORTCULLIS_GATEWAY_PULL_SECRETS"] == "regcred,mirror"
    # The operator reads them when it starts: in a fresh process, as `portcullis operator` would.
    read = (
        "import os; from portcullis.controller.options import from_environment; o = from_environment(os.environ); "
        "g = o.gateway; print(g.image, g.pull_policy, ','.join(g.pull_secrets), o.key_rotation_seconds)"
    )
    result = subprocess.run(
        [sys.executable, "-c", read], env={**os.environ, **env}, capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split() == ["registry.example/gw:2", "Always", "regcred,mirror", "7200.0"]


def test_gateway_pods_get_the_charts_defaults_and_a_servers_resources_win() -> None:
    options = from_environment(operator_env(GATEWAY_VALUES), Options())
    server = {"metadata": {"name": "summarizer", "namespace": "acme", "uid": "u"}}
    template = build_deployment(VirtualMCPServer.model_validate(server), pod=options.gateway, keys_digest="d")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    assert (container["image"], container["imagePullPolicy"]) == ("registry.example/gw:2", "Always")
    assert template["spec"]["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
    # Helm merged the values' requests into the default's (its memory request stays); quantities
    # are written the way the API server stores them.
    assert container["resources"] == {"requests": {"cpu": "250m", "memory": "128Mi"}, "limits": {"cpu": "2", "memory": "1Gi"}}
    own = {**server, "spec": {"resources": {"requests": {"memory": "64Mi"}}}}
    (container,) = build_deployment(VirtualMCPServer.model_validate(own), pod=options.gateway, keys_digest="d")["spec"]["template"]["spec"]["containers"]
    assert container["resources"] == {"requests": {"memory": "64Mi"}}
    valid_everywhere([build_deployment(VirtualMCPServer.model_validate(own), pod=options.gateway, keys_digest="d")])


def test_the_charts_gateway_defaults_are_the_operators_built_in_ones() -> None:
    # Installed with the chart's defaults or run without it, a gateway pod looks the same.
    env = operator_env({})
    assert env["PORTCULLIS_GATEWAY_PULL_POLICY"] == DEFAULT_PULL_POLICY
    assert env["PORTCULLIS_GATEWAY_PULL_SECRETS"] == ""
    assert from_environment(env, Options()).gateway.resources == DEFAULT_RESOURCES
    assert Options().gateway.resources == DEFAULT_RESOURCES


def test_the_gateway_pull_policy_defaults_to_the_operators() -> None:
    assert operator_env({"image": {"pullPolicy": "Never"}})["PORTCULLIS_GATEWAY_PULL_POLICY"] == "Never"
    assert operator_env({"image": {"pullPolicy": "Never"}, "gateway": {"imagePullPolicy": "Always"}})["PORTCULLIS_GATEWAY_PULL_POLICY"] == "Always"


def test_the_chart_and_the_operator_agree_on_what_a_quantity_is() -> None:
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())
    assert schema["definitions"]["quantity"]["pattern"] == QUANTITY_PATTERN


def test_a_value_the_schema_cannot_catch_stops_the_operator_naming_it() -> None:
    # Each quantity is fine on its own; the request above its limit is what the operator refuses.
    env = operator_env({"gateway": {"resources": {"requests": {"memory": "2Gi"}}}})
    with pytest.raises(ConfigurationError, match=r"PORTCULLIS_GATEWAY_RESOURCES=.* requests.memory \(2Gi\) must not exceed limits.memory \(512Mi\).*gateway.resources"):
        from_environment(env, Options())


def test_key_rotation_defaults_to_a_day() -> None:
    assert operator_env({})["PORTCULLIS_KEY_ROTATION_SECONDS"] == "86400"


# --- notes -------------------------------------------------------------------------------------


def test_notes_walk_from_install_to_a_minted_token() -> None:
    text = notes({})
    steps = [
        "kubectl -n portcullis-system rollout status deployment/portcullis",
        "helm test portcullis -n portcullis-system",
        "examples/cluster/summarizer.yaml",
        "kubectl apply -f examples/cluster/ -f examples/rbac/app-backend.yaml",
        "kubectl get portcullis -n acme",
        "kubectl -n acme port-forward svc/summarizer 8081",
        "export PORTCULLIS_ADMIN_SECRET=$(kubectl -n acme create token app-backend)",
        "portcullis token mint --admin-url http://127.0.0.1:8081 --user",
        "{.status.url}",
        "docs/agents.md",
    ]
    positions = [text.find(step) for step in steps]
    assert -1 not in positions, [s for s, p in zip(steps, positions) if p == -1]
    assert positions == sorted(positions)


def test_notes_name_what_network_policies_leave_out() -> None:
    assert "NetworkPolicies" not in notes({})
    cluster_wide = notes({"networkPolicy": {"enabled": True}})
    assert "No gateway policy was rendered" in cluster_wide and "networkPolicy.gatewayNamespaces" in cluster_wide
    assert "admin ports in acme take only the operator" in notes({"watchNamespaces": ["acme"], "networkPolicy": {"enabled": True}})


def test_notes_say_vault_namespaces_need_watch_namespaces() -> None:
    assert "rbac.vaultNamespaces is ignored" in notes({"rbac": {"vaultNamespaces": ["vaults"]}})
    assert "rbac.vaultNamespaces" not in notes({"watchNamespaces": ["acme"], "rbac": {"vaultNamespaces": ["vaults"]}})
