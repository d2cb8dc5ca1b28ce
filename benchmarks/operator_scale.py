"""Operator cost per server as the namespace grows: N VirtualMCPServers sharing one MCPConnection.

The shape is the realistic one: one Gmail connection, many agent roles, each server with one
ToolMapping to that connection. For each N the harness starts the kmock emulator (with the
project's fast dispatch, tests/support/kmock_support.py) in this process, starts the real
operator (kopf and every handler, logging at INFO as `portcullis operator` does) in a
**subprocess** logged in to it, waits for its watches, creates the connection, then N pairs of
mapping + server, and a stand-in Deployment controller marks each gateway Deployment
available once it exists (what kubelet and the Deployment controller do in a cluster).

Measured per N (operator = the subprocess, so the emulator's own cost is separate):

- time until every server has `status.url`, and until every one is `phase: Ready`;
- the operator's API writes per server: POST/PATCH/PUT/DELETE requests the emulator received
  from kopf's client (User-Agent kopf/...), kopf's Events counted apart; reads per server too;
- operator CPU per server: the subprocess's user+system time (/proc/<pid>/stat) from the first
  create until it has written nothing for 2 s, over N;
- operator memory per server: RSS growth over the same span, over N;
- idle CPU: the operator's CPU over a window (10 s) after that with nothing changing;
- the emulator's (and this harness's) CPU over the same span, for scale;
- reconciles per server (the operator's GETs of a server) and GC CPU (gc.callbacks, thread time).

Each measurement runs in a fresh process. `--compare DIR` also measures another tree's operator
and emulator (e.g. `git archive <commit> operator tests/__init__.py tests/support | tar -x -C DIR`)
and `--default-gc` this tree with CPython's default GC, interleaved run by run. Sizes are interleaved across repeats (20, 100, 200, 500, 20, 100, ...) on a shared 2-core
machine; figures are medians over the repeats. CPU time, not wall time, is the headline.

    .venv/bin/python benchmarks/operator_scale.py            # 20/100/200/500, 3 repeats (~6 min)
    .venv/bin/python benchmarks/operator_scale.py --quick    # N=20 once (smoke, ~20 s)
    .venv/bin/python benchmarks/operator_scale.py --sizes 500 --repeats 1 --profile /tmp/op.prof

Figures (2026-12-02, 2-core shared VM, medians of 3; details in
benchmarks/results/operator-scale-2026-12-02.md). Operator CPU per server at N = 20 / 100 /
200 / 500:

    before (43f8bc5)   46.5 / 87.6 / 85.7 / 148.7 ms  (3.2x)   all Ready at 500: 227 s, RSS 376 MiB
    after              33.5 / 36.8 / 32.8 /  30.1 ms  (0.90x)  all Ready at 500:  26 s, RSS 156 MiB

writes/server ~16 and reconciles/server ~2.2 throughout; no writes at idle; idle CPU 30-90 ms
per 10 s. What grew: (1) every reconcile parsed every ToolMapping and MCPConnection of the
namespace (pydantic) and rewrote every connection's status, O(N) per reconcile; now it reads
only its own server's mappings and the connections they name, and a connection's status is
written from its own and its mappings' events. (2) Garbage collection: with CPython's default
young generation, a burst of reconciles promoted its short-lived objects and triggered full
collections over a heap that grows with N (36 s of GC at N=500 before, 10 s with (1) alone);
`run_operator` now runs kopf with a young generation of 10,000 and the start-up heap frozen
(1.7 s). (3) The emulator scanned every stored object per GET/PATCH/DELETE/POST (its cost,
not the operator's, but it set the wall time); it now looks the object up by key.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Where `portcullis` and `tests.support` come from: this tree, or (--compare) another one, e.g.
# `git archive <commit> operator tests/__init__.py tests/support | tar -x -C DIR`.
SOURCE = Path(os.environ.get("OPERATOR_SCALE_SOURCE") or ROOT)
sys.path[:0] = [str(SOURCE / "operator"), str(SOURCE)]

NS = "bench"
WRITES = {"POST", "PATCH", "PUT", "DELETE"}
QUIET_SECONDS = 2.0
# What the operator watches once it is up: the three kinds and the nine child kinds.
WATCHED = {
    "virtualmcpservers", "toolmappings", "mcpconnections", "configmaps", "secrets", "services",
    "serviceaccounts", "deployments", "roles", "rolebindings", "horizontalpodautoscalers", "poddisruptionbudgets",
}
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
DEFAULT_GC = "default-gc"  # a variant: this tree, CPython's default garbage collection


# --- the operator subprocess ------------------------------------------------------------------


def run_operator_child(url: str, namespace: str, resync: float, profile: str | None) -> None:
    """The operator as `portcullis operator` runs it (INFO logging), logged in to the emulator at `url`."""
    import logging

    import kopf

    import portcullis.controller.handlers  # noqa: F401 - registers the handlers
    from portcullis.controller import options as options_module
    from tests.support import operator_runner  # login to the emulator, no cluster scanning

    async def no_gateway(server: Any) -> None:
        return None  # no gateways run here; the default fetch would wait on DNS for each server

    operator_runner._target[0] = url
    options_module.install(options_module.Options(resync_seconds=resync, fetch_status=no_gateway))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gc_totals = _time_garbage_collection()
    # As `portcullis operator` runs it (controller/run.py), unless told to keep CPython's
    # defaults; a tree from before the tuning has none.
    from portcullis.controller import run as run_module

    tuned = getattr(run_module, "tuned_garbage_collection", None)
    gc_context = tuned() if tuned is not None and not os.environ.get("OPERATOR_SCALE_DEFAULT_GC") else contextlib.nullcontext()
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        with gc_context:
            kopf.run(standalone=True, namespaces=[namespace], clusterwide=False)
    finally:
        if profiler is not None and profile is not None:
            profiler.disable()
            profiler.dump_stats(profile)
        print(f"GC: {json.dumps(gc_totals)}", flush=True)


def _time_garbage_collection() -> dict[str, float]:
    """CPU seconds spent in garbage collection (the operator's thread) and full collections, kept up to date."""
    import gc

    totals = {"seconds": 0.0, "full": 0}
    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.thread_time()
        else:
            totals["seconds"] += time.thread_time() - started[0]
            totals["full"] += info["generation"] == 2

    gc.callbacks.append(callback)
    return totals


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK  # utime + stime, all threads


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# --- one run ----------------------------------------------------------------------------------


@dataclass
class Run:
    n: int
    all_url_s: float
    all_ready_s: float
    settled_s: float
    cpu_s: float
    cpu_per_server_ms: float
    writes: int
    writes_per_server: float
    events: int
    reads_per_server: float
    rss_start_mib: float
    rss_end_mib: float
    rss_per_server_kib: float
    idle_window_s: float
    idle_cpu_ms: float
    idle_writes: int
    emulator_cpu_s: float
    reconciles_per_server: float = 0.0
    gc_cpu_s: float = 0.0  # the operator's whole life, start-up and idle included
    gc_full: int = 0


class Log:
    """A cursor over the emulator's request log: what the operator sent, counted as it comes."""

    def __init__(self, k8s: Any) -> None:
        # The emulator's live log (an older tests/support has no accessor for it).
        self._requests: list[Any] = k8s.request_log() if hasattr(k8s, "request_log") else k8s._requests
        self._cursor = 0
        self.writes = 0
        self.events = 0
        self.reads = 0
        self.reconciles = 0
        self.last_write = time.perf_counter()
        self.watching: set[str] = set()

    def advance(self) -> None:
        requests = self._requests
        end = len(requests)
        for request in requests[self._cursor:end]:
            if not str(request.headers.get("User-Agent", "")).startswith("kopf"):
                continue  # the harness's own requests
            method = request.method.value
            path = request.url.path
            if method in WRITES:
                if "/events" in path:
                    self.events += 1
                else:
                    self.writes += 1
                    self.last_write = time.perf_counter()
            elif method == "GET":
                if request.params.get("watch") == "true":
                    self.watching.add(path.rsplit("/", 1)[-1])
                else:
                    self.reads += 1
                    if "/virtualmcpservers/" in path:
                        self.reconciles += 1  # each reconcile reads its server first
        self._cursor = end


async def _send(k8s: Any, method: str, path: str, body: dict[str, Any]) -> None:
    headers = {"Content-Type": "application/merge-patch+json"} if method == "patch" else {}
    async with k8s.request(method, path, json=body, headers=headers) as response:
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: {response.status} {await response.text()}")


def _crd_path(plural: str) -> str:
    return f"/apis/portcullis.dev/v1alpha1/namespaces/{NS}/{plural}"


async def _wait(check: Any, timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.perf_counter() + timeout
    while not check():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(every)


async def _deployment_controller(k8s: Any, pending: set[str]) -> None:
    """Mark each gateway Deployment available once it exists (a failed patch is tried again)."""

    async def mark(name: str) -> None:
        try:
            await _send(k8s, "patch", f"/apis/apps/v1/namespaces/{NS}/deployments/{name}/status",
                        {"status": {"availableReplicas": 1, "readyReplicas": 1}})
        except Exception:  # e.g. a connection reset under load: next round
            pending.add(name)

    while True:
        found = [n for n in pending if _live(k8s, "apps/v1/deployments", n) is not None][:50]
        for name in found:
            pending.discard(name)
        await asyncio.gather(*(mark(name) for name in found))
        await asyncio.sleep(0.02)


def _live(k8s: Any, resource: str, name: str) -> dict[str, Any] | None:
    try:
        found = k8s.objects[resource, NS, name]
    except KeyError:
        return None
    return None if found.deleted else found.raw


async def measure(n: int, *, idle: float, resync: float, profile: str | None, keep_log: Path | None) -> Run:
    from tests.support.operator_runner import operator_emulator

    async with operator_emulator() as k8s:
        log = Log(k8s)
        url = str(k8s.url).rstrip("/")
        out = open(keep_log, "w+") if keep_log else tempfile.TemporaryFile("w+")  # noqa: SIM115
        child = subprocess.Popen(
            [sys.executable, __file__, "--child", url, NS, str(resync)] + (["--profile", profile] if profile else []),
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OPERATOR_SCALE_SOURCE": str(SOURCE)},
        )
        try:
            def watching() -> bool:
                log.advance()
                return WATCHED <= log.watching

            await _wait(watching, 60, "the operator's watches")
            await asyncio.sleep(1.0)  # let start-up work finish before the baseline
            log.advance()
            rss_start = rss_kib(child.pid)
            cpu_start = cpu_seconds(child.pid)
            emu_start = time.process_time()
            writes_start, reads_start, events_start = log.writes, log.reads, log.events
            reconciles_start = log.reconciles
            started = time.perf_counter()

            pending = {f"s{i}" for i in range(n)}
            controller = asyncio.create_task(_deployment_controller(k8s, pending))
            await _send(k8s, "post", _crd_path("mcpconnections"), {
                "apiVersion": "portcullis.dev/v1alpha1", "kind": "MCPConnection",
                "metadata": {"name": "gmail", "namespace": NS},
                "spec": {"url": "http://gmail-mcp.tools.svc:8080/mcp", "credential": {"source": "user"}},
            })
            for i in range(n):
                await _send(k8s, "post", _crd_path("toolmappings"), {
                    "apiVersion": "portcullis.dev/v1alpha1", "kind": "ToolMapping",
                    "metadata": {"name": f"s{i}-gmail", "namespace": NS},
                    "spec": {"serverRef": {"name": f"s{i}"}, "connectionRef": {"name": "gmail"},
                             "tools": [{"name": "fetch_mails"}]},
                })
                await _send(k8s, "post", _crd_path("virtualmcpservers"), {
                    "apiVersion": "portcullis.dev/v1alpha1", "kind": "VirtualMCPServer",
                    "metadata": {"name": f"s{i}", "namespace": NS}, "spec": {"replicas": 1},
                })

            no_url = {f"s{i}" for i in range(n)}
            not_ready = set(no_url)

            def status(name: str) -> dict[str, Any]:
                return (_live(k8s, "portcullis.dev/v1alpha1/virtualmcpservers", name) or {}).get("status") or {}

            def all_url() -> bool:
                no_url.difference_update([s for s in no_url if status(s).get("url")])
                return not no_url

            def all_ready() -> bool:
                not_ready.difference_update([s for s in not_ready if status(s).get("phase") == "Ready"])
                return not not_ready

            budget = 60 + n * 0.6
            await _wait(all_url, budget, "every status.url")
            all_url_s = time.perf_counter() - started
            await _wait(all_ready, budget, "every server Ready")
            all_ready_s = time.perf_counter() - started
            controller.cancel()

            def quiet() -> bool:
                log.advance()
                return time.perf_counter() - log.last_write >= QUIET_SECONDS

            await _wait(quiet, budget, "the operator to go quiet")
            settled = log.last_write
            cpu_end = cpu_seconds(child.pid)
            emu_end = time.process_time()
            rss_end = rss_kib(child.pid)
            writes, reads, events = log.writes - writes_start, log.reads - reads_start, log.events - events_start
            reconciles = log.reconciles - reconciles_start

            idle_writes_start = log.writes
            idle_cpu_start = cpu_seconds(child.pid)
            await asyncio.sleep(idle)
            log.advance()
            idle_cpu = cpu_seconds(child.pid) - idle_cpu_start
            cpu = cpu_end - cpu_start
            run = Run(
                n=n,
                all_url_s=all_url_s,
                all_ready_s=all_ready_s,
                settled_s=settled - started,
                cpu_s=cpu,
                cpu_per_server_ms=cpu / n * 1000,
                writes=writes,
                writes_per_server=writes / n,
                events=events,
                reads_per_server=reads / n,
                rss_start_mib=rss_start / 1024,
                rss_end_mib=rss_end / 1024,
                rss_per_server_kib=(rss_end - rss_start) / n,
                idle_window_s=idle,
                idle_cpu_ms=idle_cpu * 1000,
                idle_writes=log.writes - idle_writes_start,
                emulator_cpu_s=emu_end - emu_start,
                reconciles_per_server=reconciles / n,
            )
        finally:
            child.send_signal(signal.SIGINT)  # kopf stops gracefully (and a profile is written)
            try:
                await asyncio.to_thread(child.wait, 30)
            except subprocess.TimeoutExpired:
                child.kill()
                await asyncio.to_thread(child.wait, 10)
            out.seek(0)
            printed = out.read()
            out.close()
    for line in printed.splitlines():
        if line.startswith("GC: "):
            totals = json.loads(line[4:])
            run.gc_cpu_s, run.gc_full = totals["seconds"], totals["full"]
    return run


# --- reporting --------------------------------------------------------------------------------

COLUMNS = [
    ("N", "n", "{:.0f}"),
    ("all url (s)", "all_url_s", "{:.1f}"),
    ("all Ready (s)", "all_ready_s", "{:.1f}"),
    ("operator CPU (s)", "cpu_s", "{:.2f}"),
    ("CPU/server (ms)", "cpu_per_server_ms", "{:.1f}"),
    ("reconciles/server", "reconciles_per_server", "{:.1f}"),
    ("writes/server", "writes_per_server", "{:.1f}"),
    ("reads/server", "reads_per_server", "{:.1f}"),
    ("kopf Events", "events", "{:.0f}"),
    ("RSS end (MiB)", "rss_end_mib", "{:.0f}"),
    ("RSS/server (KiB)", "rss_per_server_kib", "{:.0f}"),
    ("idle CPU ms/10 s", "idle_cpu_per_10s", "{:.0f}"),
    ("idle writes", "idle_writes", "{:.0f}"),
    ("GC CPU (s)", "gc_cpu_s", "{:.1f}"),
    ("full GCs", "gc_full", "{:.0f}"),
    ("emulator+harness CPU (s)", "emulator_cpu_s", "{:.1f}"),
]


def table(runs: list[Run]) -> str:
    if not runs:
        return "(no run finished)"
    by_n: dict[int, list[dict[str, float]]] = {}
    for run in runs:
        row = asdict(run)
        row["idle_cpu_per_10s"] = run.idle_cpu_ms * 10 / run.idle_window_s
        by_n.setdefault(run.n, []).append(row)
    lines = [
        "| " + " | ".join(c[0] for c in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for n in sorted(by_n):
        rows = by_n[n]
        cells = [fmt.format(statistics.median(r[key] for r in rows)) for _, key, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + f" |  ({len(rows)} run{'s' if len(rows) > 1 else ''})")
    first, last = min(by_n), max(by_n)
    if first != last:
        ratio = statistics.median(r["cpu_per_server_ms"] for r in by_n[last]) / statistics.median(
            r["cpu_per_server_ms"] for r in by_n[first]
        )
        lines.append("")
        lines.append(f"CPU per server, N={last} / N={first}: {ratio:.2f}x")
    return "\n".join(lines)


def measure_in_process(n: int, args: argparse.Namespace, source: str | None, tag: str) -> Run | None:
    """One measurement in a fresh process (emulator and harness), so runs do not share a heap."""
    env = {**os.environ}
    if source == DEFAULT_GC:
        env["OPERATOR_SCALE_DEFAULT_GC"] = "1"
    elif source:
        env["OPERATOR_SCALE_SOURCE"] = source
    command = [sys.executable, __file__, "--measure", str(n), "--idle", str(args.idle), "--resync", str(args.resync)]
    if args.profile:
        command += ["--profile", f"{args.profile}.{tag}"]
    if args.keep_logs:
        command += ["--keep-logs", f"{args.keep_logs}/operator-{tag}.log"]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        print(f"measurement N={n} ({tag}) failed, left out:\n{done.stderr[-3000:]}", file=sys.stderr, flush=True)
        return None
    return Run(**json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        profile = sys.argv[sys.argv.index("--profile") + 1] if "--profile" in sys.argv else None
        run_operator_child(sys.argv[2], sys.argv[3], float(sys.argv[4]), profile)
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 100, 200, 500])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="N=20 once: a smoke run")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measured after settling")
    parser.add_argument("--resync", type=float, default=3600.0,
                        help="the per-server resync period (default: out of the measured span)")
    parser.add_argument("--compare", metavar="DIR",
                        help="also measure the operator and emulator of another tree (DIR/operator, DIR/tests/support), "
                             "interleaved run by run with this one")
    parser.add_argument("--default-gc", action="store_true",
                        help="also measure this tree with CPython's default garbage collection, interleaved")
    parser.add_argument("--profile", help="cProfile the operator; stats to PROFILE.<variant>-<n>-<repeat>")
    parser.add_argument("--keep-logs", help="keep the operators' logs in this directory")
    parser.add_argument("--json", help="write every run to this file")
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # one run in this process, JSON out
    args = parser.parse_args()
    if args.measure is not None:
        run = asyncio.run(measure(args.measure, idle=args.idle, resync=args.resync, profile=args.profile,
                                  keep_log=Path(args.keep_logs) if args.keep_logs else None))
        print(json.dumps(asdict(run)))
        return
    if args.quick:
        args.sizes, args.repeats = [20], 1
    if args.keep_logs:
        Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
    variants: list[tuple[str, str | None]] = [("this tree", None)]
    if args.default_gc:
        variants.insert(0, ("this tree, default GC", DEFAULT_GC))
    if args.compare:
        variants.insert(0, ("compared", str(Path(args.compare).resolve())))
    runs: dict[str, list[Run]] = {label: [] for label, _ in variants}
    started = time.perf_counter()
    for repeat in range(args.repeats):
        for n in args.sizes:
            for label, source in variants:
                tag = f"{label.replace(' ', '').replace(',', '-')}-{n}-{repeat}"
                measured = measure_in_process(n, args, source, tag)
                if measured is None:
                    continue
                run = measured
                runs[label].append(run)
                if args.json:  # as it goes: a long run interrupted keeps what it measured
                    Path(args.json).write_text(json.dumps({k: [asdict(r) for r in v] for k, v in runs.items()}, indent=2))
                print(f"  {label:>21} repeat {repeat + 1} N={n}: CPU/server {run.cpu_per_server_ms:.1f} ms, "
                      f"writes/server {run.writes_per_server:.1f}, reads/server {run.reads_per_server:.1f}, "
                      f"Ready in {run.all_ready_s:.1f} s, idle {run.idle_cpu_ms:.0f} ms", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({label: [asdict(r) for r in rs] for label, rs in runs.items()}, indent=2))
    print(f"\n{time.perf_counter() - started:.0f} s. Operator in a subprocess against the kmock emulator, "
          f"one namespace, one shared MCPConnection; medians over {args.repeats} repeat(s)")
    for label, _ in variants:
        print(f"\n{label}:" if len(variants) > 1 else "")
        print(table(runs[label]))


if __name__ == "__main__":
    main()
