"""Operator and gateway together: a ToolMapping edit reaches a connected agent, no restart.

The benchmark of the same story (benchmarks/allowlist_propagation.py) is run once here for
its behaviour only: each change must arrive as list_changed and show in tools/list within
its bounded waits. Its timings are reported by the benchmark, never asserted.
"""

from __future__ import annotations

import pytest

from benchmarks.allowlist_propagation import propagate

pytestmark = pytest.mark.anyio


async def test_a_mapping_change_reaches_a_connected_agent_through_operator_and_gateway() -> None:
    results = await propagate(runs=2)
    assert all(len(values) == 2 for values in results.values())
