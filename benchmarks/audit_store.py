"""What the durable audit store costs: per call, under sustained load, with many writers, and at pruning.

Four measurements, each printed as it goes (stderr) and written as one markdown report:

1. **Per-call cost.** Three `portcullis serve` processes, identical but for the
   VirtualMCPServer's `spec.audit.store`: `none`, `sqlite`, `postgres` (the Secret
   holding the URL is a `v1/Secret` document beside the manifests). Each has its own
   fast upstream, so the upstream's own count attributes every arrival to one gateway.
   Sequential 2026-07-28 `tools/call`s from the lean keep-alive client (one connection per
   gateway), in short blocks: per round each gateway gets one block (the order rotates
   round by round) of back-to-back calls, then the same pause and one `GET /v1/status`
   for every gateway, so the store's queue is empty before the next block and a store's
   background write is charged to its own block; only one gateway is busy at a time.
   Percentiles pool all of a gateway's measured calls (its blocks are spread over the
   same minutes as everyone's, so this shared machine's drift hits all alike); "added" is
   the difference to `none` with a 95% bootstrap interval over rounds. CPU per call is
   the gateway's utime+stime over its blocks. A second `none` gateway (`none-b`) is an
   A/A control: what it "adds" is this machine's noise floor. (Alternating calls between
   two gateways, as `load.sequential_pairs` does, would hide the store's cost: a
   gateway's event loop runs the background write right after answering, which is when
   the other gateway is serving the next call on the same core.)
2. **Sustained rate.** wrk (or the Python generator) at 8 and 64 connections against
   each gateway in turn, interleaved the same way. Afterwards, per gateway: the admin
   API's `audit.queueDepth` must be 0 and `audit.failing` null; the store's count of
   `tools/call` events must equal the gateway's own `portcullis_calls_total` and the
   upstream's count of arrivals; `/metrics` dropped/refused/unaudited must be 0; and
   `GET /v1/audit/verify` walks every chain.
3. **Four writers into one PostgreSQL.** Four processes, each with its own
   `PostgresAuditStore` and `ChainWriter` (one random 32-byte chain key, distinct writer
   ids, one server), append a batch every 50 ms (the trail's flush interval) holding the
   events due at 2,000 events/s; then the row count and `verify_audit` (with each
   writer's head, so a lost tail would show).
4. **Pruning a day of 10 million events.** One real event appended through the store
   creates the day's partition (the store's own code path); 10,000,000 - 1 synthetic
   rows are then inserted server-side (`INSERT ... SELECT ... FROM generate_series`,
   through the partitioned table so the identity column is filled); the partition is
   vacuumed and checkpointed, as a day-old partition would be, and
   `store.prune(server, before)` is timed for a cutoff after that day. PostgreSQL logs
   every statement of the prune (`log_min_duration_statement = 0` on that database
   only), which gives where its time goes. The database is dropped afterwards.

Placement (taskset, as gateway_overhead.py): the gateways on the first allowed core;
the upstreams, the load generator, this harness and PostgreSQL on the other (a
production database is on another machine; here it at least stays off the gateway's
core). Steps 3 and 4 have no gateway and use every core.

PostgreSQL: the test suite's throwaway cluster (`tests/support/postgres.py`), restarted
with its durability settings back at PostgreSQL's defaults (fsync, synchronous_commit,
full_page_writes on: the suite turns them off for speed) plus shared_buffers=1GB and
max_wal_size=16GB; `--pg-test-settings` keeps the suite's settings. The report lists them.

    .venv/bin/python benchmarks/audit_store.py            # full run, about 6-7 minutes; writes benchmarks/results/
    .venv/bin/python benchmarks/audit_store.py --quick    # smoke run, about a minute (1,000,000-row prune)
    .venv/bin/python benchmarks/audit_store.py --quick --prune-rows 20000 --no-pin --generator python --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import queue as queue_module
import re
import secrets
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` (and `tests.support`) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import load, stack  # noqa: E402
from benchmarks.gateway_overhead import ARGUMENTS, TOOL, Placement, machine, placement  # noqa: E402

STORES = ("none", "sqlite", "postgres")
CONTROL = "none-b"
"""A second `none` gateway: in step 1 an A/A control, paired with `none` like the stores, so the report shows what
"adds nothing" measures as between two identical processes on this machine."""
PAIRED = (CONTROL, "sqlite", "postgres")
CONCURRENCY = (8, 64)
SERVER = "bench/bench"  # the benchmark manifests' VirtualMCPServer
WRITERS_SERVER = "bench/writers"
PRUNE_SERVER = "bench/prune"
DAY_US = 86_400 * 1_000_000
RESULTS = stack.BENCH_DIR / "results" / "audit-store-2026-12-01.md"
TARGET_P50_MS = 0.1

SECRET_DOC = """\
apiVersion: v1
kind: Secret
metadata: {{name: audit-db, namespace: bench}}
stringData: {{url: "{url}"}}
"""


@dataclass
class Settings:
    rounds: int = 40  # step 1: blocks per configuration
    calls: int = 150  # step 1: measured calls per block
    block_warmup: int = 20  # step 1: calls per block before measuring
    load_seconds: float = 4.0  # step 2: per wrk run
    load_reps: int = 5  # step 2: runs per store and concurrency
    writers: int = 4
    writer_rate: int = 2000  # events/s per writer
    writer_seconds: float = 10.0
    batch_interval: float = 0.05  # the trail's flush interval
    prune_rows: int = 10_000_000
    generator: str = "auto"
    pin: bool = True
    pg_test_settings: bool = False
    steps: tuple[int, ...] = (1, 2, 3, 4)

    @classmethod
    def quick(cls) -> Settings:
        return cls(rounds=4, calls=100, load_seconds=1.0, load_reps=1, writer_seconds=2.0,
                   prune_rows=1_000_000)


@dataclass
class Report:
    settings: dict[str, Any]
    machine: dict[str, Any]
    postgres: dict[str, Any] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    sequential: list[dict[str, Any]] = field(default_factory=list)
    load: list[dict[str, Any]] = field(default_factory=list)
    durability: dict[str, dict[str, Any]] = field(default_factory=dict)
    writers: dict[str, Any] = field(default_factory=dict)
    prune: dict[str, Any] = field(default_factory=dict)
    loadavg: dict[str, str] = field(default_factory=dict)
    """The machine's 1-minute load average (runnable/total tasks) when each step started."""
    notes: list[str] = field(default_factory=list)


Log = Callable[[str], None]


def _loadavg() -> str:
    """The 1-minute load average and runnable/total tasks (the machine is shared: noise shows here)."""
    try:
        fields = Path("/proc/loadavg").read_text().split()
        return f"{fields[0]} ({fields[3]})"
    except OSError:
        return "?"


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _range(values: Sequence[float], fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(min(values))} – {fmt.format(max(values))}" if values else "–"


# --- PostgreSQL ------------------------------------------------------------------------------------


def _pids_of_cluster(postmaster: int) -> list[int]:
    """The postmaster and its children (backends forked later inherit the postmaster's affinity)."""
    pids = [postmaster]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == postmaster:
                    pids.append(int(entry.name))
    return pids


def pin_cluster(pg: Any, cores: Sequence[int]) -> None:
    postmaster = int((pg.datadir / "postmaster.pid").read_text().split()[0])
    for pid in _pids_of_cluster(postmaster):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, set(cores))


@contextlib.contextmanager
def postgres_cluster(test_settings: bool, log: Log) -> Iterator[Any]:
    """The test suite's throwaway cluster; restarted with default durability unless `test_settings`."""
    from tests.support.postgres import find_bindir, postgres_server

    if find_bindir() is None:
        raise SystemExit("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install -y postgresql")
    with contextlib.ExitStack() as cleanup:
        try:
            pg = cleanup.enter_context(postgres_server())
        except BaseException as exc:  # pytest's skip/fail outcomes, raised by the helper when it cannot run
            if type(exc).__name__ in ("Skipped", "Failed"):
                raise SystemExit(f"PostgreSQL cannot be started here: {exc}") from None
            raise
        cleanup.callback(log, "stopping the PostgreSQL cluster")  # runs first, then the helper stops it
        if not test_settings:
            pg.stop()
            options = " ".join([
                f"-p {pg.port}", f"-k {pg.root}", "-c listen_addresses=127.0.0.1", "-c max_connections=100",
                "-c shared_buffers=1GB", "-c max_wal_size=16GB", "-c checkpoint_timeout=30min",
            ])
            pg._run("pg_ctl", "-D", str(pg.datadir), "-l", str(pg.root / "server.log"), "-o", options, "-w", "-t", "30", "start")
            pg._run("pg_isready", "-h", "127.0.0.1", "-p", str(pg.port), "-t", "30")
        log(f"PostgreSQL cluster at 127.0.0.1:{pg.port} ({pg.root}), "
            + ("the test suite's settings (fsync off)" if test_settings else "default durability (fsync on)"))
        yield pg


