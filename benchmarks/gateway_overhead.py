"""What the gateway adds to a `tools/call`: latency, throughput, and memory per idle session.

The same small call (`echo`, 2026-07-28 wire) is made directly to an upstream and
through one `portcullis serve` process in front of that upstream. To measure the
gateway and not its surroundings:

- the upstream is `fast_upstream.py` (a bare asyncio HTTP server, tens of
  thousands of calls/s) in its own process: an SDK-built upstream caps near
  400-500 calls/s on a 2-core machine and would hide the gateway;
- the load generator is `wrk` (falls back to a raw-socket Python generator, and
  says so); the sequential client is a raw keep-alive socket whose own cost
  cancels in the difference. The MCP SDK `Client` is measured too, because it is
  what agents feel, but its own cost (several ms) dominates its figures;
- processes are pinned (taskset): the gateway alone on the first allowed core,
  the upstream and the load generator on the others. On a 2-core machine the
  upstream and the generator share the second core; the direct baseline runs in
  that same placement.

Every figure is a median over `--reps` repetitions (each repetition's p50/p99 are
computed over all its calls). Every answer is checked (HTTP 200, a JSON-RPC
result that is not a tool error); failures are counted and shown.

    .venv/bin/python benchmarks/gateway_overhead.py            # full run, about 2-3 minutes
    .venv/bin/python benchmarks/gateway_overhead.py --quick    # smoke run, a few seconds
    .venv/bin/python benchmarks/gateway_overhead.py --json out.json --generator python --calls 200
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import load, stack  # noqa: E402

TOOL = "echo"
ARGUMENTS = {"text": "hello from the benchmark"}
CONCURRENCY = (1, 8, 64, 256)
SDK_MODES = ("2026-07-28", "legacy", "legacy-per-call")
"""The MCP SDK `Client` modes measured: the 2026-07-28 wire; the session protocol (2025-11-25) that
mcp 1.x clients (LangChain's adapters, the OpenAI Agents SDK) speak, on one session; and that protocol
with a new session for every call, as LangChain's MCP adapters do by default (initialize,
notifications/initialized, the GET stream, the call, DELETE: the whole exchange is one "call")."""
CREDENTIAL_CONCURRENCY = (8, 64)
SEQUENTIAL_WARMUP = 50
SDK_WARMUP = 20


@dataclass
class Settings:
    seconds: float = 5.0  # per wrk/python run
    reps: int = 3
    sequential_calls: int = 2000  # pairs per repetition
    sdk_calls: int = 300  # pairs per repetition
    sdk_upstream: bool = True  # also measure against an MCP SDK `MCPServer` upstream
    credentials: bool = True  # also compare `source: user` with `source: none`
    sequential_seconds: float = 8.0  # cap per repetition, for a slow gateway
    sessions: int = 1000
    generator: str = "auto"  # auto | wrk | python
    calls: int | None = None  # fixed call count per load run instead of seconds (python generator)
    pin: bool = True
    sdk: bool = True
    memory: bool = True
    wait_for_close: bool = True

    @classmethod
    def quick(cls) -> Settings:
        return cls(seconds=1.0, reps=1, sequential_calls=300, sdk_calls=50, sequential_seconds=2.0, sessions=200,
                   wait_for_close=False)


@dataclass
class Placement:
    gateway: list[int] | None
    upstream: list[int] | None
    client: list[int] | None

    def describe(self) -> str:
        if self.gateway is None:
            return "not pinned"
        return (f"gateway on core {_cores(self.gateway)}; upstream on core {_cores(self.upstream)}; "
                f"load generator and this harness (sequential and SDK clients) on core {_cores(self.client)}")


def _cores(cores: Sequence[int] | None) -> str:
    return ",".join(map(str, cores or []))


def placement(pin: bool) -> Placement:
    allowed = sorted(os.sched_getaffinity(0))
    if not pin or len(allowed) < 2:
        return Placement(None, None, None)
    rest = allowed[1:]
    return Placement([allowed[0]], [rest[0]], rest[1:] or [rest[0]])


@dataclass
class Report:
    settings: dict[str, Any]
    machine: dict[str, Any]
    commands: list[str] = field(default_factory=list)
    load: list[dict[str, Any]] = field(default_factory=list)
    sequential: list[dict[str, float]] = field(default_factory=list)
    sequential_failures: int = 0
    sdk: list[dict[str, Any]] = field(default_factory=list)
    """One entry per (repetition, SDK mode, upstream): the pair summary, plus `mode`, `upstream` and the
    gateway's CPU per call over that repetition."""
    sdk_failures: int = 0
    credentials: list[dict[str, Any]] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)
    upstream_calls: dict[str, int] = field(default_factory=dict)
    gateway_cpu_us_per_call: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --- machine -----------------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine(wrk: str | None) -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {name: _version(name) for name in
                ("portcullis", "mcp", "uvicorn", "starlette", "aiohttp", "httptools", "uvloop", "pydantic", "pyjwt", "cryptography")}
    return {
        "gateway_source": _git_state(),
        "nproc": os.cpu_count(),
        "allowed_cores": sorted(os.sched_getaffinity(0)),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "wrk": load.wrk_version(wrk) if wrk else "not installed",
    }


