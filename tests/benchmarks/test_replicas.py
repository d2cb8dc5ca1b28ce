"""benchmarks/replicas.py runs end to end at its smallest settings.

As in test_harness_smoke.py, timing is the benchmark's output, never this test's
assertion. What the test shows: every configuration produces figures, every call
came back as a successful tool result, both gateways behind the balancer answered
(the token minted on the first is accepted by the second: both run `serve --url`
with one public URL), and the calls really reached the upstream. The forwarded-answer
part makes a few session-era calls of each kind on each path: every one answered, and
on the balancer's path every asked call's answer landed on the replica that did not
start it (the thing that part measures), with calls started on both. It uses the
Python load generator and no pinning, so it needs neither wrk nor taskset; about
fifteen seconds.
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
FORWARD_CALLS = 3


def test_replicas_benchmark_reports_figures_and_both_gateways_answer_every_call(tmp_path: Path) -> None:
    out = tmp_path / "replicas.json"
    argv = [
        sys.executable, str(REPO / "benchmarks" / "replicas.py"),
        "--quick", "--generator", "python", "--no-pin", "--reps", "1", "--seconds", "0.3",
        "--forward-calls", str(FORWARD_CALLS), "--json", str(out),
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

    # The forwarded answer: every (kind, path) in every round, every call answered and timed.
    forward = report["forward"]
    blocks = forward["rows"]
    rounds = forward["rounds"]
    assert {(b["kind"], b["path"], b["rep"]) for b in blocks} == {
        (k, p, r) for k in ("plain", "asked") for p in ("same", "other") for r in range(rounds)
    }
    for block in blocks:
        assert block["failures"] == 0, block
        assert len(block["latencies_ms"]) == FORWARD_CALLS and all(math.isfinite(v) and v > 0 for v in block["latencies_ms"]), block
    asked = [b["routing"] for b in blocks if b["kind"] == "asked" and b["path"] == "other"]
    assert asked and all(r["elsewhere"] == r["calls"] == FORWARD_CALLS and r["failed"] == 0 for r in asked), asked
    assert set().union(*(r["started_on"] for r in asked)) == {"b0", "b1"}, asked
    assert "An answer that lands on the other replica" in done.stdout
