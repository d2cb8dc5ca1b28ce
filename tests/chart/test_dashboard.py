"""The Grafana dashboard the chart ships: an opt-in ConfigMap for Grafana's dashboard sidecar,
whose queries name only metrics (and labels) that the gateway and the operator export."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest

from portcullis.controller import metrics as operator_metrics
from tests.chart.test_chart import CHART, K8S_VERSION, NAMESPACE, one, render

DASHBOARD = CHART / "dashboards" / "portcullis.json"
ENABLED = {"grafanaDashboard": {"enabled": True}}

# What the gateway exports: family name -> (type, labels). The gateway's metrics module is the
# other side of this contract; a renamed metric or label there must be renamed here and on the
# dashboard, or this list fails the dashboard test.
GATEWAY_METRICS: dict[str, tuple[str, set[str]]] = {
    "portcullis_calls": ("counter", {"server", "method", "tool", "decision", "outcome"}),
    "portcullis_call_duration_seconds": ("histogram", {"server", "method"}),
    "portcullis_gateway_duration_seconds": ("histogram", {"server", "method"}),
    "portcullis_upstream_duration_seconds": ("histogram", {"server", "connection"}),
    "portcullis_auth_failures": ("counter", {"server", "reason"}),
    "portcullis_denials": ("counter", {"server", "reason"}),
    "portcullis_upstream_errors": ("counter", {"server", "connection", "reason"}),
    "portcullis_tools_exposed": ("gauge", {"server"}),
    "portcullis_tools_upstream": ("gauge", {"server"}),
    "portcullis_tool_schema_tokens": ("gauge", {"server", "scope"}),
    "portcullis_audit_queue_depth": ("gauge", {"server"}),
    "portcullis_audit_queue_capacity": ("gauge", {"server"}),
    "portcullis_audit_write_duration_seconds": ("histogram", {"server", "store"}),
    "portcullis_audit_events_written": ("counter", {"server", "store"}),
    "portcullis_audit_write_failures": ("counter", {"server", "store"}),
    "portcullis_audit_unaudited_calls": ("counter", {"server"}),
    "portcullis_audit_refused_calls": ("counter", {"server"}),
    "portcullis_audit_dropped_events": ("counter", {"server"}),
}
# The operator's labels; the names and types come from the metrics module itself.
OPERATOR_LABELS: dict[str, set[str]] = {
    "portcullis_operator_reconciles": {"kind", "result"},
    "portcullis_operator_reconcile_duration_seconds": {"kind"},
    "portcullis_operator_reconcile_errors": {"kind", "reason"},
}
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def operator_families() -> dict[str, tuple[str, set[str]]]:
    families = [family for metric in operator_metrics.OPERATOR_METRICS for family in metric.describe()]
    return {f.name: (f.type, OPERATOR_LABELS.get(f.name, set())) for f in families}


def known_series() -> dict[str, set[str]]:
    """Every name a query can select (`_total`, `_bucket`, ...) -> the labels it carries."""
    known: dict[str, set[str]] = {}
    for family, (kind, labels) in {**GATEWAY_METRICS, **operator_families()}.items():
        for suffix in SUFFIXES[kind]:
            known[family + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return known


# --- reading PromQL (enough of it for a dashboard's queries) ----------------------------------

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless"}
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def _without_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def metric_names(expr: str) -> set[str]:
    """The series an expression selects: identifiers that are not functions, keywords or labels."""
    bare = _without_strings(expr)
    bare = re.sub(r"\{[^}]*\}", "", bare)  # label matchers
    bare = re.sub(r"\[[^\]]*\]", "", bare)  # range selectors
    bare = GROUPING.sub("", bare)
    names = set()
    for match in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", bare):
        if match.group() in KEYWORDS or bare[match.end():].lstrip().startswith("("):
            continue
        names.add(match.group())
    return names


def labels_used(expr: str) -> set[str]:
    """Label names in matchers and in by/without/on/ignoring clauses."""
    bare = _without_strings(expr)
    used = set()
    for body in re.findall(r"\{([^}]*)\}", bare):
        used |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", body))
    for body in GROUPING.findall(bare):
        used |= {label.strip() for label in body.split(",") if label.strip()}
    return used


def grouped_by(expr: str) -> set[str]:
    return {label.strip() for body in GROUPING.findall(_without_strings(expr)) for label in body.split(",") if label.strip()}


def test_the_promql_reader_finds_names_and_labels() -> None:
    expr = 'histogram_quantile(0.99, sum by (le, method) (rate(x_bucket{server=~"a|b(c)"}[5m]))) / on(job) y_total > bool 1e-9'
    assert metric_names(expr) == {"x_bucket", "y_total"}
    assert labels_used(expr) == {"le", "method", "server", "job"}
    assert grouped_by(expr) == {"le", "method", "job"}


# --- the dashboard ------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


def targets() -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in panels():
        for target in panel.get("targets", []):
            yield panel["title"], target


def test_dashboard_is_a_grafana_dashboard_with_a_datasource_and_a_server_variable() -> None:
    board = dashboard()
    assert board["uid"] == "portcullis" and board["title"] == "Portcullis"
    assert 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    server = variables["server"]
    assert server["type"] == "query"
    assert server["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert server["definition"] == "label_values(portcullis_calls_total, server)"
    assert server["multi"] is True and server["includeAll"] is True


def test_every_panel_queries_the_chosen_datasource() -> None:
    shown = [p for p in panels() if p["type"] != "row"]
    assert shown
    for panel in shown:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]


def test_panels_have_unique_ids_and_fit_the_grid_without_overlapping() -> None:
    everything = list(panels())
    ids = [p["id"] for p in everything]
    assert len(ids) == len(set(ids))
    boxes = [(p["title"], p["gridPos"]) for p in everything]
    for title, box in boxes:
        assert box["x"] >= 0 and box["x"] + box["w"] <= 24, title
    for i, (a_title, a) in enumerate(boxes):
        for b_title, b in boxes[i + 1:]:
            apart = a["x"] + a["w"] <= b["x"] or b["x"] + b["w"] <= a["x"] or a["y"] + a["h"] <= b["y"] or b["y"] + b["h"] <= a["y"]
            assert apart, f"{a_title!r} overlaps {b_title!r}"


def test_every_query_names_only_exported_metrics_and_their_labels() -> None:
    known = known_series()
    queries = list(targets())
    assert len(queries) >= 20
    for title, target in queries:
        expr = target["expr"]
        stripped = _without_strings(expr)
        assert stripped.count("(") == stripped.count(")") and stripped.count("{") == stripped.count("}"), expr
        names = metric_names(expr)
        assert names, f"{title}: {expr}"
        unknown = names - set(known)
        assert not unknown, f"{title}: unknown metrics {sorted(unknown)}"
        available = set().union(*(known[n] for n in names))
        assert labels_used(expr) <= available, f"{title}: labels {sorted(labels_used(expr) - available)} in {expr}"
        # A legend may name only labels that survive the aggregation.
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
        assert legend <= grouped_by(expr), f"{title}: legend {sorted(legend - grouped_by(expr))} aggregated away"
    variable = next(v for v in dashboard()["templating"]["list"] if v["name"] == "server")
    assert metric_names(variable["definition"].removeprefix("label_values(").split(",")[0]) <= set(known)


def test_every_gateway_query_follows_the_server_variable() -> None:
    for title, target in targets():
        for name in metric_names(target["expr"]):
            if "server" in known_series()[name]:
                selectors = re.findall(rf"\b{name}(\{{[^}}]*\}})?", target["expr"])
                assert selectors and all('server=~"$server"' in s for s in selectors), f"{title}: {name}"


def test_every_exported_metric_has_a_panel() -> None:
    used = {name for _, target in targets() for name in metric_names(target["expr"])}
    families = {**GATEWAY_METRICS, **operator_families()}
    for family, (kind, _) in families.items():
        assert any(family + suffix in used for suffix in SUFFIXES[kind]), f"no panel shows {family}"


def test_the_operator_metrics_are_the_ones_the_operator_defines() -> None:
    # A family added to or renamed in the metrics module must have its labels listed here.
    defined = {family.name for metric in operator_metrics.OPERATOR_METRICS for family in metric.describe()}
    assert defined == set(OPERATOR_LABELS)
    # And the labels listed are the ones exposed (the two families present from the start).
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    exposed = {
        sample.name: set(sample.labels)
        for family in text_string_to_metric_families(generate_latest().decode())
        for sample in family.samples
        if sample.name.startswith("portcullis_operator_")
    }
    known = known_series()
    for name in ("portcullis_operator_reconciles_total", "portcullis_operator_reconcile_duration_seconds_bucket"):
        assert exposed[name] == known[name]


# --- the ConfigMap ------------------------------------------------------------------------


def dashboards(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]


def test_no_dashboard_configmap_by_default() -> None:
    assert dashboards(render({})) == []


def test_enabled_dashboard_is_a_valid_configmap_for_the_grafana_sidecar() -> None:
    (configmap,) = dashboards(render(ENABLED))
    kubernetes_validate.validate(configmap, K8S_VERSION, strict=True)
    meta = configmap["metadata"]
    assert meta["name"] == "portcullis-dashboard"
    assert meta["namespace"] == NAMESPACE
    assert meta["labels"]["grafana_dashboard"] == "1"
    assert meta["labels"]["app.kubernetes.io/part-of"] == "portcullis"
    # Shipped as is: not templated, so the legends' {{label}} survive.
    assert json.loads(configmap["data"]["portcullis.json"]) == dashboard()


def test_dashboard_namespace_labels_and_annotations_can_be_chosen() -> None:
    values = {"grafanaDashboard": {
        "enabled": True, "namespace": "monitoring",
        "labels": {"grafana_dashboard": None, "team": "platform"},
        "annotations": {"grafana_folder": "Portcullis"},
    }}
    (configmap,) = dashboards(render(values))
    kubernetes_validate.validate(configmap, K8S_VERSION, strict=True)
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert configmap["metadata"]["labels"]["team"] == "platform"
    assert "grafana_dashboard" not in configmap["metadata"]["labels"]
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Portcullis"}


def test_chart_with_the_dashboard_lints_strictly() -> None:
    report = helm.lint(CHART, ENABLED, strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("values", [{}, ENABLED], ids=["defaults", "dashboard"])
def test_operator_pod_names_its_metrics_port(values: dict[str, Any]) -> None:
    (container,) = one(render(values), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in container["ports"]
