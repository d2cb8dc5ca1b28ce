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

Then, with processes of its own, the latency a session-era (2025-11-25) call adds when the
upstream asks a question mid-call and the agent's answer - a POST of its own - lands on the
replica that did not start the call, which passes it on over HTTP (gateway/relay.py `forward`).
The client is the MCP SDK `Client` in legacy mode, in this process, with an elicitation
callback that answers at once; it makes sequential calls of the conformance fixture's
(examples/fixture/server.py) `test_elicitation` ("asked") and, as the baseline, `test_simple_text`
("plain"), on two paths, interleaved round by round (plain same, plain other, asked same, asked
other, plain same, ...):

- `same`:  straight to gateway 1, so the answer lands where the call waits;
- `other`: through the round-robin balancer with both gateways. It sends each request to the
  next replica, so the answer, the request after the call's own, lands on the other replica.
  This balancer records every exchange (`--recording-balancer`, tests/support/round_robin.py
  with `record=True`): for every call the report counts whether its answer did land elsewhere.
  An untimed ping before every other asked call makes the calls start on each replica in turn.

The plain call's difference between the paths is the balancer's own cost per exchange; the
asked call crosses the balancer twice (its POST, whose SSE answer carries the question and then
the result, and the answer's POST), so the forward's added latency is
(asked other - asked same) - 2 x (plain other - plain same), on medians.

    .venv/bin/python benchmarks/replicas.py                # about 2 1/4 minutes (the forwarded answer: ~20 s of it)
    .venv/bin/python benchmarks/replicas.py --quick        # smoke run, ~25 s
    .venv/bin/python benchmarks/replicas.py --forward-only # only the forwarded answer, ~20 s
    .venv/bin/python benchmarks/replicas.py --out benchmarks/results/replicas-2026-12-01.md --json /tmp/replicas.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anyio  # noqa: E402
import httpx2  # noqa: E402
import mcp_types as types  # noqa: E402
from aiohttp import web  # noqa: E402
from mcp import Client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.shared.exceptions import MCPDeprecationWarning  # noqa: E402

from benchmarks import load, stack  # noqa: E402
from benchmarks.gateway_overhead import _version  # noqa: E402
from tests.support.round_robin import STATS_PATH, Replica, RoundRobinProxy, replica, serve_argv  # noqa: E402

TOOL = "echo"
ARGUMENTS = {"text": "hello from the replica benchmark"}
CONCURRENCY = (8, 32)
CONFIGS = ("proxy → 1 gw", "proxy → 2 gw", "direct 1 gw", "split 2 gw", "proxy → upstream")
# The audience of every token: the balancer's name. It need not resolve: the gateway compares
# a token's `aud` with its configured URL, not with the address a request arrived on.
PUBLIC_URL = "http://portcullis-replicas.bench.svc:8080/mcp"

# The forwarded answer: two tools of the conformance fixture, a path each way.
PLAIN, ASKED = "plain", "asked"
FORWARD_TOOLS: dict[str, tuple[str, dict[str, Any], str]] = {  # kind: (tool, arguments, text every answer must contain)
    PLAIN: ("test_simple_text", {}, "This is a simple text response for testing."),
    ASKED: ("test_elicitation", {"message": "Which replica?"}, '"response":"answered at once"'),
}
SAME, OTHER = "same", "other"
FORWARD_PATHS = {SAME: "direct to gateway 1", OTHER: "balancer → 2 gw"}
FORWARD_WARMUP = 5  # calls of each kind on each path before the first round, not measured
BALANCER_CROSSINGS = 2  # exchanges of an asked call through the balancer: its POST, the answer's POST
EXCHANGES_PATH = "/_round_robin/exchanges"
FIXTURE = stack.REPO / "examples" / "fixture" / "server.py"
FIXTURE_MANIFESTS = """\
apiVersion: portcullis.dev/v1alpha1
kind: MCPConnection
metadata: {{name: fixture, namespace: bench}}
spec:
  url: {fixture_url}
  timeoutSeconds: 10
  credential: {{source: none}}
---
apiVersion: portcullis.dev/v1alpha1
kind: ToolMapping
metadata: {{name: bench-fixture, namespace: bench}}
spec:
  serverRef: {{name: bench}}
  connectionRef: {{name: fixture}}
  tools:
    - name: test_simple_text
    - name: test_elicitation
"""


@dataclass
class Settings:
    seconds: float = 2.0  # wrk takes whole seconds
    reps: int = 5
    generator: str = "auto"  # auto | wrk | python
    pin: bool = True
    # The forwarded answer: many short rounds, so that drift on the machine lands on both paths alike.
    forward_rounds: int = 15
    forward_calls: int = 20  # sequential calls of each kind on each path per round
    throughput: bool = True  # False: only the forwarded-answer measurement

    @classmethod
    def quick(cls) -> Settings:
        return cls(seconds=1.0, reps=1, forward_rounds=2, forward_calls=10)


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
    forward: dict[str, Any] = field(default_factory=dict)  # the forwarded-answer measurement (`forward`)


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

    def exchanges(self, since: int = 0) -> list[dict[str, Any]]:
        """The exchanges recorded after id `since` (a balancer started with `recording=True` only)."""
        with urllib.request.urlopen(f"{self.url.rsplit('/', 1)[0]}{EXCHANGES_PATH}?since={since}", timeout=10) as answer:
            recorded: list[dict[str, Any]] = json.loads(answer.read())
            return recorded


@contextmanager
def balancer(backends: Sequence[str], cores: Sequence[int] | None, *, recording: bool = False) -> Iterator[Proxy]:
    """tests/support/round_robin.py in its own process (uvloop), in front of `backends`;
    `recording`: every exchange kept and readable (`serve_recording_balancer`)."""
    if recording:
        argv = [*stack.pin_prefix(cores), sys.executable, str(Path(__file__).resolve()),
                *[arg for b in backends for arg in ("--recording-balancer", b)]]
    else:
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


def serve_recording_balancer(backends: Sequence[str]) -> int:
    """The round-robin balancer (uvloop, one process) with every exchange recorded: `GET
    /_round_robin/exchanges?since=ID` answers them as JSON, so the forwarded-answer measurement can
    check where each call and each answer went. The stock process (`python -m
    tests.support.round_robin`) records nothing, to cost the throughput runs nothing."""
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    proxy = RoundRobinProxy(backends, record=True)
    application = proxy.app()

    # A middleware, not a route: the proxy's catch-all route would shadow one added after it.
    @web.middleware
    async def recorded(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if request.path != EXCHANGES_PATH:
            return await handler(request)
        since = int(request.query.get("since", "0"))
        return web.json_response([asdict(e) for e in proxy.recorded() if e.id > since])

    application.middlewares.append(recorded)

    async def serve() -> None:
        runner = web.AppRunner(application, access_log=None, handle_signals=False, shutdown_timeout=1.0, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(f"round-robin proxy ready at http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
        done = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, done.set)
        try:
            await done.wait()
        finally:
            await runner.cleanup()

    asyncio.run(serve())
    return 0


@contextmanager
def fixture_upstream(cores: Sequence[int] | None) -> Iterator[tuple[stack.Process, str]]:
    """The conformance fixture (examples/fixture/server.py, uvicorn) in its own process; yields (process, URL)."""
    argv = [*stack.pin_prefix(cores), sys.executable, str(FIXTURE), "--port", "0"]
    popen = subprocess.Popen(argv, cwd=stack.REPO, stdout=subprocess.PIPE)
    process = stack.Process(popen, argv)
    try:
        line = stack._read_line(popen, stack.STARTUP_TIMEOUT)
        if "ready at " not in line:
            raise RuntimeError(f"the fixture did not start: {line!r}")
        yield process, line.split("ready at ", 1)[1].split()[0]
    finally:
        process.stop()
        if popen.stdout is not None:
            popen.stdout.close()


@contextmanager
def gateways(upstream_url: str, workdir: Path, where: Placement, *, extra_manifests: str = "") -> Iterator[tuple[list[Replica], str]]:
    """Two `serve --url PUBLIC_URL` processes on one state directory; yields them and a token."""
    manifests = workdir / "manifests"
    manifests.mkdir(parents=True)
    (manifests / "bench.yaml").write_text(stack.manifests_text(upstream_url, extra=extra_manifests))
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
    if s.throughput:
        throughput(report, s, wrk, where, log)
        report.load_average["end"] = Path("/proc/loadavg").read_text().strip()
    # After the throughput runs, whose processes are gone by now: nothing else of ours competes.
    report.forward = forward(s, where, log)
    return report


def throughput(report: Report, s: Settings, wrk: str | None, where: Placement, log: Callable[[str], None]) -> None:
    """The five configurations' interleaved load runs, into `report`."""
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


# --- the forwarded answer ---------------------------------------------------------------------------


def forward(s: Settings, where: Placement, log: Callable[[str], None]) -> dict[str, Any]:
    """The added latency of an answer that lands on the other replica (module docstring), with
    processes of its own: two fresh gateways on one state directory, the fast upstream (their
    manifests name it; nothing calls it) and the fixture, and the recording balancer."""
    out: dict[str, Any] = {"calls": s.forward_calls, "rounds": s.forward_rounds, "warmup": FORWARD_WARMUP, "rows": [],
                           "load_average": {"start": Path("/proc/loadavg").read_text().strip()}}
    with tempfile.TemporaryDirectory(prefix="portcullis-forward-") as tmp, ExitStack() as processes:
        _, upstream_url = processes.enter_context(stack.upstream(where.others))
        fixture, fixture_url = processes.enter_context(fixture_upstream(where.others))
        (gw1, gw2), token = processes.enter_context(
            gateways(upstream_url, Path(tmp), where, extra_manifests=FIXTURE_MANIFESTS.format(fixture_url=fixture_url)))
        two = processes.enter_context(balancer([gw1.mcp, gw2.mcp], where.others, recording=True))
        out["commands"] = [" ".join(fixture.argv), " ".join(two.argv)]
        pids = {"gateway 1": gw1.pid, "gateway 2": gw2.pid, "balancer": two.pid, "fixture": fixture.pid}
        log(f"forwarded answers: {s.forward_rounds} rounds x {s.forward_calls} sequential calls of {', '.join(FORWARD_TOOLS)} "
            f"on {', '.join(FORWARD_PATHS)}; {where.describe()}")
        anyio.run(_forward_rounds, {SAME: gw1.mcp, OTHER: two.url}, token, pids, two, s, out, log)
        out["balance"] = {b["name"] + " " + b["url"]: {k: b[k] for k in ("dispatched", "answered", "failed", "alive")}
                          for b in two.stats()["backends"]}
    out["load_average"]["end"] = Path("/proc/loadavg").read_text().strip()
    return out


@asynccontextmanager
async def legacy_client(url: str, token: str) -> AsyncIterator[Client]:
    """The SDK `Client` on the session protocol, bearing `token`, answering every elicitation at once."""

    async def answer(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        return types.ElicitResult(action="accept", content={"response": "answered at once"})

    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        async with Client(streamable_http_client(url, http_client=http), mode="legacy", elicitation_callback=answer,
                          read_timeout_seconds=10) as connected:
            yield connected


async def _forward_rounds(urls: dict[str, str], token: str, pids: dict[str, int], proxy: Proxy, s: Settings,
                          out: dict[str, Any], log: Callable[[str], None]) -> None:
    # Bounded: a call takes some tens of ms here; a second each is far more than any should need.
    with anyio.fail_after(60 + 4 * (s.forward_rounds * s.forward_calls + FORWARD_WARMUP)):
        # One session per path for the whole run, as an agent keeps one; opened and warmed before the rounds.
        async with legacy_client(urls[SAME], token) as same, legacy_client(urls[OTHER], token) as other:
            clients = {SAME: same, OTHER: other}
            for path in FORWARD_PATHS:
                for kind in FORWARD_TOOLS:
                    warm = await calls(clients[path], kind, FORWARD_WARMUP, pids)
                    if warm["failures"]:
                        raise RuntimeError(f"warm-up {kind} on {path} failed: {warm['failure_samples']}")
            seen = max((e["id"] for e in await anyio.to_thread.run_sync(proxy.exchanges, 0)), default=0)
            for rep in range(s.forward_rounds):
                for kind in FORWARD_TOOLS:
                    for path in FORWARD_PATHS:
                        row = await calls(clients[path], kind, s.forward_calls, pids)
                        row |= {"rep": rep, "kind": kind, "path": path}
                        if path == OTHER:
                            exchanges = await anyio.to_thread.run_sync(proxy.exchanges, seen)
                            seen = max((e["id"] for e in exchanges), default=seen)
                            row["routing"] = routing(exchanges)
                        out["rows"].append(row)
                        lat = row["latencies_ms"]
                        landed = row.get("routing", {})
                        log(f"  round {rep + 1}/{s.forward_rounds} {kind:<5} {path:<5} median {_median(lat):6.2f} ms  "
                            f"p90 {load.percentile(lat, 90):6.2f} ms  failures {row['failures']}"
                            + (f"  answers elsewhere {landed['elsewhere']}/{landed['calls']}" if kind == ASKED and landed else ""))


async def calls(client: Client, kind: str, n: int, pids: dict[str, int]) -> dict[str, Any]:
    """`n` sequential calls of `kind`, each timed and its answer checked, and the CPU they cost each process."""
    tool, arguments, expected = FORWARD_TOOLS[kind]
    before = {name: load.cpu_seconds(pid) for name, pid in pids.items()}
    mine = time.process_time()
    machine_busy, wall = _machine_cpu()[0], time.monotonic()
    latencies: list[float] = []
    failures: list[str] = []
    for i in range(n):
        if kind == ASKED and i % 2:
            # An asked call crosses a 2-backend round robin twice, so without this every one would start on
            # the same replica; one untimed ping before every other call makes them start on each in turn.
            with warnings.catch_warnings():  # "ping is removed as of 2026-07-28": this session is 2025-11-25
                warnings.simplefilter("ignore", MCPDeprecationWarning)
                await client.send_ping()
        started = time.perf_counter()
        try:
            result = await client.call_tool(tool, arguments)
        except Exception as exc:  # noqa: BLE001 - a failed call is counted and shown, not fatal
            failures.append(f"{type(exc).__name__}: {exc}"[:200])
            continue
        elapsed = (time.perf_counter() - started) * 1e3
        said = " ".join(getattr(c, "text", "") for c in result.content)
        if result.is_error or expected not in said:
            failures.append(said[:200])
            continue
        latencies.append(elapsed)
    cpu = {name: load.cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    cpu["client"] = time.process_time() - mine  # this process: the SDK client (and the harness, which idles meanwhile)
    # As in `measure`: busy CPU that none of our processes used (the machine is shared).
    other = max(0.0, _machine_cpu()[0] - machine_busy - sum(cpu.values())) / (time.monotonic() - wall)
    return {"latencies_ms": latencies, "failures": len(failures), "failure_samples": failures[:3], "cpu_seconds": cpu,
            "other_cores": other}


def routing(exchanges: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Where the balancer sent one block's calls and answers. An answer is the first POST after a
    `tools/call` that carries no JSON-RPC method (a response, the agent's answer to the question)."""
    elsewhere = same = unseen = 0
    started: dict[str, int] = {}
    waiting: dict[str, Any] | None = None
    for e in sorted(exchanges, key=lambda e: int(e["id"])):
        if e["rpc_method"] == "tools/call":
            unseen += waiting is not None
            waiting = e
            started[e["backend"]] = started.get(e["backend"], 0) + 1
        elif waiting is not None and e["http_method"] == "POST" and e["rpc_method"] is None:
            elsewhere += e["backend"] != waiting["backend"]
            same += e["backend"] == waiting["backend"]
            waiting = None
    return {
        "calls": sum(started.values()), "elsewhere": elsewhere, "same": same, "no_answer": unseen + (waiting is not None),
        "started_on": started,
        # Neither the session's standing GET stream nor the pings (`calls`) are crossings of a call.
        "crossings": sum(1 for e in exchanges if e["http_method"] != "GET" and e["rpc_method"] != "ping"),
        "failed": sum(1 for e in exchanges if e["outcome"] in ("refused", "broken")),
    }


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


def _machine_lines(report: Report) -> list[str]:
    s, m = report.settings, report.machine
    return [
        f"Gateway source: {m['gateway_source']}. Machine: {m['nproc']} CPUs ({m['cpu']}), allowed cores "
        f"{m['allowed_cores']}, Linux {m['kernel']}, Python {m['python']}. Placement: {s['placement']}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + f"; load generator: {s['generator_used']}"
        + (f" ({m['wrk']})" if s["generator_used"] == "wrk" else "") + ".",
    ]


def render(report: Report) -> str:
    s, m = report.settings, report.machine
    if not report.runs:  # --forward-only
        return "\n".join(["## Portcullis replicas: an answer forwarded to the replica holding the call\n",
                          *_machine_lines(report), "", *render_forward(report)])
    table = summary(report)
    out = ["## Portcullis replicas: calls/s through a no-stickiness balancer, 1 vs 2 gateway processes\n"]
    out += _machine_lines(report)
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
    if report.forward:
        out += ["", *render_forward(report)]
    if report.commands:
        out.append("\nCommands (first round):\n\n```\n" + "\n".join(dict.fromkeys(report.commands)) + "\n```")
    return "\n".join(out)


def forward_summary(forward: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (kind, path): every latency pooled over the rounds, each round's median, CPU medians."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for kind in FORWARD_TOOLS:
        for path in FORWARD_PATHS:
            rows = [r for r in forward.get("rows", []) if r["kind"] == kind and r["path"] == path]
            if not rows:
                continue
            pooled = [v for r in rows for v in r["latencies_ms"]]
            names = rows[0]["cpu_seconds"].keys()
            made = forward["calls"] * len(rows)  # failed calls cost CPU too
            out[(kind, path)] = {
                "calls": len(pooled), "median": _median(pooled), "p90": load.percentile(pooled, 90),
                "rounds": {r["rep"]: _median(r["latencies_ms"]) for r in rows},
                "failures": sum(r["failures"] for r in rows), "samples": [x for r in rows for x in r["failure_samples"]][:3],
                # Pooled over the rounds, not a median of rounds: /proc counts in 10 ms ticks, too coarse for one block.
                "cpu": {n: sum(r["cpu_seconds"][n] for r in rows) / made * 1e6 for n in names},
                "other_cores": _median([r.get("other_cores", float("nan")) for r in rows]),
            }
    return out


def render_forward(report: Report) -> list[str]:
    f = report.forward
    table = forward_summary(f)
    k = BALANCER_CROSSINGS
    out = ["### An answer that lands on the other replica: added latency of the forward (2025-11-25, elicitation)\n"]
    out.append(
        f"Client: the MCP SDK `Client` (mcp {report.machine['versions'].get('mcp')}) in legacy mode (2025-11-25), in the "
        "benchmark's own process, one session per path, with an elicitation callback that answers at once. Calls: "
        f"`{FORWARD_TOOLS[ASKED][0]}` (asked: the upstream asks mid-call, the agent answers with a POST of its own) and "
        f"`{FORWARD_TOOLS[PLAIN][0]}` (plain: the baseline), of the conformance fixture (examples/fixture/server.py, its own "
        f"process). Paths: `{SAME}` = {FORWARD_PATHS[SAME]} (the answer lands where the call waits); `{OTHER}` = "
        f"{FORWARD_PATHS[OTHER]} (the round-robin balancer, recording every exchange; the answer lands on the other replica, "
        f"which forwards it). {f['calls']} sequential calls of each kind on each path per round, {f['rounds']} rounds "
        f"interleaved (plain same, plain other, asked same, asked other, ...), after {f['warmup']} warm-up calls of each; "
        "an untimed ping before every other asked call on both paths (so that asked calls start on each replica in turn); "
        "fresh gateways (pinned as above), the throughput runs' processes stopped. Load average at start / end: "
        f"{f.get('load_average', {}).get('start')} / {f.get('load_average', {}).get('end')}.\n")

    out.append("| call | path | calls | median ms | p90 ms | median of each round (ms) | failures | other work on the machine (cores, median) |")
    out.append("|---|---|---:|---:|---:|---|---:|---:|")
    for (kind, path), row in table.items():
        out.append(f"| {kind} `{FORWARD_TOOLS[kind][0]}` | {path} ({FORWARD_PATHS[path]}) | {row['calls']:,} | {row['median']:.2f} | "
                   f"{row['p90']:.2f} | {', '.join(f'{v:.2f}' for v in row['rounds'].values())} | {row['failures']} | "
                   f"{row['other_cores']:.2f} |")
    samples = [x for row in table.values() for x in row["samples"]]
    if samples:
        out.append(f"\nFailure samples: {samples[:3]}")

    routed = [r["routing"] for r in f.get("rows", []) if r["path"] == OTHER and "routing" in r]
    asked = [r["routing"] for r in f.get("rows", []) if r["path"] == OTHER and r["kind"] == ASKED and "routing" in r]
    plain = [r["routing"] for r in f.get("rows", []) if r["path"] == OTHER and r["kind"] == PLAIN and "routing" in r]

    def started_on(blocks: list[dict[str, Any]]) -> str:
        counts: dict[str, int] = {}
        for block in blocks:
            for name, n in block["started_on"].items():
                counts[name] = counts.get(name, 0) + n
        return ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))

    def per_call(blocks: list[dict[str, Any]]) -> float:
        calls = sum(b["calls"] for b in blocks)
        return sum(b["crossings"] for b in blocks) / calls if calls else float("nan")

    if asked:
        total = sum(b["calls"] for b in asked)
        out.append(
            f"\nWhere the balancer sent them (its recorded exchanges, `{OTHER}` path): of {total:,} asked calls, the answer "
            f"landed on the other replica for **{sum(b['elsewhere'] for b in asked):,}**, on the replica holding the call for "
            f"{sum(b['same'] for b in asked):,}, and no answer POST was seen for {sum(b['no_answer'] for b in asked):,}. "
            f"Calls started per replica: asked {started_on(asked)}; plain {started_on(plain)}. Exchanges through the "
            f"balancer per call (a session's standing GET stream not counted): asked {per_call(asked):.2f}, plain "
            f"{per_call(plain):.2f}. Exchanges that failed at the balancer: {sum(b['failed'] for b in routed)}.")

    cells = {key: table.get(key) for key in ((ASKED, SAME), (ASKED, OTHER), (PLAIN, SAME), (PLAIN, OTHER))}
    a_same, a_other, p_same, p_other = cells.values()
    if a_same and a_other and p_same and p_other:
        balancer = p_other["median"] - p_same["median"]
        raw = a_other["median"] - a_same["median"]
        paired = []
        for rep in sorted(a_same["rounds"]):
            if all(rep in c["rounds"] for c in (a_other, p_same, p_other)):
                paired.append((a_other["rounds"][rep] - a_same["rounds"][rep]) - k * (p_other["rounds"][rep] - p_same["rounds"][rep]))
        balancer90, raw90 = p_other["p90"] - p_same["p90"], a_other["p90"] - a_same["p90"]
        out.append("\nThe arithmetic (medians over every call of the rounds, ms):\n")
        out.append(f"- the balancer's own cost per exchange, from the plain call (one exchange): b = plain other − plain same = "
                   f"{p_other['median']:.2f} − {p_same['median']:.2f} = **{balancer:.2f}**;")
        out.append(f"- an asked call crosses the balancer k = {k} times (its POST, whose SSE answer carries the question and then "
                   f"the result; and the answer's POST; measured above: {per_call(asked):.2f} exchanges per asked call, "
                   f"{per_call(plain):.2f} per plain one): D = asked other − asked same = {a_other['median']:.2f} − "
                   f"{a_same['median']:.2f} = {raw:.2f};")
        out.append(f"- added by the forward (the answer's extra hop to the replica holding the call): D − k·b = {raw:.2f} − "
                   f"{k}·{balancer:.2f} = **{raw - k * balancer:.2f} ms**; the same arithmetic on each round's block medians "
                   f"(adjacent blocks): {_ratios_ms(paired)};")
        out.append(f"- the tail, roughly (percentiles do not subtract exactly): at p90 D − k·b = {raw90:.2f} − {k}·{balancer90:.2f} "
                   f"= {raw90 - k * balancer90:.2f} ms.")

        out.append("\nCPU per call, per process (µs, utime+stime; /proc counts 10 ms ticks, so each figure is the total over "
                   "every round divided by the calls made; client = the benchmark's own process, the SDK client; asked calls "
                   "include the untimed pings):\n")
        names = ["gateway 1", "gateway 2", "balancer", "fixture", "client"]
        out.append("| call | path | " + " | ".join(names) + " | total |")
        out.append("|---|---|" + "---:|" * (len(names) + 1))
        for (kind, path), row in table.items():
            cpu = row["cpu"]
            out.append(f"| {kind} | {path} | " + " | ".join(f"{cpu.get(n, float('nan')):,.0f}" for n in names)
                       + f" | {sum(v for v in cpu.values() if v == v):,.0f} |")

        def gateways_cpu(row: dict[str, Any]) -> float:
            return float(row["cpu"]["gateway 1"] + row["cpu"]["gateway 2"])

        extra = (gateways_cpu(a_other) - gateways_cpu(a_same)) - (gateways_cpu(p_other) - gateways_cpu(p_same))
        out.append(f"\nGateway CPU the forward adds per asked call (both gateways; asked other − asked same, less the same "
                   f"difference for plain): {extra:,.0f} µs.")
    if f.get("balance"):
        out.append("The recording balancer's per-backend counts (warm-up included): "
                   + "; ".join(f"{name}: {v}" for name, v in f["balance"].items()) + ".")
    if f.get("commands"):
        out.append("\nCommands:\n\n```\n" + "\n".join(f["commands"]) + "\n```")
    return out


def _ratios_ms(values: Sequence[float]) -> str:
    return f"median {_median(values):.2f} ms ({', '.join(f'{v:.2f}' for v in values)})" if values else "—"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 1 s runs, 10 calls of each forwarded-answer block")
    parser.add_argument("--reps", type=int, help="interleaved rounds (medians are reported)")
    parser.add_argument("--seconds", type=float, help="duration of each run")
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the gateways to cores")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--json", type=Path, help="also write every raw figure as JSON here")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only render the report of a run saved with --json")
    parser.add_argument("--forward-rounds", type=int, help="forwarded answers: interleaved rounds")
    parser.add_argument("--forward-calls", type=int, help="forwarded answers: sequential calls of each kind on each path per round")
    parser.add_argument("--forward-only", action="store_true", help="only the forwarded-answer measurement")
    parser.add_argument("--recording-balancer", action="append", metavar="BACKEND",
                        help="(used by the benchmark itself) serve the recording balancer in front of BACKEND (repeat)")
    args = parser.parse_args(argv)
    if args.recording_balancer:
        return serve_recording_balancer(args.recording_balancer)
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
    if args.forward_rounds is not None:
        s.forward_rounds = args.forward_rounds
    if args.forward_calls is not None:
        s.forward_calls = args.forward_calls
    s.throughput = not args.forward_only

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
