"""Instructions per `tools/call` in the gateway process, counted by valgrind: a figure machine noise cannot move.

On a shared 2-core machine the gateway's CPU time per call moves by 10-30% from one minute to
the next, more than most single changes to the hot path are worth. Counting the instructions
the process executes (callgrind) does not depend on what else runs: two runs of the same build
agree within about 1%. So a change to the hot path is judged here, build against build, and
its effect in time is then confirmed with `stack_floor.py --baseline` and `gateway_overhead.py`.

What it does: the fast upstream on its own; each gateway (this checkout's `portcullis`, and
`--baseline` if given, side by side) under `valgrind --tool=callgrind` with a credential stored
and a token minted; 200 warm-up calls; the counters zeroed (`callgrind_control -z`); `--calls`
calls of `echo` (2026-07-28 wire) from `--connections` keep-alive connections, every answer
checked; the counters dumped. Instructions per call = the dump's total / calls.

What it does not count: the kernel's work on the gateway's behalf (system calls: `--syscalls`
counts those with strace, in a separate run without valgrind), and cache misses or stalls.
Under valgrind a gateway starts in about a minute and serves about 100 calls/s.

    python benchmarks/instructions.py [--calls 2000] [--connections 64] [--baseline EXECUTABLE] [--syscalls] [--keep DIR]

A baseline executable can be a script running an older checkout:
`PYTHONPATH=/tmp/old/operator exec .venv/bin/python -m portcullis.cli "$@"`.
Needs valgrind (Debian: apt-get install -y valgrind) and, for --syscalls, strace.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import load, stack  # noqa: E402

TOOL, ARGUMENTS = "echo", {"text": "hello from the benchmark"}
WARMUP_CALLS = 200
VALGRIND_STARTUP_SECONDS = 900.0  # a gateway under callgrind imports everything about 50x slower


def callgrind_total(dump: str) -> int:
    """The instruction count of a callgrind dump (its `summary:` line, or `totals:` in older dumps)."""
    found = re.search(r"^(?:summary|totals):\s+(\d+)", dump, re.M)
    if found is None:
        raise ValueError("not a callgrind dump: no summary or totals line")
    return int(found.group(1))


def strace_counts(summary: str) -> dict[str, int]:
    """System call name -> calls, from `strace -c` output."""
    counts: dict[str, int] = {}
    for line in summary.splitlines():
        fields = line.split()
        # "% time  seconds  usecs/call  calls  [errors]  syscall"
        if len(fields) >= 5 and re.fullmatch(r"[\d.]+", fields[0]) and fields[-1] != "total":
            counts[fields[-1]] = int(fields[3])
    return counts


def _wrapper(executable: str, out: Path) -> Path:
    script = out / "gateway-under-callgrind"
    script.write_text(
        "#!/bin/sh\n"
        f'exec valgrind --tool=callgrind --trace-children=yes -q --callgrind-out-file={out}/callgrind.%p {executable} "$@"\n'
    )
    script.chmod(0o755)
    return script


def count_instructions(executable: str, upstream_url: str, calls: int, connections: int,
                       keep: Path | None = None) -> float:
    """Instructions per call of one gateway build; its dump copied to `keep` if given."""
    with tempfile.TemporaryDirectory(prefix="portcullis-instructions-") as tmp:
        out = Path(tmp)
        with stack.gateway(upstream_url, out / "gw", None, executable=str(_wrapper(executable, out)),
                           startup_timeout=VALGRIND_STARTUP_SECONDS) as gw:
            target = load.tool_call(gw.url, TOOL, ARGUMENTS, token=gw.token)
            _checked(load.python_load(target, min(connections, 8), calls=WARMUP_CALLS), executable)
            subprocess.run(["callgrind_control", "-z", str(gw.pid)], check=True, capture_output=True)
            result = _checked(load.python_load(target, connections, calls=calls), executable)
            subprocess.run(["callgrind_control", "-d", str(gw.pid)], check=True, capture_output=True)
            dumps = sorted(glob.glob(f"{out}/callgrind.*"), key=os.path.getmtime)
            if keep is not None:
                shutil.copyfile(dumps[-1], keep)
            return callgrind_total(Path(dumps[-1]).read_text()) / result.calls


def count_syscalls(executable: str, upstream_url: str, calls: int, connections: int) -> dict[str, float]:
    """System calls per call of one gateway build (strace -c on its threads while it serves)."""
    with tempfile.TemporaryDirectory(prefix="portcullis-syscalls-") as tmp:
        with stack.gateway(upstream_url, Path(tmp) / "gw", None, executable=executable) as gw:
            target = load.tool_call(gw.url, TOOL, ARGUMENTS, token=gw.token)
            _checked(load.python_load(target, min(connections, 8), calls=WARMUP_CALLS), executable)
            tracer = subprocess.Popen(["strace", "-c", "-f", "-p", str(gw.pid)], stderr=subprocess.PIPE, text=True)
            time.sleep(1.0)  # attached to every thread before the first counted call
            result = _checked(load.python_load(target, connections, calls=calls), executable)
            tracer.send_signal(2)
            _, summary = tracer.communicate(timeout=30)
            return {name: n / result.calls for name, n in strace_counts(summary).items()}


def _checked(result: load.LoadResult, executable: str) -> load.LoadResult:
    if result.failures or not result.calls:
        raise SystemExit(f"{executable}: {result.failures} failed calls, e.g. {result.failure_samples[:1]}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--baseline", metavar="EXECUTABLE", help="another `portcullis` (an older build) to count beside this one")
    parser.add_argument("--keep", metavar="DIR", type=Path,
                        help="copy each build's dump here (`callgrind_annotate DIR/baseline.callgrind`)")
    parser.add_argument("--syscalls", action="store_true", help="also count system calls per call (strace, no valgrind)")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind not found (Debian: apt-get install -y valgrind)", file=sys.stderr)
        return 2
    if args.syscalls and shutil.which("strace") is None:
        print("strace not found (Debian: apt-get install -y strace)", file=sys.stderr)
        return 2
    builds = {"this checkout": stack.portcullis_executable()}
    if args.baseline:
        builds["baseline"] = args.baseline
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    with stack.upstream() as (_, upstream_url):
        print(f"counting {args.calls} calls from {args.connections} connections under callgrind "
              f"({len(builds)} gateway(s) side by side; about {1 + args.calls // 100 // 60 + 1} min)", file=sys.stderr, flush=True)
        with concurrent.futures.ThreadPoolExecutor(len(builds)) as pool:
            futures = {name: pool.submit(count_instructions, exe, upstream_url, args.calls, args.connections,
                                         args.keep / f"{name.replace(' ', '-')}.callgrind" if args.keep else None)
                       for name, exe in builds.items()}
            instructions = {name: future.result() for name, future in futures.items()}
        syscalls = {name: count_syscalls(exe, upstream_url, args.calls, args.connections)
                    for name, exe in builds.items()} if args.syscalls else {}
    print(f"\n## Instructions per `tools/call` in the gateway ({args.calls} calls, {args.connections} connections, callgrind)\n")
    print("| build | instructions per call |" + (" ratio |" if args.baseline else ""))
    print("|---|---:|" + ("---:|" if args.baseline else ""))
    for name, count in instructions.items():
        ratio = f" {count / instructions['baseline']:.3f}x |" if args.baseline else ""
        print(f"| {name} | {count:,.0f} |{ratio}")
    if syscalls:
        names = sorted({n for counts in syscalls.values() for n in counts},
                       key=lambda n: -max(counts.get(n, 0) for counts in syscalls.values()))
        names = [n for n in names if max(c.get(n, 0) for c in syscalls.values()) >= 0.05]
        print(f"\n## System calls per call (strace -c, {args.calls} calls)\n")
        print("| system call | " + " | ".join(builds) + " |")
        print("|---|" + "---:|" * len(builds))
        for name in names:
            print(f"| {name} | " + " | ".join(f"{syscalls[b].get(name, 0):.2f}" for b in builds) + " |")
        print("| **all** | " + " | ".join(f"{sum(syscalls[b].values()):.2f}" for b in builds) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