def _git_state() -> str:
    """Which gateway was measured: the commit, and whether operator/ had uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", str(stack.REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(stack.REPO), "status", "--porcelain", "--", "operator"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{' + uncommitted changes in operator/' if dirty else ''}" if head else "unknown"


def _loaded_libraries(pid: int) -> dict[str, bool]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {"uvloop": "uvloop/loop." in maps, "httptools": "httptools/parser/" in maps}


def _upstream_stats(url: str) -> dict[str, int]:
    base = url.rsplit("/", 1)[0]
    with urllib.request.urlopen(base + "/stats", timeout=10) as response:
        stats: dict[str, int] = json.loads(response.read())
        return stats


# --- measurements --------------------------------------------------------------------------------


def run_load(target: load.Target, connections: int, s: Settings, wrk: str | None, client: list[int] | None,
             commands: list[str]) -> load.LoadResult:
    if wrk is not None:
        return load.wrk_load(target, connections, s.seconds, wrk=wrk, prefix=stack.pin_prefix(client), commands=commands)
    if s.calls is not None:
        return load.python_load(target, connections, calls=s.calls)
    return load.python_load(target, connections, seconds=s.seconds)


def measure_load(direct: load.Target, through: load.Target, gw: stack.Gateway, s: Settings, wrk: str | None,
                 where: Placement, report: Report, log: Callable[[str], None]) -> None:
    # Warm both paths (connection pools, lazy imports, the gateway's first discovery) before timing.
    warm = Settings(seconds=1.0, calls=min(s.calls or 200, 200), generator=s.generator)
    for target in (direct, through):
        run_load(target, 8, warm, wrk, where.client, [])
    for rep in range(s.reps):
        for connections in CONCURRENCY:
            for side, target in (("direct", direct), ("gateway", through)):
                cpu_before = load.cpu_seconds(gw.pid)
                result = run_load(target, connections, s, wrk, where.client, report.commands if rep == 0 else [])
                cpu = load.cpu_seconds(gw.pid) - cpu_before
                row = {"rep": rep, "side": side, **asdict(result), "rps": result.rps}
                if side == "gateway" and result.calls:
                    row["gateway_cpu_us_per_call"] = cpu / result.calls * 1e6
                    if connections == max(CONCURRENCY):
                        report.gateway_cpu_us_per_call.append(row["gateway_cpu_us_per_call"])
                report.load.append(row)
                log(f"  rep {rep + 1}/{s.reps} c={connections:<3} {side:<7} {result.rps:9.0f} calls/s  "
                    f"p50 {result.p50_ms:7.3f} ms  p99 {result.p99_ms:7.3f} ms  failures {result.failures}"
                    + (f"  e.g. {result.failure_samples[0]}" if result.failure_samples else ""))


def measure_sequential(direct: load.Target, through: load.Target, gw: stack.Gateway, s: Settings, report: Report,
                       log: Callable[[str], None]) -> None:
    for rep in range(s.reps):
        cpu_before = load.cpu_seconds(gw.pid)
        paired = load.sequential_pairs(direct, through, s.sequential_calls, max_seconds=s.sequential_seconds,
                                       warmup=SEQUENTIAL_WARMUP)
        summary = paired.summary()
        gateway_calls = len(paired.gateway_ms) + SEQUENTIAL_WARMUP
        summary["gateway_cpu_us_per_call"] = (load.cpu_seconds(gw.pid) - cpu_before) / gateway_calls * 1e6
        report.sequential.append(summary)
        report.sequential_failures += paired.failures
        summary["pairs"] = len(paired.direct_ms)
        log(f"  rep {rep + 1}/{s.reps} {len(paired.direct_ms)} pairs: direct p50 {summary['direct_p50_ms']:.3f} ms, gateway p50 {summary['gateway_p50_ms']:.3f} ms, "
            f"added p50 {summary['added_p50_ms']:.3f} ms, p99 {summary['added_p99_ms']:.3f} ms, "
            f"paired median {summary['paired_median_ms']:.3f} ms, gateway CPU {summary['gateway_cpu_us_per_call']:.0f} µs/call, "
            f"failures {paired.failures}")


def measure_sdk(direct_url: str, gw: stack.Gateway, mode: str, upstream: str, s: Settings, report: Report,
                log: Callable[[str], None]) -> None:
    """Interleaved `call_tool` pairs with the MCP SDK `Client` in `mode`, directly and through `gw`.

    The gateway's CPU per call is its CPU over the repetition divided by the calls it served
    (the direct half never reaches it)."""
    import anyio
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    per_call = mode.endswith("-per-call")
    client_mode = mode.removesuffix("-per-call")

    async def main() -> None:
        async with (
            httpx2.AsyncClient(timeout=30) as d_http,
            httpx2.AsyncClient(headers={"Authorization": f"Bearer {gw.token}"}, timeout=30) as g_http,
            Client(streamable_http_client(direct_url, http_client=d_http), mode=client_mode) as d_client,
            Client(streamable_http_client(gw.url, http_client=g_http), mode=client_mode) as g_client,
        ):
            async def call(side: str) -> Any:
                if not per_call:
                    return await (d_client if side == "d" else g_client).call_tool(TOOL, ARGUMENTS)
                url, http = (direct_url, d_http) if side == "d" else (gw.url, g_http)
                async with Client(streamable_http_client(url, http_client=http), mode=client_mode) as fresh:
                    return await fresh.call_tool(TOOL, ARGUMENTS)

            for rep in range(s.reps):
                d_ms: list[float] = []
                g_ms: list[float] = []
                failures = 0
                gateway_calls = 0
                deadline = time.monotonic() + s.sequential_seconds
                cpu_before = load.cpu_seconds(gw.pid)
                for i in range(SDK_WARMUP + s.sdk_calls):
                    if d_ms and time.monotonic() > deadline:
                        break
                    pair: dict[str, float] = {}
                    for side in (("d", "g") if i % 2 == 0 else ("g", "d")):
                        started = time.perf_counter_ns()
                        result = await call(side)
                        pair[side] = (time.perf_counter_ns() - started) / 1e6
                        if result.is_error:
                            failures += 1
                    gateway_calls += 1
                    if i >= SDK_WARMUP:
                        d_ms.append(pair["d"])
                        g_ms.append(pair["g"])
                cpu = load.cpu_seconds(gw.pid) - cpu_before
                summary: dict[str, Any] = {**load.Paired(d_ms, g_ms, failures).summary(), "pairs": len(d_ms),
                                           "mode": mode, "upstream": upstream,
                                           "gateway_cpu_us_per_call": cpu / gateway_calls * 1e6}
                report.sdk.append(summary)
                report.sdk_failures += failures
                log(f"  rep {rep + 1}/{s.reps} SDK {mode} -> {upstream}: direct p50 {summary['direct_p50_ms']:.3f} ms, gateway p50 "
                    f"{summary['gateway_p50_ms']:.3f} ms, added p50 {summary['added_p50_ms']:.3f} ms, gateway CPU "
                    f"{summary['gateway_cpu_us_per_call']:.0f} µs/call, failures {failures}")

    anyio.run(main)


def measure_credentials(with_user: stack.Gateway, with_none: stack.Gateway, s: Settings, wrk: str | None, where: Placement,
                        report: Report, log: Callable[[str], None]) -> None:
    """The same load through two gateways in front of one upstream: per-user credentials vs `source: none`."""
    targets = {"user": (with_user, load.tool_call(with_user.url, TOOL, ARGUMENTS, token=with_user.token)),
               "none": (with_none, load.tool_call(with_none.url, TOOL, ARGUMENTS, token=with_none.token))}
    for _, target in targets.values():
        run_load(target, 8, Settings(seconds=1.0, calls=200, generator=s.generator), wrk, where.client, [])
    for rep in range(s.reps):
        for connections in CREDENTIAL_CONCURRENCY:
            order = ("user", "none") if rep % 2 == 0 else ("none", "user")
            for source in order:
                gw, target = targets[source]
                cpu_before = load.cpu_seconds(gw.pid)
                result = run_load(target, connections, s, wrk, where.client, [])
                cpu = load.cpu_seconds(gw.pid) - cpu_before
                row = {"rep": rep, "source": source, "connections": connections, "rps": result.rps, "p50_ms": result.p50_ms,
                       "p99_ms": result.p99_ms, "failures": result.failures,
                       "gateway_cpu_us_per_call": cpu / result.calls * 1e6 if result.calls else float("nan")}
                report.credentials.append(row)
                log(f"  rep {rep + 1}/{s.reps} c={connections:<3} source: {source:<4} {result.rps:9.0f} calls/s  "
                    f"p50 {result.p50_ms:7.3f} ms  CPU {row['gateway_cpu_us_per_call']:.0f} µs/call  failures {result.failures}")


def measure_memory(upstream_url: str, workdir: Path, s: Settings, where: Placement, report: Report, log: Callable[[str], None]) -> None:
    """A fresh gateway process: RSS after warm-up, then with `sessions` idle connections open."""
    with stack.gateway(upstream_url, workdir / "memory", where.gateway) as gw:
        host, port = "127.0.0.1", int(gw.url.split(":")[2].split("/")[0])
        init = load.legacy_request(gw.url, "initialize", {
            "protocolVersion": load.LEGACY_VERSION, "capabilities": {},
            "clientInfo": {"name": "portcullis-benchmark", "version": "1"}}, token=gw.token, request_id=1).raw()
        initialized = load.legacy_request(gw.url, "notifications/initialized", None, token=gw.token, request_id=None).raw()
        listing = load.legacy_request(gw.url, "tools/list", {}, token=gw.token, request_id=2).raw()
        script = [init, initialized, listing]
        # Warm-up: the same script and some calls on a few connections, so the baseline
        # includes lazily built state (imports, caches, the upstream pool) and not the sessions.
        warm, warm_failures = load.open_idle_connections(host, port, script, 4)
        load.python_load(load.tool_call(gw.url, TOOL, ARGUMENTS, token=gw.token), 4, calls=200)
        for sock in warm:
            sock.close()
        time.sleep(0.5)  # let the server notice the closed warm-up sockets before reading the baseline
        fds_before = len(os.listdir(f"/proc/{gw.pid}/fd"))
        before = load.rss_kib(gw.pid)
        started = time.monotonic()
        socks, failures = load.open_idle_connections(host, port, script, s.sessions)
        opened_in = time.monotonic() - started
        try:
            after = load.rss_kib(gw.pid)
            fds_after = len(os.listdir(f"/proc/{gw.pid}/fd"))
            alive = load.still_open(socks)
            hwm = _status_field(gw.pid, "VmHWM")
            closed_rss = None
            closed_after = None
            still_open_after_wait = None
            if s.wait_for_close:
                # The gateway closes a keep-alive connection idle for its timeout_keep_alive (75 s);
                # wait (bounded) to see whether it has, and read RSS again either way.
                deadline = time.monotonic() + 20
                while load.still_open(socks) and time.monotonic() < deadline:
                    time.sleep(0.5)
                closed_after = time.monotonic() - started
                closed_rss = load.rss_kib(gw.pid)
                still_open_after_wait = load.still_open(socks)
        finally:
            for sock in socks:
                sock.close()
        report.memory = {
            "sessions": s.sessions,
            "opened": len(socks),
            "failures": len(failures) + len(warm_failures),
            "failure_samples": (failures + warm_failures)[:3],
            "open_at_measurement": alive,
            "opened_in_s": opened_in,
            "rss_before_kib": before,
            "rss_after_kib": after,
            "per_session_bytes": (after - before) * 1024 / max(1, len(socks)),
            "vm_hwm_kib": hwm,
            "gateway_fds_before": fds_before,
            "gateway_fds_after": fds_after,
            "rss_after_server_closed_kib": closed_rss,
            "server_closed_within_s": closed_after,
            "still_open_after_wait": still_open_after_wait,
        }
        log(f"  RSS {before} KiB -> {after} KiB with {alive}/{s.sessions} idle sessions open "
            f"({report.memory['per_session_bytes']:.0f} B/session); fds {fds_before} -> {fds_after}; failures {len(failures)}")


def _status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return -1


# --- report ----------------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def render(report: Report) -> str:
    s = report.settings
    m = report.machine
    out: list[str] = []
    out.append("## Portcullis gateway overhead (tools/call `echo`, 2026-07-28 wire, loopback)\n")
    out.append(f"Gateway source: {m['gateway_source']}" + (f" (run as `{s['gateway_executable']}`)" if s.get("gateway_executable") else "") + ".")
    out.append(f"Machine: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, Python {m['python']}. "
               f"Placement: {s['placement']}.")
    out.append("Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + f"; load generator: {s['generator_used']}"
               + (f" ({m['wrk']})" if s["generator_used"] == "wrk" else "") + ".")
    out.append(f"Gateway process: `portcullis serve` (audit stdout to /dev/null); libraries loaded: "
               + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in s.get("gateway_libraries", {}).items()) + ".")
    out.append(f"Medians over {s['reps']} repetitions; load runs of {s['seconds']:g} s each"
               + (f" ({s['calls']} calls each)" if s.get("calls") and s["generator_used"] == "python" else "") + ".\n")

    out.append("### Throughput and latency under concurrency\n")
    out.append("| concurrency | direct calls/s | direct p50 ms | direct p99 ms | gateway calls/s | gateway p50 ms | gateway p99 ms | gateway p99.9 ms | gateway p99/p50 | added p50 ms | added p99 ms | gateway CPU µs/call | failures (direct/gateway) |")
    out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for c in CONCURRENCY:
        d = [r for r in report.load if r["connections"] == c and r["side"] == "direct"]
        g = [r for r in report.load if r["connections"] == c and r["side"] == "gateway"]
        if not d or not g:
            continue
        dp50, dp99 = _median([r["p50_ms"] for r in d]), _median([r["p99_ms"] for r in d])
        gp50, gp99 = _median([r["p50_ms"] for r in g]), _median([r["p99_ms"] for r in g])
        gp999 = _median([r.get("p999_ms", float("nan")) for r in g])
        cpu = _median([r.get("gateway_cpu_us_per_call", float("nan")) for r in g])
        out.append(f"| {c} | {_median([r['rps'] for r in d]):,.0f} | {dp50:.3f} | {dp99:.3f} | {_median([r['rps'] for r in g]):,.0f} | "
                   f"{gp50:.3f} | {gp99:.3f} | {gp999:.3f} | {gp99 / gp50:.1f}x | {gp50 - dp50:.3f} | {gp99 - dp99:.3f} | {cpu:,.0f} | "
                   f"{sum(r['failures'] for r in d)}/{sum(r['failures'] for r in g)} |")

    rows: list[tuple[str, str, list[dict[str, Any]]]] = []
    if report.sequential:
        rows.append(("lean keep-alive socket → gateway → fast upstream", "2026-07-28", report.sequential))
    for upstream, label in (("fast", "fast upstream"), ("sdk", "SDK `MCPServer` upstream")):
        for mode in SDK_MODES:
            picked = [r for r in report.sdk if r["mode"] == mode and r["upstream"] == upstream]
            if picked:
                era = {"2026-07-28": "2026-07-28", "legacy": "2025-11-25 (session)"}.get(mode, "2025-11-25, a session per call")
                rows.append((f"MCP SDK `Client` → gateway → {label}", era, picked))
    if rows:
        out.append("\n### Sequential latency, what each kind of client and upstream pays\n")
        pairs = {label: "/".join(str(int(r["pairs"])) for r in picked) for label, _, picked in rows}
        out.append("Interleaved pairs (direct and through the gateway alternate, order flipped every pair; at most "
                   f"{s['sequential_seconds']:g} s per repetition): lean {pairs.get(rows[0][0], '-')} per repetition, "
                   f"SDK {s['sdk_calls']} at most. The lean client is a raw keep-alive socket with a pre-built request "
                   f"(TCP_NODELAY); the SDK client is mcp {m['versions']['mcp']} `Client.call_tool` over httpx2. "
                   f"Gateway CPU per call: the gateway process's CPU over the repetition / the calls it served. "
                   f"Failures: lean {report.sequential_failures}, SDK {report.sdk_failures}.\n")
        out.append("| path | era | direct p50 ms | gateway p50 ms | **added p50 ms** | added p99 ms | paired median ms | gateway CPU µs/call |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|")
        for label, era, picked in rows:
            out.append(f"| {label} | {era} | {_median([r['direct_p50_ms'] for r in picked]):.3f} | "
                       f"{_median([r['gateway_p50_ms'] for r in picked]):.3f} | **{_median([r['added_p50_ms'] for r in picked]):.3f}** | "
                       f"{_median([r['added_p99_ms'] for r in picked]):.3f} | {_median([r['paired_median_ms'] for r in picked]):.3f} | "
                       f"{_median([r.get('gateway_cpu_us_per_call', float('nan')) for r in picked]):,.0f} |")

    if report.credentials:
        out.append("\n### Per-user credentials vs `source: none`\n")
        out.append("Two gateways in front of the same fast upstream, one resolving the user's sealed credential from the "
                   "vault on every call (`source: user`), one with nothing to resolve (`source: none`); runs alternate.\n")
        out.append("| concurrency | user calls/s | none calls/s | user CPU µs/call | none CPU µs/call | credential cost µs/call | calls/s ratio (user/none) |")
        out.append("|---:|---:|---:|---:|---:|---:|---:|")
        for c in CREDENTIAL_CONCURRENCY:
            u = [r for r in report.credentials if r["connections"] == c and r["source"] == "user"]
            n = [r for r in report.credentials if r["connections"] == c and r["source"] == "none"]
            if not u or not n:
                continue
            ucpu, ncpu = _median([r["gateway_cpu_us_per_call"] for r in u]), _median([r["gateway_cpu_us_per_call"] for r in n])
            urps, nrps = _median([r["rps"] for r in u]), _median([r["rps"] for r in n])
            out.append(f"| {c} | {urps:,.0f} | {nrps:,.0f} | {ucpu:,.0f} | {ncpu:,.0f} | {ucpu - ncpu:,.0f} | {urps / nrps:.2f} |")

    mem = report.memory
    if mem:
        out.append("\n### Memory, idle sessions\n")
        out.append(f"A fresh gateway process; each session: legacy `initialize`, `notifications/initialized`, `tools/list` "
                   f"on its own keep-alive connection, then idle (at most 32 sessions handshaking at once).\n")
        out.append("| sessions open | RSS before | RSS after | added | per session | gateway fds | failures |")
        out.append("|---:|---:|---:|---:|---:|---:|---:|")
        out.append(f"| {mem['open_at_measurement']}/{mem['sessions']} | {mem['rss_before_kib'] / 1024:.1f} MiB | "
                   f"{mem['rss_after_kib'] / 1024:.1f} MiB | {(mem['rss_after_kib'] - mem['rss_before_kib']) / 1024:.1f} MiB | "
                   f"{mem['per_session_bytes'] / 1024:.1f} KiB | {mem['gateway_fds_before']} → {mem['gateway_fds_after']} | {mem['failures']} |")
        if mem.get("rss_after_server_closed_kib") is not None:
            held = mem.get("still_open_after_wait") or 0
            what = (f"{held} sessions were still open (the gateway keeps idle agent connections 75 s)" if held
                    else "the gateway had closed the idle connections itself")
            out.append(f"\n{mem['server_closed_within_s']:.1f} s after the first opened, {what}; RSS was "
                       f"{mem['rss_after_server_closed_kib'] / 1024:.1f} MiB. Agent-facing state per session: none "
                       f"(stateless, no `Mcp-Session-Id`), so the cost is one open connection.")

    if report.upstream_calls:
        out.append(f"\nUpstream arrivals (fast upstream's own count): {report.upstream_calls}.")
    if report.notes:
        out.append("\nNotes:\n" + "\n".join(f"- {n}" for n in report.notes))
    if report.commands:
        out.append("\nLoad commands (first repetition):\n\n```\n" + "\n".join(dict.fromkeys(report.commands)) + "\n```")
    return "\n".join(out)


# --- main -----------------------------------------------------------------------------------------


def run(s: Settings, log: Callable[[str], None]) -> Report:
    wrk = load.wrk_path() if s.generator in ("auto", "wrk") else None
    if s.generator == "wrk" and wrk is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install -y wrk); use --generator python")
    if wrk is None and s.generator == "auto":
        log("wrk not found (Debian: apt-get install -y wrk): falling back to the Python raw-socket generator, "
            "which caps well below the fast upstream; throughput figures are then the generator's limit.")
    where = placement(s.pin)
    report = Report(
        settings={**asdict(s), "generator_used": "wrk" if wrk else "python", "placement": where.describe()},
        machine=machine(wrk),
    )
    if where.client:
        os.sched_setaffinity(0, where.client)  # the harness's own clients run beside the generator
    with tempfile.TemporaryDirectory(prefix="portcullis-bench-") as tmp, stack.upstream(where.upstream) as (up, upstream_url):
        report.settings["gateway_executable"] = stack.GATEWAY_EXECUTABLE
        report.commands.append(" ".join(up.argv))
        workdir = Path(tmp)
        with stack.gateway(upstream_url, workdir / "load", where.gateway) as gw:
            report.commands.append(" ".join(gw.process.argv) + "   # stdout > /dev/null, PORTCULLIS_ADMIN_SECRET set")
            report.settings["gateway_libraries"] = _loaded_libraries(gw.pid)
            direct = load.tool_call(upstream_url, TOOL, ARGUMENTS, label="direct")
            through = load.tool_call(gw.url, TOOL, ARGUMENTS, token=gw.token, label="gateway")
            stats_before = _upstream_stats(upstream_url)
            log(f"load: {report.settings['generator_used']}, concurrency {CONCURRENCY}, {s.reps} repetition(s); {where.describe()}")
            measure_load(direct, through, gw, s, wrk, where, report, log)
            log(f"sequential (raw keep-alive client): {s.sequential_calls} pairs x {s.reps}")
            measure_sequential(direct, through, gw, s, report, log)
            if s.sdk:
                for mode in SDK_MODES:
                    log(f"sequential (MCP SDK Client, {mode}, fast upstream): {s.sdk_calls} pairs x {s.reps}")
                    measure_sdk(upstream_url, gw, mode, "fast", s, report, log)
            stats_after = _upstream_stats(upstream_url)
            report.upstream_calls = {k: stats_after.get(k, 0) - stats_before.get(k, 0) for k in stats_after}
            if s.credentials:
                with stack.gateway(upstream_url, workdir / "none", where.gateway, credentials=False) as bare:
                    log(f"credentials: source user vs none, concurrency {CREDENTIAL_CONCURRENCY}, {s.reps} repetition(s)")
                    measure_credentials(gw, bare, s, wrk, where, report, log)
        if s.sdk and s.sdk_upstream:
            with stack.sdk_upstream(where.upstream) as (sdk_up, sdk_url), \
                    stack.gateway(sdk_url, workdir / "sdk", where.gateway) as sdk_gw:
                report.commands.append(" ".join(sdk_up.argv))
                for mode in SDK_MODES:
                    log(f"sequential (MCP SDK Client, {mode}, SDK upstream): {s.sdk_calls} pairs x {s.reps}")
                    measure_sdk(sdk_url, sdk_gw, mode, "sdk", s, report, log)
        if s.memory:
            log(f"memory: {s.sessions} idle sessions on a fresh gateway")
            measure_memory(upstream_url, workdir, s, where, report, log)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, 1 s runs, fewer calls and sessions")
    parser.add_argument("--reps", type=int, help="repetitions (medians are reported)")
    parser.add_argument("--seconds", type=float, help="duration of each load run")
    parser.add_argument("--calls", type=int, help="fixed calls per load run and per sequential/SDK repetition (Python generator)")
    parser.add_argument("--sessions", type=int, help="idle sessions for the memory measurement")
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--no-sdk", action="store_true", help="skip the MCP SDK Client measurements")
    parser.add_argument("--no-sdk-upstream", action="store_true", help="skip the MCP SDK upstream rows")
    parser.add_argument("--no-credentials", action="store_true", help="skip the source: user vs none comparison")
    parser.add_argument("--concurrency", help="comma-separated connection counts for the load runs (default 1,8,64,256)")
    parser.add_argument("--no-memory", action="store_true", help="skip the idle-session memory measurement")
    parser.add_argument("--json", type=Path, help="also write every raw figure as JSON here")
    parser.add_argument("--gateway-executable", help="run this instead of `portcullis` (same CLI), e.g. another checkout's")
    args = parser.parse_args(argv)

    s = Settings.quick() if args.quick else Settings()
    if args.gateway_executable:
        stack.GATEWAY_EXECUTABLE = args.gateway_executable
    s.generator = args.generator
    s.pin = not args.no_pin
    s.sdk = not args.no_sdk
    s.memory = not args.no_memory
    s.sdk_upstream = not args.no_sdk_upstream
    s.credentials = not args.no_credentials
    if args.concurrency:
        global CONCURRENCY
        CONCURRENCY = tuple(int(c) for c in args.concurrency.split(","))
    if args.reps is not None:
        s.reps = args.reps
    if args.seconds is not None:
        s.seconds = args.seconds
    if args.sessions is not None:
        s.sessions = args.sessions
    if args.calls is not None:
        s.calls = args.calls
        s.sequential_calls = args.calls
        s.sdk_calls = min(args.calls, s.sdk_calls)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    started = time.monotonic()
    report = run(s, log)
    report.settings["wall_seconds"] = round(time.monotonic() - started, 1)
    print(render(report))
    print(f"\n(total wall time {report.settings['wall_seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