async def _pg_facts(url: str) -> dict[str, Any]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        version = await conn.fetchval("SHOW server_version")
        names = ["fsync", "synchronous_commit", "full_page_writes", "wal_level", "shared_buffers", "work_mem",
                 "maintenance_work_mem", "max_wal_size", "checkpoint_timeout"]
        rows = await conn.fetch("SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY($1::text[])", names)
        return {"version": version, "settings": {name: value for name, value in sorted(rows)}}
    finally:
        await conn.close()


# --- gateways ---------------------------------------------------------------------------------------


def _get(url: str, secret: str | None = None, timeout: float = 60.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {secret}"} if secret else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def audit_status(gw: stack.Gateway) -> dict[str, Any]:
    status, body = _get(gw.admin_url + "/v1/status", gw.admin_secret, timeout=10)
    if status != 200:
        raise RuntimeError(f"GET /v1/status: HTTP {status} {body[:200]!r}")
    audit: dict[str, Any] = json.loads(body)["audit"]
    return audit


def drain(gw: stack.Gateway, timeout: float = 30.0) -> dict[str, Any]:
    """Wait (bounded) until the gateway's audit queue is empty; its audit status."""
    deadline = time.monotonic() + timeout
    while True:
        audit = audit_status(gw)
        if audit["queueDepth"] == 0 or time.monotonic() > deadline:
            return audit
        time.sleep(0.02)  # polling the admin API, bounded by the deadline


def metrics(gw: stack.Gateway) -> dict[str, float]:
    """The audit counters of /metrics for SERVER, summed over their other labels."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = _get(gw.admin_url + "/metrics", gw.admin_secret, timeout=10)
    if status != 200:
        raise RuntimeError(f"GET /metrics: HTTP {status}")
    wanted = {
        "portcullis_calls_total": "calls_total",
        "portcullis_audit_dropped_events_total": "dropped",
        "portcullis_audit_refused_calls_total": "refused",
        "portcullis_audit_unaudited_calls_total": "unaudited",
        "portcullis_audit_write_failures_total": "write_failures",
        "portcullis_audit_events_written_total": "written",
        "portcullis_audit_write_duration_seconds_sum": "write_seconds_sum",
        "portcullis_audit_write_duration_seconds_count": "batches",
    }
    out = dict.fromkeys(wanted.values(), 0.0)
    out["tools_call_total"] = 0.0
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.labels.get("server") != SERVER or sample.name not in wanted:
                continue
            out[wanted[sample.name]] += sample.value
            if sample.name == "portcullis_calls_total" and sample.labels.get("method") == "tools/call":
                out["tools_call_total"] += sample.value
    return out


def stored_counts(store: str, gw: stack.Gateway, pg_url: str) -> dict[str, int]:
    """Events of SERVER in the gateway's durable store, by method."""
    if store == "sqlite":
        assert gw.state is not None
        conn = sqlite3.connect(f"file:{gw.state / 'audit' / 'audit.db'}?mode=ro", uri=True)
        try:
            rows = conn.execute("SELECT method, count(*) FROM audit_events WHERE server = ? GROUP BY method", (SERVER,)).fetchall()
        finally:
            conn.close()
        return {str(m): int(n) for m, n in rows}

    async def count() -> dict[str, int]:
        import asyncpg

        conn = await asyncpg.connect(pg_url)
        try:
            rows = await conn.fetch("SELECT method, count(*) FROM audit_events WHERE server = $1 GROUP BY method", SERVER)
        finally:
            await conn.close()
        return {str(m): int(n) for m, n in rows}

    return asyncio.run(count())


def _upstream_calls(url: str) -> int:
    with urllib.request.urlopen(url.rsplit("/", 1)[0] + "/stats", timeout=10) as response:
        return int(json.loads(response.read()).get("tools/call", 0))


@dataclass
class Rig:
    """The gateways of steps 1 and 2, one per store, and what the client counted of each."""

    gateways: dict[str, stack.Gateway]
    targets: dict[str, load.Target]
    upstreams: dict[str, str]
    pg_url: str
    client_answers: dict[str, int] = field(default_factory=dict)


def _rotated(order: Sequence[str], shift: int) -> list[str]:
    k = shift % len(order)
    return [*order[k:], *order[:k]]


def _batches(gw: stack.Gateway) -> tuple[float, float, float]:
    """(batches written, events written, seconds writing) so far, from the gateway's /metrics."""
    m = metrics(gw)
    return m["batches"], m["written"], m["write_seconds_sum"]


SEQUENTIAL = ("none", CONTROL, "sqlite", "postgres")


def _pooled_diff(rounds: list[int], a: dict[int, list[float]], b: dict[int, list[float]], pct: float) -> float:
    """pct-percentile of b's calls in `rounds` minus a's."""
    return load.percentile([v for r in rounds for v in b[r]], pct) - load.percentile([v for r in rounds for v in a[r]], pct)


def _bootstrap(rounds: list[int], stat: Callable[[list[int]], float], n: int = 300) -> tuple[float, float]:
    """A 95% interval for `stat`, resampling whole rounds (fixed seed: the same data gives the same interval)."""
    import random

    rng = random.Random(20261201)
    values = sorted(stat([rng.choice(rounds) for _ in rounds]) for _ in range(n))
    return values[int(0.025 * n)], values[int(0.975 * n) - 1]


def measure_sequential(rig: Rig, s: Settings, report: Report, log: Log) -> None:
    """Short blocks of back-to-back calls, one gateway at a time, the order rotating every round."""
    clients = {st: load.KeepAliveClient(rig.targets[st].host, rig.targets[st].port) for st in SEQUENTIAL}
    raws = {st: rig.targets[st].raw() for st in SEQUENTIAL}
    lat: dict[str, dict[int, list[float]]] = {st: {} for st in SEQUENTIAL}
    cpu: dict[str, dict[int, float]] = {st: {} for st in SEQUENTIAL}
    calls: dict[str, dict[int, int]] = {st: {} for st in SEQUENTIAL}
    failures = dict.fromkeys(SEQUENTIAL, 0)
    written_before = {st: _batches(rig.gateways[st]) for st in ("sqlite", "postgres")}
    started = time.monotonic()
    try:
        for r in range(s.rounds):
            for st in _rotated(SEQUENTIAL, r):
                gw, client, raw = rig.gateways[st], clients[st], raws[st]
                cpu_before = load.cpu_seconds(gw.pid)
                block: list[float] = []
                for i in range(s.block_warmup + s.calls):
                    ns, status, body = client.send(raw)
                    if not load.call_succeeded(status, body):
                        failures[st] += 1
                    if i >= s.block_warmup:
                        block.append(ns / 1e6)
                # Every configuration: the same pause (longer than the trail's 50 ms flush interval) and one status
                # read, so that its background write lands in its own block and the admin call costs all the same.
                time.sleep(0.06)
                audit = drain(gw)
                if audit["queueDepth"]:
                    raise RuntimeError(f"the {st} gateway's audit queue did not drain: {audit}")
                cpu[st][r] = load.cpu_seconds(gw.pid) - cpu_before
                calls[st][r] = s.block_warmup + s.calls
                lat[st][r] = block
                rig.client_answers[st] = rig.client_answers.get(st, 0) + s.block_warmup + s.calls
            if (r + 1) % max(1, s.rounds // 5) == 0 or r + 1 == s.rounds:
                line = ", ".join(f"{st} {statistics.median(lat[st][r]):.3f}" for st in SEQUENTIAL)
                log(f"  round {r + 1}/{s.rounds} ({time.monotonic() - started:.0f} s): block p50 ms {line}")
    finally:
        for client in clients.values():
            client.close()
    rounds = list(range(s.rounds))
    summary: dict[str, dict[str, Any]] = {}
    base = lat["none"]
    for st in SEQUENTIAL:
        pooled = [v for r in rounds for v in lat[st][r]]
        cpu_us = sum(cpu[st].values()) / sum(calls[st].values()) * 1e6
        row: dict[str, Any] = {
            "calls": len(pooled), "failures": failures[st], "p50_ms": load.percentile(pooled, 50), "p99_ms": load.percentile(pooled, 99),
            "block_p50_ms": [statistics.median(lat[st][r]) for r in rounds], "cpu_us_per_call": cpu_us,
            "block_cpu_us_per_call": [cpu[st][r] / calls[st][r] * 1e6 for r in rounds],
        }
        if st != "none":
            row["added_p50_ms"] = _pooled_diff(rounds, base, lat[st], 50)
            row["added_p99_ms"] = _pooled_diff(rounds, base, lat[st], 99)
            samples = lat[st]
            row["added_p50_ci"] = _bootstrap(rounds, lambda rs: _pooled_diff(rs, base, samples, 50))
            row["added_p99_ci"] = _bootstrap(rounds, lambda rs: _pooled_diff(rs, base, samples, 99))
            row["round_added_p50_ms"] = [statistics.median(lat[st][r]) - statistics.median(base[r]) for r in rounds]

            def cpu_diff(rs: list[int], st: str = st) -> float:
                return (sum(cpu[st][r] for r in rs) / sum(calls[st][r] for r in rs)
                        - sum(cpu["none"][r] for r in rs) / sum(calls["none"][r] for r in rs)) * 1e6

            row["added_cpu_us_per_call"] = cpu_diff(rounds)
            row["added_cpu_ci"] = _bootstrap(rounds, cpu_diff)
        if st in written_before:
            batches, events, writing = (a - b for a, b in zip(_batches(rig.gateways[st]), written_before[st], strict=True))
            row |= {"batches": batches, "events_per_batch": events / batches if batches else float("nan"),
                    "write_ms_mean": writing / batches * 1000 if batches else float("nan")}
        summary[st] = row
        log(f"  {st:<8} {row['calls']} calls: p50 {row['p50_ms']:.3f} ms, p99 {row['p99_ms']:.3f} ms, CPU {cpu_us:.0f} µs/call"
            + (f"; added p50 {row['added_p50_ms']:+.3f} ms (95% CI {row['added_p50_ci'][0]:+.3f} – {row['added_p50_ci'][1]:+.3f}), "
               f"p99 {row['added_p99_ms']:+.3f} ms, CPU {row['added_cpu_us_per_call']:+.0f} µs/call" if st != "none" else "")
            + f"; failures {failures[st]}")
    report.sequential = [summary]


def measure_load(rig: Rig, s: Settings, wrk: str | None, where: Placement, report: Report, log: Log) -> None:
    for r in range(s.load_reps):
        for c in CONCURRENCY:
            for store in _rotated(STORES, r * len(CONCURRENCY) + CONCURRENCY.index(c)):
                gw = rig.gateways[store]
                cpu_before = load.cpu_seconds(gw.pid)
                if wrk is not None:
                    result = load.wrk_load(rig.targets[store], c, s.load_seconds, wrk=wrk, prefix=stack.pin_prefix(where.client),
                                           commands=report.commands if r == 0 and store == STORES[0] else None)
                else:
                    result = load.python_load(rig.targets[store], c, seconds=s.load_seconds)
                started = time.monotonic()
                audit = drain(gw)
                drained_s = time.monotonic() - started
                cpu = load.cpu_seconds(gw.pid) - cpu_before
                answered = result.calls + result.failures
                rig.client_answers[store] = rig.client_answers.get(store, 0) + answered
                row = {"rep": r, "store": store, **asdict(result), "rps": result.rps,
                       "cpu_us_per_call": cpu / max(1, answered) * 1e6, "drain_s": drained_s, "queue_after": audit["queueDepth"],
                       "failing_after": audit["failing"]}
                report.load.append(row)
                log(f"  rep {r + 1}/{s.load_reps} c={c:<3} {store:<8} {result.rps:7.0f} calls/s  p50 {result.p50_ms:7.3f} ms  "
                    f"p99 {result.p99_ms:7.3f} ms  CPU {row['cpu_us_per_call']:.0f} µs/call  failures {result.failures}  "
                    f"queue drained in {drained_s:.2f} s" + (f"  e.g. {result.failure_samples[0]}" if result.failure_samples else ""))


def check_durability(rig: Rig, report: Report, log: Log) -> None:
    for store in STORES:
        gw = rig.gateways[store]
        audit = drain(gw)
        counters = metrics(gw)
        row: dict[str, Any] = {
            "queue_depth": audit["queueDepth"], "failing": audit["failing"], "client_answers": rig.client_answers.get(store, 0),
            "upstream_calls": _upstream_calls(rig.upstreams[store]), **counters,
        }
        if store != "none":
            counts = stored_counts(store, gw, rig.pg_url)
            row["stored_tools_call"] = counts.get("tools/call", 0)
            row["stored_other"] = {m: n for m, n in counts.items() if m != "tools/call"}
            started = time.monotonic()
            status, body = _get(gw.admin_url + "/v1/audit/verify", gw.admin_secret, timeout=300)
            row["verify_seconds"] = time.monotonic() - started
            verdict = json.loads(body) if body else {}
            row["verify"] = {"http": status, "ok": verdict.get("ok"), "events": verdict.get("events"),
                             "writers": verdict.get("writers"), "first": verdict.get("first")}
        row["every_call_stored"] = (
            store == "none"
            or (row["stored_tools_call"] == row["tools_call_total"] == row["upstream_calls"]
                and row["stored_tools_call"] >= row["client_answers"])
        )
        row["clean"] = (row["queue_depth"] == 0 and row["failing"] is None and row["dropped"] == 0 and row["refused"] == 0
                        and row["unaudited"] == 0 and (store == "none" or bool(row["verify"]["ok"])))
        report.durability[store] = row
        log(f"  {store:<8} queueDepth {row['queue_depth']}, failing {row['failing']}, calls_total(tools/call) "
            f"{row['tools_call_total']:.0f}, upstream arrivals {row['upstream_calls']}, client answers {row['client_answers']}"
            + (f", stored {row['stored_tools_call']} (+{row['stored_other']}), verify {row['verify']['ok']} "
               f"({row['verify']['events']} events, {row['verify_seconds']:.1f} s)" if store != "none" else "")
            + f", dropped {row['dropped']:.0f}, refused {row['refused']:.0f}, unaudited {row['unaudited']:.0f}, "
              f"write failures {row['write_failures']:.0f}")


def gateway_steps(pg: Any, s: Settings, wrk: str | None, where: Placement, report: Report, workdir: Path, log: Log) -> None:
    pg_url = pg.create_database("bench_gateway")
    audits: dict[str, dict[str, Any]] = {
        "none": {"store": "none"},
        CONTROL: {"store": "none"},
        "sqlite": {"store": "sqlite"},
        "postgres": {"store": "postgres", "postgres": {"urlSecretRef": {"name": "audit-db", "key": "url"}}},
    }
    with contextlib.ExitStack() as stack_:
        upstreams: dict[str, str] = {}
        gateways: dict[str, stack.Gateway] = {}
        for store in (*STORES, CONTROL):
            up, upstreams[store] = stack_.enter_context(stack.upstream(where.upstream))
            if store == STORES[0]:
                report.commands.append(" ".join(up.argv) + "   # x4: one per gateway")
            gateways[store] = stack_.enter_context(stack.gateway(
                upstreams[store], workdir / store, where.gateway, audit=audits[store],
                extra_manifests=SECRET_DOC.format(url=pg_url) if store == "postgres" else "",
            ))
        report.commands.append(" ".join(gateways["none"].process.argv) + "   # one per store (and the control); stdout > /dev/null, PORTCULLIS_ADMIN_SECRET set")
        for store in (*STORES, CONTROL):
            audit = audit_status(gateways[store])
            if audit["store"] != audits[store]["store"]:
                raise RuntimeError(f"the {store} gateway reports audit store {audit['store']!r}")
        rig = Rig(
            gateways=gateways,
            targets={st: load.tool_call(gw.url, TOOL, ARGUMENTS, token=gw.token, label=st) for st, gw in gateways.items()},
            upstreams=upstreams, pg_url=pg_url,
        )
        # Warm every path (pools, the store's schema and partitions, lazy imports) before timing.
        for store in (*STORES, CONTROL):
            warm = load.python_load(rig.targets[store], 8, calls=400)
            if warm.failures:
                raise RuntimeError(f"warm-up through the {store} gateway failed: {warm.failure_samples}")
            rig.client_answers[store] = warm.calls + warm.failures
            drain(gateways[store])
        if 1 in s.steps:
            report.loadavg["step 1"] = _loadavg()
            log(f"step 1/4: per-call cost, sequential lean client, {s.rounds} rounds x {s.calls} calls per gateway, "
                f"order rotating; {where.describe()}")
            measure_sequential(rig, s, report, log)
        if 2 in s.steps:
            report.loadavg["step 2"] = _loadavg()
            log(f"step 2/4: sustained rate, {report.settings['generator_used']} at {CONCURRENCY} connections, "
                f"{s.load_seconds:g} s runs, {s.load_reps} rep(s) per store")
            measure_load(rig, s, wrk, where, report, log)
        log("checking that every call is stored (admin API, /metrics, the stores, /v1/audit/verify)")
        check_durability(rig, report, log)


# --- step 3: writers ---------------------------------------------------------------------------------------


def _event(index: int, n: int, server: str = WRITERS_SERVER) -> Any:
    from portcullis.gateway.audit.events import AuditEvent

    return AuditEvent(
        time_us=int(time.time() * 1_000_000), request_id=secrets.token_hex(16), server=server, tenant="bench",
        user=f"user-{n % 50}@example.com", method="tools/call", tool="echo", connection="fast", decision="allow",
        reason="allowlisted", outcome="ok", latency_ms=0.8, upstream_ms=0.05, jti=secrets.token_hex(16),
        agent_run_id=f"run-{index}-{n // 100}", args_digest="hmac-sha256:" + secrets.token_hex(32),
        result_digest="hmac-sha256:" + secrets.token_hex(32),
    )


def writer_process(index: int, url: str, server: str, key: bytes, rate: int, seconds: float, interval: float,
                   barrier: Any, results: Any) -> None:
    """One writer: its own store and chain; a batch every `interval` of the events due at `rate`."""
    from portcullis.gateway.audit.chain import ChainWriter
    from portcullis.gateway.audit.postgres import PostgresAuditStore

    async def main() -> dict[str, Any]:
        store = PostgresAuditStore(url)
        opened = time.perf_counter()
        await store.open()
        open_s = time.perf_counter() - opened
        chain = ChainWriter(key, f"bench-writer-{index}/{secrets.token_hex(3)}")
        barrier.wait(timeout=60)  # all writers start together
        total = int(rate * seconds)
        latencies: list[float] = []
        late = 0
        sent = 0
        cpu0 = time.process_time()
        start = time.perf_counter()
        tick = 0
        try:
            while sent < total:
                now = time.perf_counter() - start
                due = min(total, int(now * rate)) - sent
                if due > 0:
                    batch = [chain.link(_event(index, sent + i, server)) for i in range(min(due, 500))]
                    began = time.perf_counter()
                    await store.append(batch)
                    took = time.perf_counter() - began
                    latencies.append(took * 1000)
                    late += took > interval
                    sent += len(batch)
                tick += 1
                pause = start + tick * interval - time.perf_counter()
                if pause > 0:
                    await asyncio.sleep(pause)
                else:
                    tick = int((time.perf_counter() - start) / interval)  # behind: do not burst to catch up
            elapsed = time.perf_counter() - start
        finally:
            await store.close()
        return {"index": index, "writer": chain.writer, "events": sent, "seconds": elapsed, "rate": sent / elapsed,
                "batches": len(latencies), "batch_ms": latencies, "late_batches": late, "open_s": open_s,
                "cpu_us_per_event": (time.process_time() - cpu0) / max(1, sent) * 1e6, "head": [chain.seq, chain.head]}

    try:
        results.put(asyncio.run(main()))
    except BaseException as exc:
        results.put({"index": index, "error": f"{type(exc).__name__}: {exc}"})
        raise


def run_writers(url: str, server: str, key: bytes, count: int, rate: int, seconds: float, interval: float) -> list[dict[str, Any]]:
    """`count` writer processes started together; their reports, by index."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(count)
    results = ctx.Queue()
    procs = [ctx.Process(target=writer_process, args=(i, url, server, key, rate, seconds, interval, barrier, results))
             for i in range(count)]
    for p in procs:
        p.start()
    rows: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds + 120
    try:
        while len(rows) < count:
            try:
                rows.append(results.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue_module.Empty:
                raise RuntimeError(f"only {len(rows)} of {count} writers reported within the deadline") from None
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.terminate()
                p.join(10)
    errors = [r for r in rows if "error" in r]
    if errors:
        raise RuntimeError(f"writers failed: {errors}")
    return sorted(rows, key=lambda r: r["index"])


def writers_step(pg: Any, s: Settings, report: Report, log: Log) -> None:
    from portcullis.gateway.audit.postgres import PostgresAuditStore
    from portcullis.gateway.audit.trail import verify_audit

    url = pg.create_database("bench_writers")
    key = secrets.token_bytes(32)
    # The same writer alone first (another server, same database): what a batch costs without the other three.
    alone_s = min(3.0, s.writer_seconds)
    (alone,) = run_writers(url, "bench/writer-alone", key, 1, s.writer_rate, alone_s, s.batch_interval)
    report.writers["alone"] = {k: v for k, v in alone.items() if k != "batch_ms"} | {
        "p50_ms": load.percentile(alone["batch_ms"], 50), "p99_ms": load.percentile(alone["batch_ms"], 99),
        "max_ms": max(alone["batch_ms"])}
    a = report.writers["alone"]
    log(f"  one writer alone, {alone_s:g} s: {a['rate']:.0f} events/s, batch p50 {a['p50_ms']:.2f} ms p99 {a['p99_ms']:.2f} ms, "
        f"CPU {a['cpu_us_per_event']:.0f} µs/event")
    load_before = _loadavg()
    rows = run_writers(url, WRITERS_SERVER, key, s.writers, s.writer_rate, s.writer_seconds, s.batch_interval)

    async def check() -> dict[str, Any]:
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            per_writer = {w: int(n) for w, n in await conn.fetch(
                "SELECT writer, count(*) FROM audit_events WHERE server = $1 GROUP BY writer", WRITERS_SERVER)}
            partitions = int(await conn.fetchval("SELECT count(*) FROM pg_class WHERE relname LIKE 'audit_events_s_%_d%'"))
        finally:
            await conn.close()
        store = PostgresAuditStore(url)
        try:
            started = time.perf_counter()
            verdict = await verify_audit(store, key, WRITERS_SERVER, None, None,
                                         heads={r["writer"]: (r["head"][0], r["head"][1]) for r in rows})
            verify_s = time.perf_counter() - started
        finally:
            await store.close()
        return {"per_writer": per_writer, "partitions": partitions, "verify": verdict.to_dict(), "verify_seconds": verify_s}

    checked = asyncio.run(check())
    expected = sum(r["events"] for r in rows)
    stored = sum(checked["per_writer"].values())
    all_ms = [v for r in rows for v in r["batch_ms"]]
    report.writers |= {
        "loadavg_before": load_before, "loadavg_after": _loadavg(),
        "rows": [{k: v for k, v in r.items() if k != "batch_ms"}
                 | {"p50_ms": load.percentile(r["batch_ms"], 50), "p99_ms": load.percentile(r["batch_ms"], 99),
                    "max_ms": max(r["batch_ms"]), "first_ms": r["batch_ms"][0],
                    "stored": checked["per_writer"].get(r["writer"], 0)} for r in rows],
        "all_p50_ms": load.percentile(all_ms, 50), "all_p99_ms": load.percentile(all_ms, 99), "all_max_ms": max(all_ms),
        "expected": expected, "stored": stored, "verify_ok": checked["verify"]["ok"], "verify_events": checked["verify"]["events"],
        "verify_writers": checked["verify"]["writers"], "verify_first": checked["verify"]["first"],
        "verify_seconds": checked["verify_seconds"], "partitions": checked["partitions"],
    }
    for r in report.writers["rows"]:
        log(f"  writer {r['index']}: {r['events']} events in {r['seconds']:.2f} s = {r['rate']:.0f}/s, {r['batches']} batches, "
            f"batch p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms max {r['max_ms']:.1f} ms, {r['late_batches']} late, "
            f"CPU {r['cpu_us_per_event']:.0f} µs/event, stored {r['stored']}")
    w = report.writers
    log(f"  total stored {stored} of {expected}; verify_audit ok={w['verify_ok']} ({w['verify_events']} events, "
        f"{w['verify_writers']} writers, {w['verify_seconds']:.1f} s)")
    _drop_database(pg, "bench_writers")


# --- step 4: pruning ---------------------------------------------------------------------------------------

FILL_SQL = """
INSERT INTO audit_events (time_us, writer, seq, prev_hash, hash, request_id, server, tenant, user_id, method, tool,
    connection, decision, reason, outcome, latency_ms, upstream_ms, jti, agent_run_id, args_digest, result_digest, detail, kind)
SELECT {base} + g * {step}, 'fill/' || (g % 4), g / 4 + 1, lpad(to_hex(g), 64, '0'), lpad(to_hex(g + 1), 64, '0'),
       lpad(to_hex(g), 32, '0'), '{server}', 'bench', 'user-' || (g % 1000) || '@example.com', 'tools/call', 'echo', 'fast',
       'allow', 'allowlisted', 'ok', 0.8, 0.05, lpad(to_hex(g % 100000), 32, '0'), NULL,
       'hmac-sha256:' || lpad(to_hex(g), 64, '0'), 'hmac-sha256:' || lpad(to_hex(g), 64, 'f'), NULL, 'portcullis.audit/v1'
FROM generate_series($1::bigint, $2::bigint - 1) AS g
"""

_DURATION = re.compile(r"duration: ([0-9.]+) ms\s+(statement|execute [^:]*|parse [^:]*|bind [^:]*): (.*)")


def _drop_database(pg: Any, name: str) -> float:
    async def drop() -> None:
        import asyncpg

        conn = await asyncpg.connect(pg.url_for("postgres"))
        try:
            await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    started = time.perf_counter()
    asyncio.run(drop())
    return time.perf_counter() - started


def _statement_log(text: str) -> list[dict[str, Any]]:
    """PostgreSQL's `duration: ... statement: ...` entries (asyncpg's parse/bind/execute steps included); a
    multi-line statement continues on lines that start with a tab."""
    out: list[dict[str, Any]] = []
    continuing = False
    for line in text.splitlines():
        match = _DURATION.search(line)
        if match:
            out.append({"ms": float(match[1]), "step": match[2].split()[0], "statement": match[3]})
            continuing = True
        elif continuing and line.startswith("\t"):
            out[-1]["statement"] += " " + line
        else:
            continuing = False
    for entry in out:
        entry["statement"] = " ".join(entry["statement"].split())[:200]
    return out


def prune_step(pg: Any, s: Settings, report: Report, log: Log) -> None:
    from portcullis.gateway.audit.chain import ChainWriter
    from portcullis.gateway.audit.events import AuditEvent
    from portcullis.gateway.audit.postgres import PostgresAuditStore, day_table

    n = s.prune_rows
    free = shutil.disk_usage(pg.root).free
    need = n * 2200 + 2 * 1024**3  # about 850 B/row of table and indexes, as much WAL, and a margin
    log(f"  disk: {free / 1024**3:.1f} GiB free at {pg.root}, about {need / 1024**3:.1f} GiB needed")
    if free < need:
        raise RuntimeError(f"not enough disk for {n:,} rows: {free / 1024**3:.1f} GiB free, {need / 1024**3:.1f} GiB needed")
    url = pg.create_database("bench_prune")
    day = int(time.time() * 1_000_000) // DAY_US - 100  # a day as old as a 90-day retention would prune
    partition = day_table(PRUNE_SERVER, day)

    async def fill() -> dict[str, Any]:
        import asyncpg

        store = PostgresAuditStore(url)
        try:
            chain = ChainWriter(secrets.token_bytes(32), "bench-prune-real")
            event = AuditEvent(
                time_us=day * DAY_US + 1_000, request_id=secrets.token_hex(16), server=PRUNE_SERVER, tenant="bench",
                user="user-0@example.com", method="tools/call", tool="echo", connection="fast", decision="allow",
                reason="allowlisted", outcome="ok", latency_ms=0.8, upstream_ms=0.05,
            )
            await store.append([chain.link(event)])  # creates the day's partition (and the next day's) the store's way
        finally:
            await store.close()
        synthetic = n - 1
        base = day * DAY_US + 1_000_000
        step = (DAY_US - 2_000_000) // max(1, synthetic)
        sql = FILL_SQL.format(base=base, step=step, server=PRUNE_SERVER)
        conns = [await asyncpg.connect(url, command_timeout=None) for _ in range(2)]
        try:
            chunk = max(1, -(-synthetic // 10))
            ranges = [(lo, min(synthetic, lo + chunk)) for lo in range(0, synthetic, chunk)]
            started = time.perf_counter()
            done = 0
            for i in range(0, len(ranges), 2):
                pair = ranges[i:i + 2]
                await asyncio.gather(*(conn.execute(sql, lo, hi) for conn, (lo, hi) in zip(conns, pair, strict=False)))
                done += sum(hi - lo for lo, hi in pair)
                elapsed = time.perf_counter() - started
                log(f"  filled {done + 1:,}/{n:,} rows in {elapsed:.0f} s ({done / elapsed:,.0f} rows/s)")
            fill_s = time.perf_counter() - started
            rows = int(await conns[0].fetchval(f'SELECT count(*) FROM "{partition}"'))
            started = time.perf_counter()
            await conns[0].execute(f'VACUUM (ANALYZE) "{partition}"')
            vacuum_s = time.perf_counter() - started
            started = time.perf_counter()
            await conns[0].execute("CHECKPOINT")
            checkpoint_s = time.perf_counter() - started
            size = int(await conns[0].fetchval("SELECT pg_total_relation_size(to_regclass($1))", partition))
            heap = int(await conns[0].fetchval("SELECT pg_relation_size(to_regclass($1))", partition))
            partitions_before = [r[0] for r in await conns[0].fetch(
                "SELECT relname FROM pg_class WHERE relname LIKE 'audit_events_s_%_d%' AND relkind = 'r' ORDER BY relname")]
        finally:
            for conn in conns:
                await conn.close()
        return {"rows": rows, "fill_seconds": fill_s, "fill_rows_per_s": synthetic / fill_s, "vacuum_seconds": vacuum_s,
                "checkpoint_seconds": checkpoint_s, "partition_bytes": size, "heap_bytes": heap, "partition": partition,
                "partitions_before": partitions_before}

    filled = asyncio.run(fill())
    log(f"  partition {partition}: {filled['rows']:,} rows, {filled['partition_bytes'] / 1024**3:.2f} GiB with indexes; "
        f"VACUUM (ANALYZE) {filled['vacuum_seconds']:.1f} s, CHECKPOINT {filled['checkpoint_seconds']:.1f} s")
    server_log = pg.root / "server.log"
    span = [0, 0]  # the server log's byte range written during the prune
    before_us = (day + 1) * DAY_US + DAY_US // 2  # midday of the day after: the filled day is wholly older

    async def prune() -> dict[str, Any]:
        import asyncpg

        # A live writer of the same server (today's partitions), appending at the writers' rate before, during and
        # after the prune: does pruning stall it? Its session is opened before statement logging is switched on.
        live = PostgresAuditStore(url)
        await live.open()
        chain = ChainWriter(secrets.token_bytes(32), "bench-prune-live")
        await live.append([chain.link(_event(0, 0, PRUNE_SERVER))])
        conn = await asyncpg.connect(url)
        try:  # log every statement of the sessions opened from now on (the prune's pool), on this database only
            await conn.execute("ALTER DATABASE bench_prune SET log_min_duration_statement = 0")
        finally:
            await conn.close()
        live_batches: list[tuple[float, float, int]] = []  # (start, ms, events)
        stop = asyncio.Event()

        async def live_writer() -> None:
            sent, tick, t0 = 0, 0, time.perf_counter()
            while not stop.is_set():
                due = int((time.perf_counter() - t0) * s.writer_rate) - sent
                if due > 0:
                    batch = [chain.link(_event(0, sent + i, PRUNE_SERVER)) for i in range(min(due, 500))]
                    began = time.perf_counter()
                    await live.append(batch)
                    live_batches.append((began, (time.perf_counter() - began) * 1000, len(batch)))
                    sent += len(batch)
                tick += 1
                pause = t0 + tick * s.batch_interval - time.perf_counter()
                if pause > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), pause)
                else:
                    tick = int((time.perf_counter() - t0) / s.batch_interval)

        store = PostgresAuditStore(url)
        writer = asyncio.create_task(live_writer())
        try:
            await store.open()
            await asyncio.sleep(1.0)  # the live writer's baseline
            span[0] = server_log.stat().st_size
            started = time.perf_counter()
            result = await store.prune(PRUNE_SERVER, before_us)
            ended = time.perf_counter()
            prune_s = ended - started
            span[1] = server_log.stat().st_size
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            await writer
            await store.close()
            await live.close()
        during = [ms for began, ms, _ in live_batches if began + ms / 1000 >= started and began <= ended]
        outside = [ms for began, ms, _ in live_batches if not (began + ms / 1000 >= started and began <= ended)]
        conn = await asyncpg.connect(url)
        try:
            left = int(await conn.fetchval("SELECT count(*) FROM audit_events WHERE server = $1 AND time_us < $2",
                                           PRUNE_SERVER, (day + 1) * DAY_US))
            live_stored = int(await conn.fetchval("SELECT count(*) FROM audit_events WHERE server = $1 AND writer = $2",
                                                  PRUNE_SERVER, chain.writer))
            anchors = int(await conn.fetchval("SELECT count(*) FROM audit_anchors WHERE server = $1", PRUNE_SERVER))
            recorded = await conn.fetchrow("SELECT removed, before_us FROM audit_prunes WHERE server = $1", PRUNE_SERVER)
            gone = await conn.fetchval("SELECT to_regclass($1) IS NULL", partition)
        finally:
            await conn.close()
        return {"live_batches_during": len(during), "live_max_ms_during": max(during, default=float("nan")),
                "live_p50_ms_during": load.percentile(during, 50), "live_p50_ms_outside": load.percentile(outside, 50),
                "live_max_ms_outside": max(outside, default=float("nan")), "live_events": chain.seq, "live_stored": live_stored,
                "prune_seconds": prune_s, "removed": result.removed, "before_us": before_us, "edge_us": result.before_us,
                "anchors": len(result.anchors), "anchors_stored": anchors, "left": left,
                "prune_row": dict(recorded) if recorded else None, "partition_dropped": bool(gone)}

    pruned = asyncio.run(prune())
    with open(server_log, "rb") as fh:
        fh.seek(span[0])
        logged = fh.read(span[1] - span[0]).decode(errors="replace")
    statements = _statement_log(logged)
    drop_s = _drop_database(pg, "bench_prune")
    report.prune = {**filled, **pruned, "statements": statements, "statement_log": logged[:50_000], "drop_database_seconds": drop_s}
    log(f"  prune: {pruned['removed']:,} rows removed in {pruned['prune_seconds']:.2f} s ({pruned['anchors']} chains anchored, "
        f"partition dropped: {pruned['partition_dropped']}); database dropped in {drop_s:.1f} s")
    log(f"  live writer of the same server: {pruned['live_batches_during']} batches during the prune, p50 "
        f"{pruned['live_p50_ms_during']:.1f} ms, max {pruned['live_max_ms_during']:.0f} ms (outside it: p50 "
        f"{pruned['live_p50_ms_outside']:.1f} ms, max {pruned['live_max_ms_outside']:.0f} ms); "
        f"{pruned['live_stored']:,}/{pruned['live_events']:,} of its events stored")
    top = sorted(statements, key=lambda st: -st["ms"])[:4]
    for st in top:
        log(f"    {st['ms']:9.1f} ms  {st['step']}: {st['statement'][:110]}")


# --- report --------------------------------------------------------------------------------------------


def render(report: Report) -> str:
    s = report.settings
    m = report.machine
    out: list[str] = []
    out.append("## Portcullis audit store cost (none vs SQLite vs PostgreSQL)\n")
    out.append(f"Gateway source: {m['gateway_source']}; audit code (operator/portcullis/gateway/audit/{{{','.join(AUDIT_SOURCES)}}}) "
               f"sha256 prefix {m.get('audit_source', '?')}. Machine: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, "
               f"Python {m['python']}; shared and noisy, so configurations are interleaved and repeated and medians reported.")
    out.append("Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
               + f", asyncpg {m.get('asyncpg', '?')}, SQLite {m.get('sqlite', '?')}; load generator: {s['generator_used']}"
               + (f" ({m['wrk']})" if s["generator_used"] == "wrk" else "") + ".")
    pgf = report.postgres
    if pgf:
        out.append(f"PostgreSQL {pgf['version']} on 127.0.0.1 (the test suite's throwaway cluster, "
                   + ("its own settings" if s["pg_test_settings"] else "restarted with default durability") + "): "
                   + ", ".join(f"{k}={v}" for k, v in pgf["settings"].items()) + ".")
    out.append(f"Placement: {s['placement']}; PostgreSQL with the upstreams and the load generator in steps 1-2, "
               "on every core in steps 3-4.")
    out.append("SQLite: the gateway's default store, `<state>/audit/audit.db`, WAL mode, `synchronous=NORMAL` (a commit is not "
               "fsynced; the WAL is at checkpoints), written from a worker thread in the gateway process.\n")

    seq = report.sequential
    if seq:
        summary = seq[0]
        out.append("### 1. Per-call cost, sequential lean client\n")
        out.append(f"{s['rounds']} rounds; per round one block per gateway (order rotating every round): {s['block_warmup']} "
                   f"unmeasured then {s['calls']} measured back-to-back calls on one keep-alive connection, then the same "
                   "60 ms pause and `GET /v1/status` for every gateway (the store's queue is empty before the next block, "
                   "so each store's background writes land in its own block). Only one gateway is busy at a time, all on "
                   "the same core. Percentiles are over all measured calls of a gateway (its blocks are spread over the "
                   "same minutes as the others', so slow drift of this shared machine affects all alike); \"added\" is the "
                   "difference to `none`, with a 95% bootstrap interval (resampling whole rounds); \"block p50 diff\" is "
                   "the median and range over rounds of the per-round p50 difference. CPU = the gateway's utime+stime "
                   "over its blocks (pause and status read included) per call. `none-b` is a second, identical `none` "
                   "gateway: an A/A control for what \"adds nothing\" measures here.\n")
        out.append("| gateway | calls | p50 ms | p99 ms | **added p50 ms** [95% CI] | block p50 diff ms, median [range] | "
                   "added p99 ms [95% CI] | CPU µs/call | **CPU added µs/call** [95% CI] | batches | events per batch | "
                   "write ms per batch | failures |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for st in SEQUENTIAL:
            row = summary.get(st)
            if row is None:
                continue
            label = f"{CONTROL} (A/A control)" if st == CONTROL else st
            if st == "none":
                added = "– | – | – "
                cpu_added = "–"
            else:
                lo, hi = row["added_p50_ci"]
                plo, phi = row["added_p99_ci"]
                clo, chi = row["added_cpu_ci"]
                rd = row["round_added_p50_ms"]
                added = (f"**{row['added_p50_ms']:+.3f}** [{lo:+.3f}, {hi:+.3f}] | {_median(rd):+.3f} [{_range(rd, '{:+.3f}')}] | "
                         f"{row['added_p99_ms']:+.3f} [{plo:+.3f}, {phi:+.3f}] ")
                cpu_added = f"**{row['added_cpu_us_per_call']:+.0f}** [{clo:+.0f}, {chi:+.0f}]"
            batches = (f"{row['batches']:,.0f} | {row['events_per_batch']:.1f} | {row['write_ms_mean']:.2f}" if "batches" in row
                       else "– | – | –")
            out.append(f"| {label} | {row['calls']:,} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} | {added}| "
                       f"{row['cpu_us_per_call']:.0f} | {cpu_added} | {batches} | {row['failures']} |")
        verdicts = []
        for st in ("sqlite", "postgres"):
            row = summary.get(st)
            if row:
                v, hi = row["added_p50_ms"], row["added_p50_ci"][1]
                verdicts.append(f"{st} adds {v:+.3f} ms at p50 (95% CI up to {hi:+.3f}): "
                                + ("**met**" if v <= TARGET_P50_MS and hi <= TARGET_P50_MS else
                                   "**met** at the estimate, but the interval reaches past it" if v <= TARGET_P50_MS else "**MISSED**"))
        out.append(f"\nTarget (the issue): the audit store adds at most {TARGET_P50_MS} ms at p50. " + "; ".join(verdicts) + ".")

    if report.load:
        out.append("\n### 2. Sustained rate, every event durable\n")
        out.append(f"{s['generator_used']}, {s['load_seconds']:g} s per run, {s['load_reps']} run(s) per store and "
                   "concurrency, interleaved; median [min – max]. The queue drain time is how long after the run the "
                   "gateway's audit queue took to reach 0.\n")
        out.append("| connections | store | calls/s | vs none | p50 ms | p99 ms | gateway CPU µs/call | queue drained in s | failures |")
        out.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        for c in CONCURRENCY:
            base = _median([r["rps"] for r in report.load if r["connections"] == c and r["store"] == "none"])
            for st in STORES:
                rows = [r for r in report.load if r["connections"] == c and r["store"] == st]
                if not rows:
                    continue
                rps = [r["rps"] for r in rows]
                none_rps = [r["rps"] for r in report.load if r["connections"] == c and r["store"] == "none"]
                overlap = st != "none" and min(rps) <= max(none_rps) and min(none_rps) <= max(rps)
                out.append(f"| {c} | {st} | {_median(rps):,.0f} [{_range(rps, '{:,.0f}')}] | {_median(rps) / base:.2f}"
                           f"{' (ranges overlap)' if overlap else ''} | "
                           f"{_median([r['p50_ms'] for r in rows]):.2f} | {_median([r['p99_ms'] for r in rows]):.2f} | "
                           f"{_median([r['cpu_us_per_call'] for r in rows]):.0f} | {max(r['drain_s'] for r in rows):.2f} | "
                           f"{sum(r['failures'] for r in rows)} |")
    if report.durability:
        out.append("\nAfterwards (every call of steps 1-2 and the warm-up, per gateway): `GET /v1/status` audit fields, "
                   "`/metrics` counters for the server, the upstream's own count of arrivals, and the store's count.\n")
        out.append("| store | queueDepth | failing | client answers | `calls_total` (tools/call) | upstream arrivals | "
                   "stored tools/call | other stored | every call stored | dropped | refused | unaudited | write failures | "
                   "batches (mean events, mean write ms) | `/v1/audit/verify` |")
        out.append("|---|---:|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---|---|")
        for st, d in report.durability.items():
            batches = (f"{d['batches']:.0f} ({d['written'] / d['batches']:.0f}, {d['write_seconds_sum'] / d['batches'] * 1000:.2f})"
                       if d["batches"] else "–")
            verify = (f"ok={d['verify']['ok']}, {d['verify']['events']} events, {d['verify']['writers']} writer(s), "
                      f"{d['verify_seconds']:.1f} s" if "verify" in d else "–")
            out.append(f"| {st} | {d['queue_depth']} | {d['failing']} | {d['client_answers']:,} | {d['tools_call_total']:,.0f} | "
                       f"{d['upstream_calls']:,} | {d.get('stored_tools_call', '–') if st != 'none' else '–'} | "
                       f"{d.get('stored_other', '–') or '–'} | {'yes' if d['every_call_stored'] else '**NO**'} | "
                       f"{d['dropped']:.0f} | {d['refused']:.0f} | {d['unaudited']:.0f} | {d['write_failures']:.0f} | {batches} | {verify} |")
        out.append("\n\"Client answers\" counts answers the clients read; a load run that ends with calls in flight leaves a "
                   "few answered calls uncounted, so it is a lower bound. Every call stored = stored tools/call events = "
                   "the gateway's `portcullis_calls_total{method=\"tools/call\"}` = the upstream's arrivals ≥ client answers. "
                   "Other stored events are the gateway's own retention passes (`audit/prune`).")

    w = report.writers
    if w:
        out.append(f"\n### 3. {s['writers']} writers into one PostgreSQL at {s['writer_rate']:,} events/s each\n")
        out.append(f"{s['writers']} processes (multiprocessing, spawn), each its own `PostgresAuditStore` (asyncpg pool) and "
                   f"`ChainWriter` (one random 32-byte chain key, distinct writer ids, server `{WRITERS_SERVER}`); a batch "
                   f"every {s['batch_interval'] * 1000:.0f} ms holding the events due, for {s['writer_seconds']:g} s. "
                   "Batch latency is `store.append` (one `INSERT ... SELECT FROM unnest`, commit included); the first batch "
                   "of each writer also creates partitions (or finds them). Writer CPU = the process's CPU per event "
                   "(building, linking, encoding).\n")
        out.append("| writer | events | seconds | events/s | batches | batch p50 ms | batch p99 ms | max ms | first batch ms | "
                   "batches over 50 ms | writer CPU µs/event | stored |")
        out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in w["rows"]:
            out.append(f"| {r['index']} | {r['events']:,} | {r['seconds']:.2f} | {r['rate']:,.0f} | {r['batches']} | {r['p50_ms']:.2f} | "
                       f"{r['p99_ms']:.2f} | {r['max_ms']:.1f} | {r['first_ms']:.1f} | {r['late_batches']} | "
                       f"{r['cpu_us_per_event']:.0f} | {r['stored']:,} |")
        total_rate = sum(r["rate"] for r in w["rows"])
        out.append(f"| all | {w['expected']:,} | | {total_rate:,.0f} | {sum(r['batches'] for r in w['rows'])} | {w['all_p50_ms']:.2f} | "
                   f"{w['all_p99_ms']:.2f} | {w['all_max_ms']:.1f} | | | | {w['stored']:,} |")
        if "alone" in w:
            a = w["alone"]
            out.append(f"| one writer alone (before; server `bench/writer-alone`) | {a['events']:,} | {a['seconds']:.2f} | {a['rate']:,.0f} | "
                       f"{a['batches']} | {a['p50_ms']:.2f} | {a['p99_ms']:.2f} | {a['max_ms']:.1f} | | {a['late_batches']} | "
                       f"{a['cpu_us_per_event']:.0f} | |")
        out.append(f"\nRows stored: {w['stored']:,} of {w['expected']:,} appended ({'all' if w['stored'] == w['expected'] else '**NOT ALL**'}). "
                   f"`verify_audit` (with every writer's head): ok={w['verify_ok']}, {w['verify_events']:,} events, "
                   f"{w['verify_writers']} chains, {w['verify_seconds']:.1f} s"
                   + (f"; first break: {w['verify_first']}" if w["verify_first"] else "") + ".")

    p = report.prune
    if p:
        out.append(f"\n### 4. Pruning a day of {p['rows']:,} events\n")
        out.append(f"One real event appended through `PostgresAuditStore.append` created the day partition `{p['partition']}` "
                   f"(and the next day's); {p['rows'] - 1:,} synthetic rows (4 writers, 1,000 users, every column filled as a "
                   "real event's, hashes synthetic) were inserted server-side through the partitioned table, from 2 sessions. "
                   "Then `VACUUM (ANALYZE)` and `CHECKPOINT` (a day-old partition has been vacuumed; neither is part of "
                   "the prune), and `store.prune(server, before)` with `before` at midday of the next day.\n")
        out.append("| rows | fill s (rows/s) | partition size (heap) | vacuum s | checkpoint s | **prune s** | rows removed | "
                   "chains anchored | partition dropped | rows left | drop database s |")
        out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
        out.append(f"| {p['rows']:,} | {p['fill_seconds']:.0f} ({p['fill_rows_per_s']:,.0f}) | "
                   f"{p['partition_bytes'] / 1024**3:.2f} GiB ({p['heap_bytes'] / 1024**3:.2f} GiB) | {p['vacuum_seconds']:.1f} | "
                   f"{p['checkpoint_seconds']:.1f} | **{p['prune_seconds']:.2f}** | {p['removed']:,} | {p['anchors']} | "
                   f"{'yes' if p['partition_dropped'] else 'NO'} | {p['left']} | {p['drop_database_seconds']:.1f} |")
        statements = p.get("statements") or []
        if statements:
            total = sum(st["ms"] for st in statements)
            out.append(f"\nWhere the prune's time goes (PostgreSQL's own statement log for the prune's session; "
                       f"{len(statements)} logged steps, {total / 1000:.2f} s in all; the largest):\n")
            out.append("| ms | step | statement |")
            out.append("|---:|---|---|")
            for st in sorted(statements, key=lambda st: -st["ms"])[:6]:
                text = st["statement"].replace("|", "\\|")
                out.append(f"| {st['ms']:,.1f} | {st['step']} | `{text[:140]}` |")
        if "live_batches_during" in p:
            out.append(f"\nA live writer of the same server (one `PostgresAuditStore`, a batch every {s['batch_interval'] * 1000:.0f} ms at "
                       f"{s['writer_rate']:,} events/s into today's partition) ran from 1 s before to 1 s after the prune: "
                       f"{p['live_batches_during']} of its batches overlapped the prune, p50 {p['live_p50_ms_during']:.1f} ms, "
                       f"**max {p['live_max_ms_during']:,.0f} ms** (outside the prune: p50 {p['live_p50_ms_outside']:.1f} ms, max "
                       f"{p['live_max_ms_outside']:,.0f} ms); {p['live_stored']:,} of its {p['live_events']:,} events stored.")
    if report.loadavg:
        out.append("\nMachine load (1-minute load average, runnable/total tasks) when each step started: "
                   + "; ".join(f"{k}: {v}" for k, v in report.loadavg.items())
                   + ". Other work on this shared machine runs beside the benchmark; the interleaving is what keeps it "
                   "from favouring one configuration.")
    if report.notes:
        out.append("\nNotes:\n" + "\n".join(f"- {n}" for n in report.notes))
    if report.commands:
        out.append("\nCommands:\n\n```\n" + "\n".join(dict.fromkeys(report.commands)) + "\n```")
    return "\n".join(out) + "\n"


# --- main -------------------------------------------------------------------------------------------------


AUDIT_SOURCES = ("trail.py", "store.py", "sqlite.py", "postgres.py", "chain.py", "events.py", "keys.py", "recorder.py", "sinks.py")


def audit_source_digest() -> str:
    """A short digest of the audit code measured (operator/portcullis/gateway/audit/), to tell runs apart."""
    import hashlib

    digest = hashlib.sha256()
    for name in AUDIT_SOURCES:
        path = stack.REPO / "operator" / "portcullis" / "gateway" / "audit" / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.exists() else b"") + b"\0")
    return digest.hexdigest()[:12]


def run(s: Settings, log: Log, argv_shown: str) -> Report:
    wrk = load.wrk_path() if s.generator in ("auto", "wrk") else None
    if s.generator == "wrk" and wrk is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install -y wrk); use --generator python")
    if wrk is None and s.generator == "auto" and 2 in s.steps:
        log("wrk not found (Debian: apt-get install -y wrk): the Python generator is used; it caps below the gateway at 64 connections")
    where = placement(s.pin)
    info = machine(wrk)
    import asyncpg

    info["asyncpg"] = asyncpg.__version__
    info["audit_source"] = audit_source_digest()
    info["sqlite"] = sqlite3.sqlite_version
    report = Report(settings={**asdict(s), "generator_used": "wrk" if wrk else "python", "placement": where.describe(),
                              "command": argv_shown}, machine=info)
    report.commands.append(argv_shown)
    allowed = sorted(os.sched_getaffinity(0))
    if where.client:
        os.sched_setaffinity(0, where.client)  # the harness, and PostgreSQL started from it, beside the generator
    with tempfile.TemporaryDirectory(prefix="portcullis-audit-bench-") as tmp, postgres_cluster(s.pg_test_settings, log) as pg:
        report.postgres = asyncio.run(_pg_facts(pg.url))
        if where.client:
            pin_cluster(pg, where.client)
        if 1 in s.steps or 2 in s.steps:
            gateway_steps(pg, s, wrk, where, report, Path(tmp), log)
        if 3 in s.steps or 4 in s.steps:
            os.sched_setaffinity(0, allowed)
            pin_cluster(pg, allowed)
        if 3 in s.steps:
            report.loadavg["step 3"] = _loadavg()
            log(f"step 3/4: {s.writers} writers x {s.writer_rate:,} events/s into one PostgreSQL for {s.writer_seconds:g} s")
            writers_step(pg, s, report, log)
        if 4 in s.steps:
            report.loadavg["step 4"] = _loadavg()
            log(f"step 4/4: pruning a day of {s.prune_rows:,} events")
            prune_step(pg, s, report, log)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 1 s load runs, 2 s writers, 1,000,000-row prune")
    parser.add_argument("--rounds", type=int, help="step 1: rounds (blocks per store)")
    parser.add_argument("--calls", type=int, help="step 1: measured calls per block")
    parser.add_argument("--seconds", type=float, help="step 2: seconds per load run")
    parser.add_argument("--reps", type=int, help="step 2: runs per store and concurrency")
    parser.add_argument("--writer-seconds", type=float, help="step 3: seconds the writers run")
    parser.add_argument("--prune-rows", type=int, help="step 4: rows in the pruned day")
    parser.add_argument("--steps", default="1,2,3,4", help="which steps to run, e.g. 1,2 (default: all)")
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--pg-test-settings", action="store_true", help="keep the test suite's PostgreSQL settings (fsync off)")
    parser.add_argument("--json", type=Path, help="also write every raw figure as JSON here")
    parser.add_argument("--out", type=Path, help=f"the markdown report (default: {RESULTS.relative_to(stack.REPO)} for a full run, none for --quick)")
    parser.add_argument("--gateway-executable", help="run this instead of `portcullis` (same CLI)")
    parser.add_argument("--from-json", type=Path, help="measure nothing: render the report of a run saved with --json")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = Report(**json.loads(args.from_json.read_text()))
        text = render(saved) + f"\nTotal wall time: {saved.settings.get('wall_seconds', '?')} s.\n"
        print(text)
        if args.out:
            args.out.write_text(text)
        return 0

    s = Settings.quick() if args.quick else Settings()
    for name, value in (("rounds", args.rounds), ("calls", args.calls), ("load_seconds", args.seconds), ("load_reps", args.reps),
                        ("writer_seconds", args.writer_seconds), ("prune_rows", args.prune_rows)):
        if value is not None:
            setattr(s, name, value)
    if s.prune_rows < 2:
        parser.error("--prune-rows must be at least 2")
    s.steps = tuple(sorted({int(x) for x in args.steps.split(",") if x.strip()}))
    s.generator = args.generator
    s.pin = not args.no_pin
    s.pg_test_settings = args.pg_test_settings
    if args.gateway_executable:
        stack.GATEWAY_EXECUTABLE = args.gateway_executable
    out = args.out if args.out is not None else (None if args.quick else RESULTS)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    shown = ".venv/bin/python benchmarks/audit_store.py" + ("" if not (argv if argv is not None else sys.argv[1:]) else
                                                            " " + " ".join(argv if argv is not None else sys.argv[1:]))
    started = time.monotonic()
    report = run(s, log, shown)
    report.settings["wall_seconds"] = round(time.monotonic() - started, 1)
    after = audit_source_digest()
    if after != report.machine["audit_source"]:
        report.notes.append(f"The audit code changed while this ran (sha256 prefix {report.machine['audit_source']} at the start, "
                            f"{after} at the end): steps may have measured different code.")
    text = render(report) + f"\nTotal wall time: {report.settings['wall_seconds']} s.\n"
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        log(f"report written to {out}")
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
