"""benchmarks/replicas.py runs end to end at its smallest settings.

As in test_harness_smoke.py, timing is the benchmark's output, never this test's
assertion. What the test shows: every configuration produces figures, every call
came back as a successful tool result, both gateways behind the balancer answered
(the token minted on the first is accepted by the second: both run `serve --url`
with one public URL), and the calls really reached the upstream. It uses the
Python load generator and no pinning, so it needs neither wrk nor taskset; about
ten seconds.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CONFIGS = {"proxy → 1 gw", "proxy → 2 gw", "direct 1 gw", "split 2 gw", "proxy → upstream"}
CONCURRENCY = {8, 32}


def test_replicas_benchmark_reports_figures_and_both_gateways_answer_every_call(tmp_path: Path) -> None:
    out = tmp_path / "replicas.json"
    argv = [
        sys.executable, str(REPO / "benchmarks" / "replicas.py"),
        "--quick", "--generator", "python", "--no-pin", "--reps", "1", "--seconds", "0.3", "--json", str(out),
    ]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Portcullis replicas" in done.stdout
    report: dict[str, Any] = json.loads(out.read_text())

    rows = report["runs"]
    assert {(r["config"], r["connections"]) for r in rows} == {(k, c) for k in CONFIGS for c in CONCURRENCY}
    for row in rows:
        assert row["failures"] == 0, row
        assert row["calls"] > 0 and math.isfinite(row["rps"]) and row["rps"] > 0, row

    # The 2-gateway balancer sent calls to both, and neither refused one (a 401 is a failure above).
    backends = report["balance"]
    assert len(backends) == 2, backends
    for name, counts in backends.items():
        assert counts["alive"] and counts["failed"] == 0, (name, counts)
        assert counts["dispatched"] == counts["answered"] > 0, (name, counts)

    # Every call the generators counted as a success arrived at the upstream.
    assert report["upstream_calls"]["tools/call"] >= sum(r["calls"] for r in rows)
