"""The operator's configuration from its environment: the gateway pods' defaults the chart sets,
read once at start, and a malformed one refused there, naming the variable and the chart value."""

from __future__ import annotations

from typing import Any

import kopf
import pytest

from portcullis import __version__
from portcullis.cli import main
from portcullis.controller import options as options_module
from portcullis.controller.options import DEFAULT_IMAGE, ENVIRONMENT, ConfigurationError, Options, from_environment
from portcullis.controller.run import run_operator
from portcullis.render.deployment import DEFAULT_PULL_POLICY, DEFAULT_RESOURCES, GatewayPod

BASE = Options(resync_seconds=7)


def test_without_the_variables_the_options_are_kept() -> None:
    assert from_environment({}, BASE) == BASE
    assert from_environment({name: "" for name in ENVIRONMENT}, BASE) == BASE  # empty is unset


def test_the_built_in_defaults() -> None:
    gateway = Options().gateway
    assert gateway == GatewayPod(image=DEFAULT_IMAGE, pull_policy=DEFAULT_PULL_POLICY, pull_secrets=(), resources=DEFAULT_RESOURCES)
    assert DEFAULT_IMAGE == f"ghcr.io/portcullis/portcullis:{__version__}"


def test_every_gateway_default_is_read() -> None:
    options = from_environment(
        {
            "PORTCULLIS_IMAGE": "registry.example/portcullis:2",
            "PORTCULLIS_GATEWAY_PULL_POLICY": "Always",
            "PORTCULLIS_GATEWAY_PULL_SECRETS": "regcred, mirror-creds",
            "PORTCULLIS_GATEWAY_RESOURCES": '{"requests": {"cpu": "250m", "memory": 268435456}, "limits": {"cpu": 1.5}}',
            "PORTCULLIS_KEY_ROTATION_SECONDS": "7200",
        },
        BASE,
    )
    assert options.gateway == GatewayPod(
        image="registry.example/portcullis:2",
        pull_policy="Always",
        pull_secrets=("regcred", "mirror-creds"),
        # Helm's toJson writes unquoted numbers from the values as JSON numbers.
        resources={"requests": {"cpu": "250m", "memory": "268435456"}, "limits": {"cpu": "1.5"}},
    )
    assert options.key_rotation_seconds == 7200.0
    assert options.resync_seconds == 7  # the rest is the base's


def test_an_empty_resources_object_means_no_requests_or_limits() -> None:
    assert from_environment({"PORTCULLIS_GATEWAY_RESOURCES": "{}"}, BASE).gateway.resources == {}


@pytest.mark.parametrize(
    ("variable", "value", "why"),
    [
        ("PORTCULLIS_IMAGE", "registry.example/portcullis 2", "an image reference has no spaces"),
        ("PORTCULLIS_GATEWAY_PULL_POLICY", "Sometimes", "use one of Always, IfNotPresent, Never"),
        ("PORTCULLIS_GATEWAY_PULL_SECRETS", "regcred,Not_A_Name", "'Not_A_Name' is not a Secret name"),
        ("PORTCULLIS_GATEWAY_RESOURCES", "{requests: {cpu: 1}}", "not JSON"),
        ("PORTCULLIS_GATEWAY_RESOURCES", '["cpu", "1"]', "want a JSON object"),
        ("PORTCULLIS_GATEWAY_RESOURCES", '{"limits": {"memory": "lots"}}', "limits.memory"),
        ("PORTCULLIS_GATEWAY_RESOURCES", '{"limit": {"memory": "1Gi"}}', "limit"),
        ("PORTCULLIS_GATEWAY_RESOURCES", '{"limits": {"cpu": true}}', "limits.cpu"),
        ("PORTCULLIS_GATEWAY_RESOURCES", '{"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}', "requests.cpu (2) must not exceed limits.cpu (1)"),
        ("PORTCULLIS_KEY_ROTATION_SECONDS", "a day", "want a positive number of seconds"),
        ("PORTCULLIS_KEY_ROTATION_SECONDS", "-5", "want a positive number of seconds"),
    ],
)
def test_a_malformed_value_names_the_variable_and_the_chart_value(variable: str, value: str, why: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        from_environment({variable: value}, BASE)
    message = str(refused.value)
    assert message.startswith(f"environment variable {variable}={value!r} is malformed: ")
    assert why in message
    assert message.endswith(f"(the Helm chart sets it from {ENVIRONMENT[variable]})")


def test_every_variable_names_a_value_the_chart_has() -> None:
    import yaml

    from tests.chart.test_chart import CHART

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for variable, chart_value in ENVIRONMENT.items():
        key = chart_value.split()[0]
        node: Any = values
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{variable}: the chart has no value {key}"
            node = node[part]


@pytest.fixture
def kopf_run(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(kopf, "run", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(options_module, "_current", [Options()])
    for variable in ENVIRONMENT:
        monkeypatch.delenv(variable, raising=False)
    return calls


def test_the_operator_reads_the_environment_when_it_starts(kopf_run: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORTCULLIS_GATEWAY_PULL_SECRETS", "regcred")
    monkeypatch.setenv("PORTCULLIS_GATEWAY_RESOURCES", '{"limits": {"memory": "1Gi"}}')
    run_operator(namespaces=None, clusterwide=True, peering=None, metrics_port=None)
    assert len(kopf_run) == 1
    gateway = options_module.current().gateway
    assert (gateway.pull_secrets, gateway.resources) == (("regcred",), {"limits": {"memory": "1Gi"}})


def test_a_malformed_value_stops_the_operator_before_kopf_starts(
    kopf_run: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PORTCULLIS_GATEWAY_RESOURCES", '{"limits": {"memory": "lots"}}')
    assert main(["operator", "-A"]) == 1
    assert kopf_run == []  # no handler ever ran
    assert options_module.current() == Options()  # nothing half-installed
    err = capsys.readouterr().err
    assert err.startswith("portcullis: environment variable PORTCULLIS_GATEWAY_RESOURCES=")
    assert "gateway.resources" in err
    assert "Traceback" not in err
