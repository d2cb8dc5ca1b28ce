"""`portcullis operator` hands kopf a peering priority of its own per process."""

from __future__ import annotations

from typing import Any

import kopf
import pytest

from portcullis.cli import main
from portcullis.controller.run import peering_priority


@pytest.fixture
def kopf_run(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replaces kopf.run: records what the operator would have run with."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(kopf, "run", lambda **kwargs: calls.append(kwargs))
    return calls


def test_a_given_priority_reaches_kopf(kopf_run: list[dict[str, Any]]) -> None:
    assert main(["operator", "--peering", "portcullis", "--priority", "7", "-A"]) == 0
    (call,) = kopf_run
    assert (call["standalone"], call["peering_name"], call["priority"]) == (False, "portcullis", 7)


def test_peering_without_a_priority_draws_one_per_process(kopf_run: list[dict[str, Any]]) -> None:
    # kopf pauses every replica sharing the top priority: two replicas must not tie.
    assert main(["operator", "--peering", "portcullis", "-A"]) == 0
    assert main(["operator", "--peering", "portcullis", "-A"]) == 0
    first, second = (call["priority"] for call in kopf_run)
    assert isinstance(first, int) and isinstance(second, int) and first != second


def test_standalone_has_no_priority(kopf_run: list[dict[str, Any]]) -> None:
    assert main(["operator", "-A"]) == 0
    (call,) = kopf_run
    assert call["standalone"] is True and call["priority"] is None
    with pytest.raises(ValueError, match="peering"):
        peering_priority(None, 3)


def test_kopf_runs_with_a_large_young_generation_and_the_start_up_heap_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    from portcullis.controller.run import YOUNG_GENERATION

    seen: list[tuple[tuple[int, ...], int]] = []
    monkeypatch.setattr(kopf, "run", lambda **_: seen.append((gc.get_threshold(), gc.get_freeze_count())))
    before = gc.get_threshold()
    assert main(["operator", "-A"]) == 0
    ((thresholds, frozen),) = seen
    assert thresholds == (YOUNG_GENERATION, *before[1:])
    assert frozen > 0  # modules, classes, kopf's registry: out of every full collection
    # And put back when kopf returns, for a process that goes on (as this one does).
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
