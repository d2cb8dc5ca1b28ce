"""The call metrics (audit/metrics.py's CallMetric) expose what prometheus_client's own would."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from portcullis.gateway.audit.metrics import _LATENCY_BUCKETS, CallMetric

LABELS = st.sampled_from([("gw", "tools/call"), ("gw", "prompts/get"), ("other", "tools/call")])
# Latencies as they come (0 and up, bounds hit exactly), and what a clock step back could give.
SECONDS = st.floats(min_value=-1, max_value=120, allow_nan=False) | st.sampled_from([0.0, *map(float, _LATENCY_BUCKETS)])


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample but the `_created` timestamps, which differ by when each series was made."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def created(registry: CollectorRegistry) -> set[tuple[str, frozenset[tuple[str, str]]]]:
    return {
        (sample.name, frozenset(sample.labels.items()))
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
        if sample.name.endswith("_created")
    }


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(LABELS, SECONDS), max_size=40))
def test_a_histogram_exposes_the_samples_prometheus_client_would(observations: list[tuple[tuple[str, str], float]]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = CallMetric("t_duration_seconds", "How long.", ["server", "method"], buckets=_LATENCY_BUCKETS, registry=ours)
    reference = Histogram("t_duration_seconds", "How long.", ["server", "method"], buckets=_LATENCY_BUCKETS, registry=theirs)
    for labels, seconds in observations:
        fast.observe(seconds, *labels)
        reference.labels(*labels).observe(seconds)
    assert samples(ours) == samples(theirs)
    assert created(ours) == created(theirs)
    for labels, _ in observations:
        assert fast.value(*labels) == sum(1 for other, _ in observations if other == labels)


@settings(max_examples=100, deadline=None)
@given(st.lists(LABELS, max_size=40))
def test_a_counter_exposes_the_samples_prometheus_client_would(increments: list[tuple[str, str]]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = CallMetric("t_calls_total", "Calls.", ["server", "method"], registry=ours)
    reference = Counter("t_calls_total", "Calls.", ["server", "method"], registry=theirs)
    for labels in increments:
        fast.inc(*labels)
        reference.labels(*labels).inc()
    assert samples(ours) == samples(theirs)
    assert created(ours) == created(theirs)
    assert generate_latest(ours).count(b"# TYPE t_calls_total counter") == 1


def test_its_name_is_taken_in_the_registry_like_any_metric() -> None:
    registry = CollectorRegistry()
    CallMetric("t_calls_total", "Calls.", ["server"], registry=registry)
    try:
        Counter("t_calls_total", "Calls again.", ["server"], registry=registry)
    except ValueError as exc:
        assert "Duplicated timeseries" in str(exc)
    else:
        raise AssertionError("a second metric of the same name was registered")
