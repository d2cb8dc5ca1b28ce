"""The gateway benchmark harness runs end to end at its smallest settings.

Timing is the harness's output, never this test's assertion: the test only shows
that the harness produces figures for every measurement and that every call it
sent through the gateway came back as a successful tool result (and really
reached the upstream), so a broken gateway or harness cannot report speed.
It uses the Python load generator, so it needs neither wrk nor taskset.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CALLS = 200
SESSIONS = 50


def run_harness(out: Path) -> dict[str, Any]:
    argv = [
        sys.executable, str(REPO / "benchmarks" / "gateway_overhead.py"),
        "--quick", "--generator", "python", "--no-pin", "--reps", "1",
        "--calls", str(CALLS), "--sessions", str(SESSIONS), "--json", str(out),
    ]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Portcullis gateway overhead" in done.stdout
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_harness_reports_figures_and_every_gateway_call_succeeds(tmp_path: Path) -> None:
    report = run_harness(tmp_path / "report.json")

    rows = report["load"]
    assert {(r["side"], r["connections"]) for r in rows} == {(s, c) for s in ("direct", "gateway") for c in (1, 8, 64, 256)}
    for row in rows:
        assert row["generator"] == "python"
        assert row["failures"] == 0, row
        assert row["calls"] == CALLS, row
        assert finite(row["rps"]) and finite(row["p50_ms"]) and finite(row["p99_ms"]) and finite(row["p999_ms"]), row
        if row["side"] == "gateway":
            assert finite(row["gateway_cpu_us_per_call"]), row

    for section, failures in (("sequential", "sequential_failures"), ("sdk", "sdk_failures")):
        assert report[failures] == 0
        assert report[section], section
        for summary in report[section]:
            assert summary["pairs"] > 0
            assert finite(summary["gateway_cpu_us_per_call"]), summary
            assert all(math.isfinite(v) for v in summary.values() if isinstance(v, float)), summary
    # The SDK client in both eras (and with a session per call), against the fast upstream and an MCP SDK upstream.
    modes = ("2026-07-28", "legacy", "legacy-per-call")
    assert {(r["mode"], r["upstream"]) for r in report["sdk"]} == {(m, u) for m in modes for u in ("fast", "sdk")}

    # Per-user credentials against `source: none`, at each concurrency, with no failures.
    assert {(r["source"], r["connections"]) for r in report["credentials"]} == {(s, c) for s in ("user", "none") for c in (8, 64)}
    assert all(r["failures"] == 0 and finite(r["gateway_cpu_us_per_call"]) for r in report["credentials"])

    memory = report["memory"]
    assert memory["failures"] == 0, memory["failure_samples"]
    assert memory["opened"] == SESSIONS
    assert memory["rss_before_kib"] > 0 and memory["rss_after_kib"] > 0

    # Every call the gateway answered as a success really arrived at the upstream.
    through_gateway = sum(r["calls"] for r in rows if r["side"] == "gateway")
    assert report["upstream_calls"]["tools/call"] >= through_gateway


def test_audit_store_benchmark_reports_figures_and_every_call_is_stored(tmp_path: Path) -> None:
    """benchmarks/audit_store.py at its smallest: all four steps, every call stored and verified."""
    from tests.support.postgres import find_bindir, unavailable

    if find_bindir() is None:
        unavailable("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    out = tmp_path / "audit.json"
    argv = [
        sys.executable, str(REPO / "benchmarks" / "audit_store.py"),
        "--quick", "--rounds", "2", "--calls", "50", "--seconds", "0.5", "--writer-seconds", "1", "--prune-rows", "5000",
        "--no-pin", "--generator", "python", "--json", str(out),
    ]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Portcullis audit store cost" in done.stdout
    report: dict[str, Any] = json.loads(out.read_text())

    (sequential,) = report["sequential"]
    assert set(sequential) == {"none", "none-b", "sqlite", "postgres"}
    for store, row in sequential.items():
        assert row["failures"] == 0 and row["calls"] == 2 * 50, (store, row)
        assert finite(row["p50_ms"]) and finite(row["p99_ms"]) and finite(row["cpu_us_per_call"]), (store, row)
    assert sequential["sqlite"]["batches"] > 0 and sequential["postgres"]["batches"] > 0
    assert {(r["store"], r["connections"]) for r in report["load"]} == {(s, c) for s in ("none", "sqlite", "postgres") for c in (8, 64)}
    for row in report["load"]:
        assert row["failures"] == 0 and row["calls"] > 0 and finite(row["rps"]), row

    for store, row in report["durability"].items():
        assert row["queue_depth"] == 0 and row["failing"] is None, (store, row)
        assert row["dropped"] == row["refused"] == row["unaudited"] == 0, (store, row)
        assert row["every_call_stored"], (store, row)
        if store != "none":
            assert row["verify"]["ok"] is True, (store, row["verify"])
            assert row["stored_tools_call"] == row["upstream_calls"] > 0, (store, row)

    writers = report["writers"]
    assert len(writers["rows"]) == 4
    assert writers["stored"] == writers["expected"] == sum(r["events"] for r in writers["rows"]) > 0
    assert writers["verify_ok"] is True and writers["verify_writers"] == 4

    prune = report["prune"]
    assert prune["rows"] == prune["removed"] == 5000
    assert prune["partition_dropped"] is True and prune["left"] == 0
    assert prune["live_stored"] == prune["live_events"] > 0


def test_session_requests_benchmark_measures_every_kind_of_request() -> None:
    """benchmarks/session_requests.py at its smallest: every kind answered, a figure for each."""
    argv = [sys.executable, str(REPO / "benchmarks" / "session_requests.py"), "--requests", "20", "--rounds", "1"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line}
    kinds = ("initialize", "notifications/initialized", "tools/list", "ping", "tools/call", "GET stream", "DELETE")
    assert all(float(rows[kind].replace(",", "")) >= 0 for kind in kinds), done.stdout


def test_stack_floor_benchmark_reports_every_process() -> None:
    """benchmarks/stack_floor.py at its smallest, with a baseline (this same build): every row a figure, and the ratio."""
    from benchmarks.stack import portcullis_executable

    argv = [sys.executable, str(REPO / "benchmarks" / "stack_floor.py"), "--seconds", "1", "--rounds", "1", "--connections", "4",
            "--baseline", portcullis_executable()]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line}
    assert all(float(rows[name].replace(",", "")) > 0 for name in ("floor proxy", "gateway", "baseline gateway")), done.stdout
    assert "Gateway CPU per call against the baseline:" in done.stdout


def test_instruction_counts_are_read_from_callgrind_and_strace_output() -> None:
    """benchmarks/instructions.py runs the gateway under valgrind (too slow for CI); its two parsers are pinned here."""
    from benchmarks.instructions import callgrind_total, strace_counts

    assert callgrind_total("version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nsummary: 2405215096\n\nfl=(1)\n") == 2405215096
    assert callgrind_total("events: Ir\ntotals: 17\n") == 17
    with pytest.raises(ValueError, match="not a callgrind dump"):
        callgrind_total("events: Ir\n")
    summary = """% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 41.30    0.120000          19      6062           write
 20.10    0.060000          14      4043         3 read
  0.50    0.001000           1      2441           getpid
------ ----------- ----------- --------- --------- ----------------
100.00    0.290000          22     12546         3 total
"""
    assert strace_counts(summary) == {"write": 6062, "read": 4043, "getpid": 2441}


def test_the_profile_drops_an_idle_worker_in_both_passes_and_keeps_busy_native_frames() -> None:
    from benchmarks.gateway_profile import parse_raw

    pool = "thread (2): uvloop_0;_bootstrap (/usr/lib/python3.11/threading.py:995);_worker (/usr/lib/python3.11/concurrent/futures/thread.py:69)"
    busy = "thread (1): MainThread;Runner.run (/usr/lib/python3.11/asyncio/runners.py:86);_Connection.send (/x/portcullis/gateway/http1.py:500)"
    raw = "\n".join([
        f"{pool} 30",  # the Python pass: the worker's own frame is the leaf
        f"{pool};0x7f00 (/usr/lib/x86_64-linux-gnu/libc.so.6) 40",  # --native: libc's wait below it
        f"{busy};write (/usr/lib/x86_64-linux-gnu/libc.so.6) 5",
        f"{busy} 7",
    ])
    profile = parse_raw(raw)
    assert profile.total == 12
    assert sum(profile.threads.values()) == 12 and all("MainThread" in t for t in profile.threads)
