"""What the audit step costs per call, in CPU, without the rest of the gateway around it.

One allowed `tools/call` recorded the way `Gateway.call_tool` records it: `recording(...)`
opens a `CallRecord`, digests the arguments, allows, reserves the event's place, times an
(empty) upstream, digests the result; the `finally` emits the event to a `JsonLinesAuditSink`
on /dev/null (what `portcullis serve` prints on stdout), the metrics, and the queue of the
SQLite store, whose writer links and stores it in its worker thread. Calls come in rounds of
`--concurrency`, with one loop iteration between rounds (as when that many connections are
answered together: the sink writes once per iteration, the writer wakes per batch). CPU is
the process's (`time.process_time`, so the store's worker thread counts), divided by the calls;
each repetition ends with every event stored, and a chain that verifies.

    .venv/bin/python benchmarks/audit_micro.py                      # this checkout, median of 7 runs
    .venv/bin/python benchmarks/audit_micro.py --calls 5000 --reps 3
    .venv/bin/python benchmarks/audit_micro.py --against /tmp/audit-base/operator --reps 9

`--against DIR` runs each repetition in a fresh process, alternating this checkout's code with
the `portcullis` package under DIR (e.g. a `git worktree` of the baseline commit's `operator/`),
so a shared machine's drift hits both alike, and prints both medians and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:  # imported at run time inside measure(), from whichever checkout the process runs
    from portcullis.gateway.audit.trail import AuditTrail
    from portcullis.gateway.identity.tokens import SessionClaims

OPERATOR = Path(__file__).resolve().parent.parent / "operator"
ARGUMENTS = {"text": "hello from the benchmark"}
RESULT = {"content": [{"type": "text", "text": "hello from the benchmark"}], "isError": False}


async def measure(calls: int, concurrency: int, lines: TextIO) -> dict[str, float]:
    """One repetition in this process: CPU and wall µs per recorded call; the JSON lines go to `lines`."""
    from portcullis.gateway.audit.keys import MemoryAuditKeys
    from portcullis.gateway.audit.sinks import JsonLinesAuditSink
    from portcullis.gateway.audit.sqlite import SqliteAuditStore
    from portcullis.gateway.audit.trail import AuditTrail
    from portcullis.gateway.identity.tokens import SessionClaims

    claims = SessionClaims(
        iss="https://gateway.example", aud="bench/bench", sub="bench-user@example.com", tenant="bench",
        exp=int(time.time()) + 3600, iat=time.time(), jti="0123456789abcdef0123456789abcdef",
    )
    with tempfile.TemporaryDirectory() as tmp:
        trail = AuditTrail(
            server="bench/bench", tenant="bench", keys=MemoryAuditKeys(), sinks=[JsonLinesAuditSink(lines)],
            store=SqliteAuditStore(Path(tmp) / "audit.db"), capacity=calls + 1000,  # room for all: a slow disk must not refuse calls here
        )
        await trail.start()
        try:
            await _calls(trail, claims, 500, concurrency)  # warm: store opened, metric children made
            await trail.flush()
            cpu, loop_cpu, wall = time.process_time(), time.thread_time(), time.perf_counter()
            await _calls(trail, claims, calls, concurrency)
            await trail.flush()
            cpu, loop_cpu, wall = time.process_time() - cpu, time.thread_time() - loop_cpu, time.perf_counter() - wall
            report = await trail.verify()
            assert report.ok and report.events == calls + 500, report.to_dict()
        finally:
            await trail.stop()
    return {"cpu_us": cpu / calls * 1e6, "loop_cpu_us": loop_cpu / calls * 1e6, "wall_us": wall / calls * 1e6}


async def _calls(trail: AuditTrail, claims: SessionClaims, calls: int, concurrency: int) -> None:
    """`calls` allowed calls recorded as Gateway.call_tool records them, `concurrency` per loop iteration."""
    from portcullis.gateway.audit.recorder import recording

    for done in range(0, calls, concurrency):
        for _ in range(min(concurrency, calls - done)):
            with recording(trail, claims, "tools/call", "echo") as record:
                record.arguments(ARGUMENTS)
                record.allow("fast")
                assert record.admit()
                with record.upstream():
                    pass
                record.result(RESULT, "ok")
        await asyncio.sleep(0)


def run_child(operator: Path, args: argparse.Namespace) -> dict[str, float]:
    """One repetition in a fresh process importing `portcullis` from `operator`."""
    env = {**os.environ, "PYTHONPATH": str(operator)}
    argv = [sys.executable, __file__, "--one", "--calls", str(args.calls), "--concurrency", str(args.concurrency)]
    if args.core is not None:
        argv += ["--core", str(args.core)]
    out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout
    figures: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000, help="recorded calls per repetition")
    parser.add_argument("--concurrency", type=int, default=64, help="calls per loop iteration")
    parser.add_argument("--reps", type=int, default=7, help="repetitions (medians are reported)")
    parser.add_argument("--against", type=Path, help="also run the portcullis package under this directory, interleaved")
    parser.add_argument("--core", type=int, default=0, help="pin the measured process to this core (as the gateway is)")
    parser.add_argument("--no-pin", dest="core", action="store_const", const=None, help="do not pin")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        if args.core is not None:
            os.sched_setaffinity(0, {args.core})  # the store's worker thread, started later, inherits it
        with open(os.devnull, "w") as devnull:
            print(json.dumps(asyncio.run(measure(args.calls, args.concurrency, devnull))))
        return
    sides = {"this checkout": OPERATOR, **({"against": args.against.resolve()} if args.against else {})}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    for rep in range(args.reps):
        order = list(sides.items()) if rep % 2 == 0 else list(reversed(sides.items()))
        for name, operator in order:
            figures = run_child(operator, args)
            runs[name].append(figures)
            print(f"rep {rep + 1} {name}: {figures['cpu_us']:.1f} µs CPU/call "
                  f"({figures['loop_cpu_us']:.1f} of it on the event loop's thread), {figures['wall_us']:.1f} µs wall/call", file=sys.stderr)
    medians = {name: statistics.median(r["cpu_us"] for r in figures) for name, figures in runs.items()}
    for name, median in medians.items():
        spread = sorted(r["cpu_us"] for r in runs[name])
        print(f"{name}: median {median:.1f} µs CPU per recorded call (min {spread[0]:.1f}, max {spread[-1]:.1f}; "
              f"{args.reps} runs of {args.calls} calls, {args.concurrency} per loop iteration)")
    if args.against:
        print(f"ratio this checkout / against: {medians['this checkout'] / medians['against']:.3f}")


if __name__ == "__main__":
    main()
