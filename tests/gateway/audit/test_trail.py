"""The audit trail on the embedded SQLite store: chains that verify, tampering that does not,
retention that anchors, queries that page, and a store outage that loses nothing that fits."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio
import pytest
from prometheus_client import REGISTRY

from portcullis.gateway.audit import MemoryAuditSink
from portcullis.gateway.audit.chain import ChainWriter, StoredEvent, link_hash
from portcullis.gateway.audit.events import AuditEvent
from portcullis.gateway.audit.keys import AuditKey, MemoryAuditKeys
from portcullis.gateway.audit.sqlite import SqliteAuditStore
from portcullis.gateway.audit.store import AuditQuery, AuditStoreError, parse_time
from portcullis.gateway.audit.trail import DAY_US, AuditTrail, verify_audit

pytestmark = pytest.mark.anyio
SERVER = "acme/summarizer"
NOW_US = 1_796_000_000_000_000


def event(n: int, *, time_us: int | None = None, user: str = "ada@example.com", tool: str = "fetch_mails", **extra: object) -> AuditEvent:
    fields: dict[str, object] = dict(
        time_us=time_us if time_us is not None else NOW_US + n, request_id=f"r{n:06d}", server=SERVER, tenant="acme", user=user,
        method="tools/call", tool=tool, connection="inbox", decision="allow", reason="allowlisted", outcome="ok",
        latency_ms=1.25 + n / 1000, upstream_ms=0.5, jti="j1", agent_run_id=None,
    )
    fields.update(extra)
    return AuditEvent(**fields)  # type: ignore[arg-type]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteAuditStore]:
    store = SqliteAuditStore(tmp_path / "audit" / "audit.db")
    await store.open()
    yield store
    await store.close()


KEY = AuditKey(os.urandom(32))


async def stored_chain(store: SqliteAuditStore, count: int, writer: str = "pod-a/1/x", start_us: int = NOW_US) -> list[StoredEvent]:
    chain = ChainWriter(KEY.chain_key, writer)
    rows = [chain.link(event(i, time_us=start_us + i)) for i in range(count)]
    await store.append(rows)
    return rows


async def verify(store: SqliteAuditStore, **kwargs: object) -> dict[str, object]:
    return (await verify_audit(store, KEY.chain_key, SERVER, None, None, **kwargs)).to_dict()  # type: ignore[arg-type]


def sql(store: SqliteAuditStore, statement: str, *args: object) -> None:
    with sqlite3.connect(store.path) as conn:
        conn.execute(statement, args)


async def test_the_store_file_is_private_and_migrations_are_idempotent(store: SqliteAuditStore) -> None:
    assert store.path.stat().st_mode & 0o777 == 0o600
    again = SqliteAuditStore(store.path)
    await again.open()
    await again.close()
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT version FROM schema_migrations").fetchall() == [(1,)]


async def test_stored_events_round_trip_exactly_and_a_retried_batch_is_stored_once(store: SqliteAuditStore) -> None:
    rows = await stored_chain(store, 3)
    await store.append(rows)  # a retry after an unclear failure
    page = await store.query(AuditQuery(server=SERVER))
    assert [(r.event, r.writer, r.seq, r.prev_hash, r.hash) for r in page.events] == [
        (r.event, r.writer, r.seq, r.prev_hash, r.hash) for r in rows
    ]


async def test_an_intact_chain_verifies(store: SqliteAuditStore) -> None:
    await stored_chain(store, 50)
    await stored_chain(store, 20, writer="pod-b/1/y")
    report = await verify(store)
    assert report["ok"] and report["events"] == 70 and report["writers"] == 2


@pytest.mark.parametrize(
    ("tamper", "problem", "seq"),
    [
        ("UPDATE audit_events SET outcome = 'denied' WHERE seq = 7", "altered", 7),
        ("UPDATE audit_events SET user_id = 'mallory@example.com' WHERE seq = 3", "altered", 3),
        ("DELETE FROM audit_events WHERE seq = 5", "deleted", 6),
        ("DELETE FROM audit_events WHERE seq <= 4", "deleted", 5),
    ],
)
async def test_an_edited_or_deleted_row_is_named_by_verify(store: SqliteAuditStore, tamper: str, problem: str, seq: int) -> None:
    await stored_chain(store, 10)
    sql(store, tamper)
    first = (await verify(store))["first"]
    assert isinstance(first, dict)
    assert (first["problem"], first["seq"]) == (problem, seq)


async def test_an_inserted_row_is_named_by_verify(store: SqliteAuditStore) -> None:
    rows = await stored_chain(store, 10)
    # A forger copies row 5's link and writes a plausible event after it, renumbering nothing.
    forged = StoredEvent(event(99, time_us=rows[4].event.time_us, user="mallory@example.com"), rows[5].writer, 6, rows[4].hash, "f" * 64)
    sql(store, "UPDATE audit_events SET seq = seq + 1000 WHERE seq >= 6")
    await store.append([forged])
    sql(store, "UPDATE audit_events SET seq = seq - 999 WHERE seq >= 1006")
    first = (await verify(store))["first"]
    assert isinstance(first, dict) and (first["problem"], first["seq"]) == ("inserted", 6)


async def test_a_forged_chain_without_the_key_does_not_verify(store: SqliteAuditStore) -> None:
    forger = ChainWriter(os.urandom(32), "pod-z/1/z")  # the hashes are right, the key is not
    await store.append([forger.link(event(i)) for i in range(3)])
    first = (await verify(store))["first"]
    assert isinstance(first, dict) and first["problem"] == "altered" and first["writer"] == "pod-z/1/z"


async def test_a_chain_cut_short_at_its_end_is_caught_against_the_writers_head(store: SqliteAuditStore) -> None:
    rows = await stored_chain(store, 10)
    sql(store, "DELETE FROM audit_events WHERE seq > 8")
    first = (await verify(store, heads={rows[-1].writer: (10, rows[-1].hash)}))["first"]
    assert isinstance(first, dict) and (first["problem"], first["seq"]) == ("truncated", 9)


async def test_retention_removes_only_old_events_anchors_the_chain_and_verify_still_passes(store: SqliteAuditStore) -> None:
    # One chain: 20 events from 100 days ago, then 10 from yesterday.
    chain = ChainWriter(KEY.chain_key, "pod-a/1/x")
    rows = [chain.link(event(i, time_us=NOW_US - (100 if i < 20 else 1) * DAY_US + i)) for i in range(30)]
    await store.append(rows)
    result = await store.prune(SERVER, NOW_US - 90 * DAY_US)
    assert result.removed == 20
    assert [(a.writer, a.seq, a.hash) for a in result.anchors] == [(rows[19].writer, 20, rows[19].hash)]
    remaining = await store.query(AuditQuery(server=SERVER, limit=1000))
    assert [r.seq for r in remaining.events] == list(range(21, 31))
    report = await verify(store)
    assert report["ok"] and report["anchored"] == 1
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT server, removed FROM audit_prunes").fetchall() == [(SERVER, 20)]
    sql(store, "DELETE FROM audit_anchors")  # a pruning nobody recorded is a deletion
    first = (await verify(store))["first"]
    assert isinstance(first, dict) and first["problem"] == "deleted"


async def test_filters_and_cursor_paging_return_each_matching_event_once(store: SqliteAuditStore) -> None:
    chain = ChainWriter(KEY.chain_key, "pod-a/1/x")
    rows = [
        chain.link(event(i, user=("ada@example.com" if i % 2 else "bob@example.com"), tool=("send_mail" if i % 5 == 0 else "fetch_mails"),
                         outcome=("tool_error" if i % 7 == 0 else "ok"), agent_run_id=("run-1" if i < 10 else None)))
        for i in range(250)
    ]
    await store.append(rows)
    seen: list[str] = []
    cursor = None
    sizes = []
    while True:
        page = await store.query(AuditQuery(server=SERVER, limit=100, cursor=cursor))
        sizes.append(len(page.events))
        seen.extend(r.event.request_id for r in page.events)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert sizes == [100, 100, 50] and seen == [r.event.request_id for r in rows]
    ada_sends = await store.query(AuditQuery(server=SERVER, user="ada@example.com", tool="send_mail", limit=1000))
    assert [r.seq for r in ada_sends.events] == [r.seq for r in rows if r.event.user == "ada@example.com" and r.event.tool == "send_mail"]
    errors = await store.query(AuditQuery(outcome="tool_error", limit=1000))
    assert len(errors.events) == len([i for i in range(250) if i % 7 == 0])
    run = await store.query(AuditQuery(agent_run_id="run-1", limit=1000))
    assert len(run.events) == 10
    window = await store.query(AuditQuery(since_us=NOW_US + 100, until_us=NOW_US + 110, limit=1000))
    assert [r.event.time_us - NOW_US for r in window.events] == list(range(100, 110))


def test_times_are_ages_or_rfc3339() -> None:
    assert parse_time("30d", now=1_000_000_000) == (1_000_000_000 - 30 * 86400) * 1_000_000
    assert parse_time("2026-11-30T12:00:00Z") == 1_796_040_000_000_000
    with pytest.raises(ValueError, match="give an age"):
        parse_time("yesterday")


class FlakyStore(SqliteAuditStore):
    """The real store, behind a switch that makes it unreachable."""

    down = False
    appended = 0

    async def append(self, rows: Sequence[StoredEvent]) -> None:
        if self.down:
            raise AuditStoreError("connection refused")
        await super().append(rows)
        self.appended += len(rows)


def trail_for(store: SqliteAuditStore, *, capacity: int = 100, policy: str = "refuse", sink: MemoryAuditSink | None = None) -> AuditTrail:
    return AuditTrail(
        server=SERVER, tenant="acme", keys=MemoryAuditKeys(), sinks=[sink or MemoryAuditSink()], store=store,
        on_store_failure=policy,  # type: ignore[arg-type]
        capacity=capacity, batch_size=10, flush_interval=0.01,
    )


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"server": SERVER, **labels}) or 0.0


async def test_a_store_outage_loses_nothing_that_fits_in_the_queue(tmp_path: Path) -> None:
    store = FlakyStore(tmp_path / "audit.db")
    trail = trail_for(store, capacity=100)
    await trail.start()
    try:
        store.down = True
        failures_before = metric("portcullis_audit_write_failures_total", store="sqlite")
        for i in range(60):
            trail.emit(event(i))
        with anyio.fail_after(5):
            while metric("portcullis_audit_write_failures_total", store="sqlite") == failures_before:
                await anyio.sleep(0.01)
        assert trail.failing and trail.depth == 60
        store.down = False
        with anyio.fail_after(10):
            await trail.flush()
        assert trail.failing is None
        page = await store.query(AuditQuery(server=SERVER, limit=1000))
        assert [r.event.request_id for r in page.events] == [f"r{i:06d}" for i in range(60)]
        assert (await trail.verify()).ok
    finally:
        await trail.stop()


async def test_with_refuse_a_call_is_not_admitted_once_the_queue_is_full(tmp_path: Path) -> None:
    store = FlakyStore(tmp_path / "audit.db")
    trail = trail_for(store, capacity=5)
    await trail.start()
    try:
        store.down = True
        admitted = [trail.admit() for _ in range(7)]
        assert admitted == [True] * 5 + [False] * 2
        for i in range(5):  # every admitted call has room for its event
            trail.emit(event(i), reserved=True)
        trail.emit(event(99))  # a denial finding the queue full is dropped, and counted
        assert trail.depth == 5
        store.down = False
        with anyio.fail_after(10):
            await trail.flush()
        assert trail.admit()
        trail.emit(event(6), reserved=True)
        with anyio.fail_after(10):
            await trail.flush()
        page = await store.query(AuditQuery(server=SERVER, limit=1000))
        assert [r.event.request_id for r in page.events] == [f"r{i:06d}" for i in (0, 1, 2, 3, 4, 6)]
    finally:
        await trail.stop()


async def test_with_allow_a_call_is_served_and_counted_unaudited(tmp_path: Path) -> None:
    store = FlakyStore(tmp_path / "audit.db")
    trail = trail_for(store, capacity=2, policy="allow")
    await trail.start()
    try:
        store.down = True
        before = metric("portcullis_audit_unaudited_calls_total")
        assert [trail.admit() for _ in range(3)] == [True, True, True]
        assert metric("portcullis_audit_unaudited_calls_total") == before + 1
    finally:
        store.down = False
        await trail.stop()


async def test_only_the_lease_holder_prunes_and_the_pruning_is_itself_an_event(tmp_path: Path) -> None:
    store_a, store_b = SqliteAuditStore(tmp_path / "audit.db"), SqliteAuditStore(tmp_path / "audit.db")
    sink = MemoryAuditSink()
    a, b = trail_for(store_a, sink=sink), trail_for(store_b)
    await a.start()
    await b.start()
    try:
        for i in range(5):
            a.emit(event(i, time_us=NOW_US - 100 * DAY_US + i))
        with anyio.fail_after(10):
            await a.flush()
        assert await a.prune_once(now_us=NOW_US) == 5
        assert await b.prune_once(now_us=NOW_US) is None  # a holds the lease
        prunes = [e for e in sink.events if e.method == "audit/prune"]
        assert len(prunes) == 1 and prunes[0].detail is not None and prunes[0].detail.startswith("removed 5 events")
        with anyio.fail_after(10):
            await a.flush()
        report = await a.verify()
        assert report.ok and report.anchored == 1
    finally:
        await a.stop()
        await b.stop()


def test_the_link_hash_covers_every_field() -> None:
    base = event(1)
    reference = link_hash(KEY.chain_key, "w", 1, "0" * 64, base)
    for field_name, value in [("user", "x"), ("outcome", "error"), ("latency_ms", 9.0), ("args_digest", "d"), ("agent_run_id", "r")]:
        changed = dataclasses.replace(base, **{field_name: value})
        assert link_hash(KEY.chain_key, "w", 1, "0" * 64, changed) != reference, field_name
