"""The operator counts and times its reconciles for Prometheus, and serves them on a port of its own.

The series live in the process-wide default registry, shared by every test in the run, so
each test reads a value before it acts and asserts on the change. The end-to-end tests run
the real operator (kopf, every handler) against the kmock emulator.
"""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import kopf
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from portcullis.controller import options as options_module
from portcullis.controller.metrics import observe_reconcile
from portcullis.controller.options import Options
from portcullis.controller.run import run_operator
from portcullis.render.deployment import GatewayPod
from tests.controller.test_reconcile import NS, VMS, condition, create_world, obj
from tests.support.operator_runner import eventually, operator_emulator, running_operator

RECONCILES = "portcullis_operator_reconciles_total"
DURATIONS = "portcullis_operator_reconcile_duration_seconds_count"
ERRORS = "portcullis_operator_reconcile_errors_total"


Key = tuple[str, tuple[tuple[str, str], ...]]


def key(name: str, **labels: str) -> Key:
    return name, tuple(sorted(labels.items()))


def samples(text: str | None = None) -> dict[Key, float]:
    """Every sample of an exposition text (default: the registry's, now), by name and labels."""
    text = generate_latest().decode() if text is None else text
    return {
        key(sample.name, **sample.labels): float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def moved(before: dict[Key, float], name: str, **labels: str) -> float:
    """How far one sample moved since `before` was read (an absent sample reads 0)."""
    k = key(name, **labels)
    return samples().get(k, 0.0) - before.get(k, 0.0)


def free_port() -> int:
    """A port free a moment ago, for an operator that must be told its metrics port in advance."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# --- the context manager ---------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [kopf.TemporaryError("try later", delay=1), kopf.PermanentError("never"), ValueError("bad")],
    ids=["TemporaryError", "PermanentError", "ValueError"],
)
def test_a_raising_reconcile_counts_as_an_error_by_class_and_is_re_raised(error: Exception) -> None:
    reason = type(error).__name__
    before = samples()
    with pytest.raises(type(error)) as raised, observe_reconcile("ToolMapping"):
        raise error
    assert raised.value is error
    assert moved(before, RECONCILES, kind="ToolMapping", result="error") == 1
    assert moved(before, RECONCILES, kind="ToolMapping", result="success") == 0
    assert moved(before, ERRORS, kind="ToolMapping", reason=reason) == 1
    assert moved(before, DURATIONS, kind="ToolMapping") == 1


def test_a_finished_reconcile_counts_as_a_success_with_its_duration() -> None:
    before = samples()
    with observe_reconcile("MCPConnection"):
        pass
    assert moved(before, RECONCILES, kind="MCPConnection", result="success") == 1
    assert moved(before, RECONCILES, kind="MCPConnection", result="error") == 0
    assert moved(before, DURATIONS, kind="MCPConnection") == 1
    # Every observation lands in the +Inf bucket, whatever its length.
    assert moved(before, "portcullis_operator_reconcile_duration_seconds_bucket", kind="MCPConnection", le="+Inf") == 1


def test_a_cancelled_reconcile_is_neither_a_success_nor_an_error() -> None:
    before = samples()
    with pytest.raises(asyncio.CancelledError), observe_reconcile("VirtualMCPServer"):
        raise asyncio.CancelledError
    assert moved(before, RECONCILES, kind="VirtualMCPServer", result="success") == 0
    assert moved(before, RECONCILES, kind="VirtualMCPServer", result="error") == 0
    assert moved(before, DURATIONS, kind="VirtualMCPServer") == 0


def test_every_kind_and_result_is_exposed_before_anything_happens() -> None:
    # rate() of a series that does not exist yet is "no data", not 0: an error-ratio panel
    # must read 0 before the first error.
    exposed = samples()
    for kind in ("VirtualMCPServer", "ToolMapping", "MCPConnection"):
        for result in ("success", "error"):
            assert key(RECONCILES, kind=kind, result=result) in exposed
        assert key(DURATIONS, kind=kind) in exposed


# --- the real operator -----------------------------------------------------------------

KINDS = ("VirtualMCPServer", "ToolMapping", "MCPConnection")


@pytest.mark.anyio
async def test_reconciles_of_a_new_world_are_counted_per_kind_and_timed() -> None:
    before = samples()
    async with operator_emulator() as k8s, running_operator(k8s):
        await create_world(k8s)
        await eventually(lambda: condition(obj(k8s, VMS, "summarizer"), "ConfigValid").get("status") == "True")
        # Each counter moves as its hand-off returns, just after the status it wrote.
        def counted() -> bool:
            return all(moved(before, RECONCILES, kind=kind, result="success") >= 1 for kind in KINDS)

        await eventually(counted, what="a successful reconcile of each kind")
        for kind in KINDS:
            assert moved(before, DURATIONS, kind=kind) >= 1, kind
    for kind in KINDS:
        assert moved(before, RECONCILES, kind=kind, result="error") == 0


@pytest.mark.anyio
async def test_a_reconcile_the_api_refuses_counts_as_an_error_named_for_the_exception() -> None:
    def errors(name: str, **labels: str) -> float:
        # Which handler meets the refusal first (the server's or its mapping's) is a race.
        return sum(moved(before, name, kind=kind, **labels) for kind in KINDS)

    before = samples()
    async with operator_emulator() as k8s:
        k8s[f"post /apis/apps/v1/namespaces/{NS}/deployments"] << 422
        async with running_operator(k8s):
            await create_world(k8s)
            await eventually(lambda: errors(ERRORS, reason="APIUnprocessableEntityError") >= 1, what="a counted 422")
            assert errors(RECONCILES, result="error") >= 1


@pytest.mark.anyio
async def test_the_operator_serves_its_metrics_on_their_own_port_while_it_runs() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    success = key(RECONCILES, kind="VirtualMCPServer", result="success")
    before = samples().get(success, 0.0)

    async def served(session: aiohttp.ClientSession) -> float:
        async with session.get(url) as response:
            assert response.status == 200
            return samples(await response.text()).get(success, 0.0)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        async with operator_emulator() as k8s, running_operator(k8s, options=Options(resync_seconds=3600, metrics_port=port)):
            await create_world(k8s)

            async def counted() -> bool:
                try:
                    return await served(session) > before
                except aiohttp.ClientConnectionError:
                    return False  # kopf runs in a thread of its own: its startup may not be done

            await eventually(counted, what="a reconcile on the metrics port")
        # The cleanup handler closed the port with the operator.
        with pytest.raises(aiohttp.ClientConnectionError):
            await served(session)


def test_run_operator_serves_metrics_on_9090_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kopf, "run", lambda **_: None)
    monkeypatch.setattr(options_module, "_current", [Options(resync_seconds=5)])
    run_operator(namespaces=None, clusterwide=True, peering=None)
    assert options_module.current().metrics_port == 9090
    assert options_module.current().resync_seconds == 5  # the rest of the configuration is kept
    run_operator(namespaces=None, clusterwide=True, peering=None, metrics_port=None)
    assert options_module.current().metrics_port is None
    run_operator(namespaces=None, clusterwide=True, peering=None, metrics_port=9100, options=Options(gateway=GatewayPod(image="x")))
    assert (options_module.current().metrics_port, options_module.current().gateway.image) == (9100, "x")
