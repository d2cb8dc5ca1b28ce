"""Scaling out: calls per second through a no-stickiness balancer with 1 and with 2 gateway processes.

Two `portcullis serve` processes share one state directory (keys, vault,
revocations, the SQLite audit file), as replicas share a cluster's storage, and
sit behind tests/support/round_robin.py run as a process of its own (aiohttp on
uvloop, per-request round robin, no retries). The session token is minted once,
on the first replica, and the same pre-built request goes to both: that each
replica accepts the other's token and uses the credential stored through the
other is part of what is measured (every answer is checked).

Four configurations, measured in interleaved rounds (1, 2, direct, split, 1, 2, ...)
so that drift on the machine hits all of them alike:

- `proxy → 1 gw`:  the balancer with the first gateway as its only backend;
- `proxy → 2 gw`:  the balancer with both (the configuration the target is about);
- `direct 1 gw`:   wrk straight at the first gateway (what the balancer costs);
- `split 2 gw`:    two wrk processes, each at one gateway with half the connections
  (client-side balancing: the gateways' own scaling, with no proxy in the path);
- `proxy → upstream`: the balancer straight in front of the fast upstream, no gateway
  (what the balancer itself can carry, and its CPU per request).

The upstream is benchmarks/fast_upstream.py, the load generator wrk (falls back to
the raw-socket Python generator, and says so), the call a 2026-07-28 `tools/call`
of `echo`. CPU per call is read from /proc/<pid>/stat (utime+stime, all threads)
of every process before and after each run; wrk's from getrusage(RUSAGE_CHILDREN).

Placement: each gateway pinned to a core of its own (taskset). On a 2-core
machine nothing is left over, so the balancer, the upstream and wrk float on
both cores and compete with the gateways - the report says so, and shows what
that costs: with G CPU-µs per call in a gateway and X in everything else, two
cores cannot carry more than 2e6 / (G + X) calls/s, so the 2-gateway ratio is
capped at about 2G / (G + X) however well the gateway scales. The machine may be shared:
busy CPU that none of the benchmark's processes used is reported per run as "other work".

    .venv/bin/python benchmarks/replicas.py                # about 2 minutes
    .venv/bin/python benchmarks/replicas.py --quick        # smoke run, ~20 s
    .venv/bin/python benchmarks/replicas.py --out benchmarks/results/replicas-2026-12-01.md --json /tmp/replicas.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import load, stack  # noqa: E402
from benchmarks.gateway_overhead import _version  # noqa: E402
from tests.support.round_robin import STATS_PATH, Replica, replica, serve_argv  # noqa: E402

TOOL = "echo"
ARGUMENTS = {"text": "hello from the replica benchmark"}
CONCURRENCY = (8, 32)
CONFIGS = ("proxy → 1 gw", "proxy → 2 gw", "direct 1 gw", "split 2 gw", "proxy → upstream")
# The audience of every token: the balancer's name. It need not resolve: the gateway compares
# a token's `aud` with its configured URL, not with the address a request arrived on.
PUBLIC_URL = "http://portcullis-replicas.bench.svc:8080/mcp"


@dataclass
class Settings:
    seconds: float = 2.0  # wrk takes whole seconds
    reps: int = 5
    generator: str = "auto"  # auto | wrk | python
    pin: bool = True

    @classmethod
    def quick(cls) -> Settings:
        return cls(seconds=1.0, reps=1)


@dataclass
class Placement:
    gateways: list[list[int] | None]
    others: list[int] | None  # balancer, upstream, wrk

    def describe(self) -> str:
        if self.gateways[0] is None:
            return "not pinned"
        where = "; ".join(f"gateway {i + 1} on core {c[0]}" for i, c in enumerate(self.gateways) if c)
        rest = f"core(s) {','.join(map(str, self.others))}" if self.others else "no core of their own: unpinned, on both cores"
        return f"{where}; balancer, upstream and load generator on {rest}"


def placement(pin: bool) -> Placement:
    allowed = sorted(os.sched_getaffinity(0))
    if not pin or len(allowed) < 2:
        return Placement([None, None], None)
    return Placement([[allowed[0]], [allowed[1]]], allowed[2:] or None)


@dataclass
class Report:
    settings: dict[str, Any]
    machine: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)
    balance: dict[str, Any] = field(default_factory=dict)
    upstream_calls: dict[str, int] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    load_average: dict[str, str] = field(default_factory=dict)


def _source() -> str:
    """The commit checked out, read from .git without running git; uncommitted changes are not checked."""
    git = stack.REPO / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:7] + " (detached)"
        ref = head[5:]
        path = git / ref
        if path.exists():
            return f"{path.read_text().strip()[:7]} ({ref.rsplit('/', 1)[-1]}; uncommitted changes not checked)"
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return f"{line[:7]} ({ref.rsplit('/', 1)[-1]}; uncommitted changes not checked)"
    except OSError:
        pass
    return "unknown"


def machine(wrk: str | None) -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    versions = {name: _version(name) for name in ("portcullis", "mcp", "uvicorn", "aiohttp", "uvloop", "httptools")}
    return {
        "gateway_source": _source(), "nproc": os.cpu_count(), "allowed_cores": sorted(os.sched_getaffinity(0)), "cpu": cpu,
        "kernel": os.uname().release, "python": sys.version.split()[0], "versions": versions,
        "wrk": load.wrk_version(wrk) if wrk else "not installed",
    }


# --- processes ---------------------------------------------------------------------------------------


@dataclass
class Proxy:
    process: subprocess.Popen[bytes]
    url: str
    argv: list[str]

    @property
    def pid(self) -> int:
        return self.process.pid

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url.rsplit("/", 1)[0] + STATS_PATH, timeout=10) as answer:
            stats: dict[str, Any] = json.loads(answer.read())
            return stats


@contextmanager
def balancer(backends: Sequence[str], cores: Sequence[int] | None) -> Iterator[Proxy]:
    """tests/support/round_robin.py in its own process (uvloop), in front of `backends`."""
    argv = [*stack.pin_prefix(cores), sys.executable, "-m", "tests.support.round_robin", "--port", "0",
            *[arg for b in backends for arg in ("--backend", b)]]
    process = subprocess.Popen(argv, cwd=stack.REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        line = stack._read_line(process, stack.STARTUP_TIMEOUT)
        if "ready at " not in line:
            raise RuntimeError(f"the balancer did not start: {line!r}")
        yield Proxy(process, line.split("ready at ", 1)[1].strip() + "/mcp", argv)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


@contextmanager
def gateways(upstream_url: str, workdir: Path, where: Placement) -> Iterator[tuple[list[Replica], str]]:
    """Two `serve --url PUBLIC_URL` processes on one state directory; yields them and a token."""
    manifests = workdir / "manifests"
    manifests.mkdir(parents=True)
    (manifests / "bench.yaml").write_text(stack.manifests_text(upstream_url))
    secret = secrets.token_urlsafe(24)
    with ExitStack() as started:
        replicas = []
        for index, cores in enumerate(where.gateways):  # one after the other: the first creates the keys
            argv = [*stack.pin_prefix(cores), *serve_argv([str(manifests)], str(workdir / "state"), url=PUBLIC_URL)]
            replicas.append(started.enter_context(replica(f"gw{index + 1}", argv, env={"PORTCULLIS_ADMIN_SECRET": secret})))
        first = replicas[0]
        status, answer = stack._http("PUT", f"{first.admin}/v1/users/{stack.USER}/connections/{stack.CONNECTION}",
                                     {"secret": stack.UPSTREAM_SECRET}, secret)
        if status >= 300:
            raise RuntimeError(f"storing the credential failed: HTTP {status} {answer}")
        status, answer = stack._http("POST", f"{first.admin}/v1/tokens", {"user": stack.USER, "ttl": "1h"}, secret)
        if status != 201:
            raise RuntimeError(f"minting failed: HTTP {status} {answer}")
        yield replicas, str(answer["token"])


# --- measuring ------------------------------------------------------------------------------------------


def _machine_cpu() -> tuple[float, float]:
    """(busy, elapsed) CPU seconds of the whole machine, all cores, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields[:8]) - idle) / tick, sum(fields[:8]) / tick


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def generate(targets: Sequence[load.Target], connections: int, s: Settings, wrk: str | None, cores: Sequence[int] | None,
             commands: list[str] | None) -> list[load.LoadResult]:
    """One run: one generator per target, all at once, `connections` split evenly between them."""
    share = max(1, connections // len(targets))
    results: list[load.LoadResult | BaseException | None] = [None] * len(targets)

    def one(i: int) -> None:
        try:
            if wrk is not None:
                results[i] = load.wrk_load(targets[i], share, s.seconds, wrk=wrk, prefix=stack.pin_prefix(cores), commands=commands)
            else:
                results[i] = load.python_load(targets[i], share, seconds=s.seconds)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the caller's thread
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(targets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out: list[load.LoadResult] = []
    for result in results:
        if isinstance(result, BaseException):
            raise result
        assert result is not None
        out.append(result)
    return out


def measure(config: str, connections: int, targets: Sequence[load.Target], pids: dict[str, int], s: Settings,
            wrk: str | None, where: Placement, commands: list[str] | None) -> dict[str, Any]:
    before = {name: load.cpu_seconds(pid) for name, pid in pids.items()}
    children = _children_cpu()
    harness = time.process_time()
    machine_busy = _machine_cpu()[0]
    results = generate(targets, connections, s, wrk, where.others, commands)
    cpu = {name: load.cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    # wrk is this process's child; the python generator runs in this process (its CPU is not isolated).
    cpu["load generator"] = _children_cpu() - children if wrk is not None else float("nan")
    ours = sum(v for v in cpu.values() if v == v) + (time.process_time() - harness)
    # Whatever else the machine ran meanwhile (it is shared): busy CPU that none of our processes used.
    other = max(0.0, _machine_cpu()[0] - machine_busy - ours)
    calls = sum(r.calls for r in results)
    seconds = max(r.seconds for r in results)
    return {
        "config": config, "connections": connections, "calls": calls, "seconds": seconds,
        "rps": sum(r.rps for r in results), "failures": sum(r.failures for r in results),
        "failure_samples": [x for r in results for x in r.failure_samples][:3],
        "p50_ms": max(r.p50_ms for r in results), "p99_ms": max(r.p99_ms for r in results),
        "cpu_us_per_call": {name: (v / calls * 1e6 if calls else float("nan")) for name, v in cpu.items()},
        "cpu_share": {name: v / seconds for name, v in cpu.items()},  # cores busy, on average
        "other_cores": other / seconds,  # cores busy with work outside this benchmark
    }


def run(s: Settings, log: Callable[[str], None]) -> Report:
    wrk = load.wrk_path() if s.generator in ("auto", "wrk") else None
    if s.generator == "wrk" and wrk is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install -y wrk); use --generator python")
    if wrk is None:
        log("no wrk: the Python raw-socket generator runs in this process and caps the figures itself")
    where = placement(s.pin)
    report = Report(settings={**asdict(s), "generator_used": "wrk" if wrk else "python", "placement": where.describe()},
                    machine=machine(wrk))
    report.load_average["start"] = Path("/proc/loadavg").read_text().strip()
    with tempfile.TemporaryDirectory(prefix="portcullis-replicas-") as tmp, ExitStack() as processes:
        up, upstream_url = processes.enter_context(stack.upstream(where.others))
        report.commands.append(" ".join(up.argv))
        (gw1, gw2), token = processes.enter_context(gateways(upstream_url, Path(tmp), where))
        one = processes.enter_context(balancer([gw1.mcp], where.others))
        two = processes.enter_context(balancer([gw1.mcp, gw2.mcp], where.others))
        bare = processes.enter_context(balancer([upstream_url], where.others))
        report.commands += [" ".join(one.argv), " ".join(two.argv), " ".join(bare.argv)]

        def call(url: str) -> load.Target:
            return load.tool_call(url, TOOL, ARGUMENTS, token=token)

        plans: dict[str, tuple[list[load.Target], dict[str, int]]] = {
            "proxy → 1 gw": ([call(one.url)], {"gateway 1": gw1.pid, "gateway 2": gw2.pid, "balancer": one.pid, "upstream": up.pid}),
            "proxy → 2 gw": ([call(two.url)], {"gateway 1": gw1.pid, "gateway 2": gw2.pid, "balancer": two.pid, "upstream": up.pid}),
            "direct 1 gw": ([call(gw1.mcp)], {"gateway 1": gw1.pid, "gateway 2": gw2.pid, "upstream": up.pid}),
            "split 2 gw": ([call(gw1.mcp), call(gw2.mcp)], {"gateway 1": gw1.pid, "gateway 2": gw2.pid, "upstream": up.pid}),
            "proxy → upstream": ([call(bare.url)], {"balancer": bare.pid, "upstream": up.pid}),
        }
        # Warm every path (pools, the gateways' first discovery, the balancer's connections).
        for targets, _ in plans.values():
            generate(targets, 8, Settings(seconds=min(1.0, s.seconds), generator=s.generator), wrk, where.others, None)
        stats_before = _upstream_stats(upstream_url)
        balance_before = two.stats()
        log(f"{len(CONFIGS)} configurations x concurrency {CONCURRENCY} x {s.reps} rounds of {s.seconds:g} s; {where.describe()}")
        for rep in range(s.reps):
            for connections in CONCURRENCY:
                for config in CONFIGS:
                    targets, pids = plans[config]
                    row = measure(config, connections, targets, pids, s, wrk, where, report.commands if rep == 0 else None)
                    row["rep"] = rep
                    report.runs.append(row)
                    cpu = row["cpu_us_per_call"]
                    log(f"  round {rep + 1}/{s.reps} c={connections:<2} {config:<13} {row['rps']:8.0f} calls/s  "
                        f"p50 {row['p50_ms']:6.2f} ms  failures {row['failures']}  µs/call: "
                        + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items() if v == v and v > 0.5))
        stats_after = _upstream_stats(upstream_url)
        report.upstream_calls = {k: stats_after.get(k, 0) - stats_before.get(k, 0) for k in stats_after}
        balance_after = two.stats()
        report.balance = {
            b["name"] + " " + b["url"]: {k: b[k] - a[k] for k in ("dispatched", "answered", "failed")} | {"alive": b["alive"]}
            for a, b in zip(balance_before["backends"], balance_after["backends"], strict=True)
        }
    report.load_average["end"] = Path("/proc/loadavg").read_text().strip()
    return report


def _upstream_stats(url: str) -> dict[str, int]:
    with urllib.request.urlopen(url.rsplit("/", 1)[0] + "/stats", timeout=10) as response:
        stats: dict[str, int] = json.loads(response.read())
        return stats


# --- report -----------------------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    clean = [v for v in values if v == v]
    return statistics.median(clean) if clean else float("nan")


def summary(report: Report) -> dict[tuple[str, int], dict[str, Any]]:
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for config in CONFIGS:
        for c in CONCURRENCY:
            rows = [r for r in report.runs if r["config"] == config and r["connections"] == c]
            if not rows:
                continue
            names = rows[0]["cpu_us_per_call"].keys()
            out[(config, c)] = {
                "rps": _median([r["rps"] for r in rows]), "p50_ms": _median([r["p50_ms"] for r in rows]),
                "p99_ms": _median([r["p99_ms"] for r in rows]), "failures": sum(r["failures"] for r in rows),
                "rps_all": [round(r["rps"]) for r in rows],
                "cpu": {n: _median([r["cpu_us_per_call"][n] for r in rows]) for n in names},
                "share": {n: _median([r["cpu_share"][n] for r in rows]) for n in names},
                "other_cores": _median([r.get("other_cores", float("nan")) for r in rows]),
            }
    return out


def paired(report: Report, connections: int, top: str, bottom: str) -> list[float]:
    """Per round: calls/s of `top` over calls/s of `bottom` (measured back to back)."""
    ratios = []
    for rep in sorted({r["rep"] for r in report.runs}):
        rows = {r["config"]: r for r in report.runs if r["rep"] == rep and r["connections"] == connections}
        if top in rows and bottom in rows and rows[bottom]["rps"] > 0:
            ratios.append(rows[top]["rps"] / rows[bottom]["rps"])
    return ratios


def _ratios(values: Sequence[float]) -> str:
    return f"median {_median(values):.2f}x ({', '.join(f'{v:.2f}' for v in values)})" if values else "—"


def render(report: Report) -> str:
    s, m = report.settings, report.machine
    table = summary(report)
    out = ["## Portcullis replicas: calls/s through a no-stickiness balancer, 1 vs 2 gateway processes\n"]
    out.append(f"Gateway source: {m['gateway_source']}. Machine: {m['nproc']} CPUs ({m['cpu']}), allowed cores "
               f"{m['allowed_cores']}, Linux {m['kernel']}, Python {m['python']}. Placement: {s['placement']}.")
    out.append("Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + f"; load generator: {s['generator_used']}"
               + (f" ({m['wrk']})" if s["generator_used"] == "wrk" else "") + ".")
    out.append(f"Load average at start / end: {report.load_average.get('start')} / {report.load_average.get('end')} "
               "(the machine is shared; other work shows up in every configuration alike, since runs interleave).")
    out.append(f"Call: `tools/call` `{TOOL}`, 2026-07-28 wire, one token minted on gateway 1 for both; upstream: "
               f"benchmarks/fast_upstream.py; audit: the default SQLite store, one file shared by both gateways. "
               f"Medians over {s['reps']} interleaved rounds of {s['seconds']:g} s per configuration and concurrency.\n")

    out.append("### Throughput\n")
    out.append("| concurrency | configuration | calls/s (median) | each round | p50 ms | p99 ms | failures | other work on the machine (cores) |")
    out.append("|---:|---|---:|---|---:|---:|---:|---:|")
    for c in CONCURRENCY:
        for config in CONFIGS:
            row = table.get((config, c))
            if row:
                out.append(f"| {c} | {config} | {row['rps']:,.0f} | {', '.join(f'{v:,}' for v in row['rps_all'])} | "
                           f"{row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['failures']} | {row['other_cores']:.2f} |")

    out.append("\n### Ratios (2 gateways / 1 gateway; target ≥ 1.9x)\n")
    out.append("Ratio of the medians, and the median of the ratios paired within each round (adjacent runs, so drift on the "
               "machine cancels best there).\n")
    out.append("| concurrency | through the balancer | paired per round | client-side split (no proxy) | paired per round | "
               "balancer's cost (direct 1 gw / proxy → 1 gw) |")
    out.append("|---:|---:|---|---:|---|---:|")
    for c in CONCURRENCY:
        p1, p2, d1, s2 = (table.get((k, c), {}).get("rps", float("nan")) for k in CONFIGS[:4])
        through, without = paired(report, c, "proxy → 2 gw", "proxy → 1 gw"), paired(report, c, "split 2 gw", "direct 1 gw")
        out.append(f"| {c} | **{p2 / p1:.2f}x** | {_ratios(through)} | **{s2 / d1:.2f}x** | {_ratios(without)} | {d1 / p1:.2f}x |")

    out.append("\n### CPU per call, per process (µs, utime+stime; median over rounds)\n")
    names = ["gateway 1", "gateway 2", "balancer", "upstream", "load generator"]
    out.append("| concurrency | configuration | " + " | ".join(names) + " | total | cores busy (gw1 / gw2 / balancer) |")
    out.append("|---:|---|" + "---:|" * (len(names) + 1) + "---|")
    for c in CONCURRENCY:
        for config in CONFIGS:
            row = table.get((config, c))
            if not row:
                continue
            cpu, share = row["cpu"], row["share"]
            cells = []
            for n in names:
                v = cpu.get(n, float("nan"))
                cells.append("—" if v != v or (n.startswith("gateway") and v < 1) else f"{v:,.0f}")
            total = sum(v for v in cpu.values() if v == v)
            busy = " / ".join(f"{share.get(n, float('nan')):.2f}" if n in share else "—" for n in ("gateway 1", "gateway 2", "balancer"))
            out.append(f"| {c} | {config} | " + " | ".join(cells) + f" | {total:,.0f} | {busy} |")

    out.append("\n### What bounds the ratio here\n")
    cores = len(m["allowed_cores"])
    for c in CONCURRENCY:
        alone, one, two, split, bare = (table.get((k, c)) for k in ("direct 1 gw", "proxy → 1 gw", "proxy → 2 gw", "split 2 gw", "proxy → upstream"))
        if not (alone and one and two and split):
            continue
        g = alone["cpu"]["gateway 1"]
        g2 = statistics.mean([two["cpu"]["gateway 1"], two["cpu"]["gateway 2"]])
        x_proxy = sum(v for k, v in two["cpu"].items() if not k.startswith("gateway") and v == v)
        x_split = sum(v for k, v in split["cpu"].items() if not k.startswith("gateway") and v == v)
        # The machine is shared: what other work used during the runs is not ours to use.
        free, free_split = cores - two["other_cores"], cores - split["other_cores"]
        ceiling, ceiling_split = free * 1e6 / (g2 + x_proxy), free_split * 1e6 / (g2 + x_split)
        out.append(
            f"- c={c}: a gateway spends G1 = {g:,.0f} µs per call alone and G2 = {g2:,.0f} µs per call it served when two share the "
            f"load ({100 * (g2 / g - 1):+.0f}%); everything else X = {x_proxy:,.0f} µs per call through the balancer "
            f"({two['cpu'].get('balancer', float('nan')):,.0f} of it the balancer), {x_split:,.0f} µs without it. "
            f"{cores} cores carry at most {cores}e6 / (G2 + X) = {cores * 1e6 / (g2 + x_proxy):,.0f} calls/s through the "
            f"balancer and {cores * 1e6 / (g2 + x_split):,.0f} split; less the other work measured meanwhile "
            f"({two['other_cores']:.2f} and {split['other_cores']:.2f} cores), {ceiling:,.0f} and {ceiling_split:,.0f} "
            f"(measured {two['rps']:,.0f} and {split['rps']:,.0f}: {100 * two['rps'] / ceiling:.0f}% and "
            f"{100 * split['rps'] / ceiling_split:.0f}%). One replica with a whole core is capped at 1e6 / G1 = "
            f"{1e6 / g:,.0f} calls/s; were a call to cost a gateway G1 either way, {cores} idle cores would allow at most "
            f"{cores}·G1 / (G1 + X) = {cores * g / (g + x_proxy):.2f}x through this balancer and {cores * g / (g + x_split):.2f}x "
            f"split (a gateway's cost per call fell with a second replica here, which is how a measured ratio can pass that).")
        if bare:
            out.append(
                f"  The balancer alone (in front of the fast upstream): {bare['rps']:,.0f} calls/s at "
                f"{bare['cpu'].get('balancer', float('nan')):,.0f} µs per request, {bare['share'].get('balancer', float('nan')):.2f} "
                f"cores busy; it is one Python process on one event loop, so it cannot pass about "
                f"{1e6 / bare['cpu'].get('balancer', float('nan')):,.0f} requests/s whatever is behind it.")
    if report.balance:
        out.append("\nThe 2-gateway balancer's per-backend counts over the measured runs: "
                   + "; ".join(f"{k}: {v}" for k, v in report.balance.items()) + ".")
    if report.upstream_calls:
        out.append(f"Upstream arrivals over the measured runs (its own count): {report.upstream_calls}; "
                   f"answered calls counted by the generators: {sum(r['calls'] for r in report.runs):,}.")
    if report.commands:
        out.append("\nCommands (first round):\n\n```\n" + "\n".join(dict.fromkeys(report.commands)) + "\n```")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 1 s runs")
    parser.add_argument("--reps", type=int, help="interleaved rounds (medians are reported)")
    parser.add_argument("--seconds", type=float, help="duration of each run")
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the gateways to cores")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--json", type=Path, help="also write every raw figure as JSON here")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only render the report of a run saved with --json")
    args = parser.parse_args(argv)
    if args.render:
        saved = Report(**json.loads(args.render.read_text()))
        text = render(saved) + f"\n\n(total wall time {saved.settings.get('wall_seconds')} s)\n"
        print(text)
        if args.out:
            args.out.write_text(text)
        return 0
    s = Settings.quick() if args.quick else Settings()
    s.generator, s.pin = args.generator, not args.no_pin
    if args.reps is not None:
        s.reps = args.reps
    if args.seconds is not None:
        s.seconds = args.seconds

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    started = time.monotonic()
    report = run(s, log)
    report.settings["wall_seconds"] = round(time.monotonic() - started, 1)
    text = render(report) + f"\n\n(total wall time {report.settings['wall_seconds']} s)\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
