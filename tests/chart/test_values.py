"""The chart's values: every one has a schema that refuses wrong values at render (and so at
install), and a line in the README's table, generated from the comments in values.yaml."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.chart import values_table
from tests.chart.test_chart import CHART, render

SCHEMA: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
DEFAULTS: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = SCHEMA["definitions"][node["$ref"].removeprefix("#/definitions/")]
    return node


def schema_at(path: tuple[str, ...]) -> dict[str, Any]:
    """The schema of the value at `path`, following properties, additionalProperties and $ref."""
    node = SCHEMA
    for key in path:
        node = resolve(node)
        if key in node.get("properties", {}):
            node = node["properties"][key]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            raise KeyError(".".join(path))
    return resolve(node)


def paths(value: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(value, dict):
        for key, child in value.items():
            yield prefix + (key,)
            yield from paths(child, prefix + (key,))


def object_schemas(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if "properties" in node:
            yield node
        for child in node.values():
            yield from object_schemas(child)
    elif isinstance(node, list):
        for child in node:
            yield from object_schemas(child)


# --- the schema -------------------------------------------------------------------------------


def test_schema_is_one_helm_reads() -> None:
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"
    with helm.Chart.load(CHART) as chart:
        assert chart.schema == SCHEMA
        chart.validate_schema(DEFAULTS)


def test_every_value_has_a_schema() -> None:
    for path in paths(DEFAULTS):
        schema_at(path)  # raises KeyError naming the value without one
    assert set(SCHEMA["properties"]) == set(DEFAULTS)


def test_every_object_in_the_schema_refuses_unknown_keys() -> None:
    for node in object_schemas(SCHEMA):
        assert node.get("additionalProperties") is False, sorted(node["properties"])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicas": -1}, "at '/replicas': minimum: got -1, want 0"),
        ({"replicas": "two"}, "at '/replicas': got string, want integer"),
        ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy': value must be one of 'Always', 'IfNotPresent', 'Never'"),
        ({"replicaCount": 2}, "additional properties 'replicaCount' not allowed"),
        ({"watchNamespaces": ["Acme"]}, "at '/watchNamespaces/0': 'Acme' does not match pattern"),
        ({"watchNamespaces": ["acme", "acme"]}, "at '/watchNamespaces': items at 0 and 1 are equal"),
        ({"gatewayKeyRotationSeconds": 60}, "at '/gatewayKeyRotationSeconds': minimum: got 60"),
        ({"securityContext": {"runAsNonroot": True}}, "at '/securityContext': additional properties 'runAsNonroot' not allowed"),
        ({"podSecurityContext": {"seccompProfile": {"type": "Default"}}}, "at '/podSecurityContext/seccompProfile/type'"),
        ({"metrics": {"serviceMonitor": {"interval": "30"}}}, "at '/metrics/serviceMonitor/interval': '30' does not match pattern"),
        ({"networkPolicy": {"enabled": "yes"}}, "at '/networkPolicy/enabled': got string, want boolean"),
        ({"networkPolicy": {"adminFrom": [{"podSelecter": {}}]}}, "at '/networkPolicy/adminFrom/0': additional properties 'podSelecter' not allowed"),
        ({"resources": {"limits": {"memory": "lots"}}}, "at '/resources/limits/memory'"),
        ({"gateway": {"imagePullPolicy": "Sometimes"}}, "at '/gateway/imagePullPolicy': value must be one of '', 'Always'"),
        ({"gateway": {"resources": {"limits": {"cpu": "-1"}}}}, "at '/gateway/resources/limits/cpu'"),
        ({"gateway": {"resources": {"claims": [{"name": "gpu"}]}}}, "at '/gateway/resources': additional properties 'claims' not allowed"),
        ({"gateway": {"replicas": 2}}, "at '/gateway': additional properties 'replicas' not allowed"),
        ({"metrics": {"podMonitor": {"enabled": "yes"}}}, "at '/metrics/podMonitor/enabled': got string, want boolean"),
        ({"metrics": {"podMonitor": {"interval": "30"}}}, "at '/metrics/podMonitor/interval': '30' does not match pattern"),
        ({"metrics": {"podMonitor": {"namespace": "Monitoring"}}}, "at '/metrics/podMonitor/namespace'"),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else "refused",
)
def test_a_wrong_value_is_refused_at_render(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError, match="values don't meet the specifications of the schema") as refused:
        render(values)
    assert message in str(refused.value)


def test_lint_refuses_a_wrong_value_too() -> None:
    report = helm.lint(CHART, {"replicas": -1}, strict=True)
    assert any("at '/replicas': minimum: got -1, want 0" in error for error in report["errors"]), report


@pytest.mark.parametrize(
    "values",
    [
        # What the kind e2e workflow installs with.
        {"image": {"repository": "portcullis", "tag": "e2e", "pullPolicy": "Never"}},
        {"image": {"tag": "0.1.0@sha256:" + "a" * 64}},
        {"replicas": 0, "extraArgs": ["--priority=5"]},
        {"resources": {"requests": {"cpu": 0.5, "memory": "1Gi"}, "limits": {"cpu": "2"}}},
        {"networkPolicy": {"enabled": True, "gatewayNamespaces": ["acme"], "adminFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "backend"}},
             "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["app-backend"]}]}},
            {"ipBlock": {"cidr": "10.0.0.0/8"}},
        ]}},
        {"metrics": {"serviceMonitor": {"enabled": True, "interval": "1m30s", "scrapeTimeout": "10s", "labels": {"release": "kps"}}}},
        {"gateway": {"imagePullPolicy": "Never", "resources": {"requests": {"cpu": 0.25, "memory": "256Mi"}, "limits": {"cpu": 2, "ephemeral-storage": "1Gi"}}}},
        {"metrics": {"podMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "kps"}, "namespace": "monitoring"}}},
    ],
    ids=["e2e", "digest", "zero replicas", "quantities", "network policy", "service monitor", "gateway", "pod monitor"],
)
def test_right_values_are_accepted(values: dict[str, Any]) -> None:
    assert render(values)


# --- the README's table -----------------------------------------------------------------------


def test_readme_values_table_is_current() -> None:
    readme = values_table.README.read_text()
    assert values_table.with_table(readme, values_table.VALUES.read_text()) == readme, (
        "charts/portcullis/README.md's values table is stale: run `.venv/bin/python -m tests.chart.values_table`"
    )


def test_every_value_is_described() -> None:
    text = values_table.VALUES.read_text()
    for key, _, description in values_table.rows(yaml.safe_load(text), values_table.comments(text)):
        assert description, f"values.yaml: {key} has no comment above it"


def test_table_splits_a_map_only_when_its_keys_have_comments() -> None:
    text = (
        "# The image.\n"
        "image:\n"
        "  # Where from.\n"
        "  repository: portcullis\n"
        "  tag: \"\"\n"
        "\n"
        "# Requests and limits.\n"
        "resources:\n"
        "  limits:\n"
        "    cpu: 1 # | a pipe\n"
        "# A list.\n"
        "args:\n"
        "  - --verbose\n"
        "# Not this one: a blank line follows.\n"
        "\n"
        "name: x\n"
    )
    assert values_table.table(text).splitlines() == [
        "| Key | Default | Description |",
        "|---|---|---|",
        "| `image` |  | The image. |",
        "| `image.repository` | `\"portcullis\"` | Where from. |",
        "| `image.tag` | `\"\"` |  |",
        "| `resources` | `{\"limits\": {\"cpu\": 1}}` | Requests and limits. |",
        "| `args` | `[\"--verbose\"]` | A list. |",
        "| `name` | `\"x\"` |  |",
    ]
