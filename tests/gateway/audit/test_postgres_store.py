"""The PostgreSQL audit store against a real PostgreSQL: schema, round trips, chains, pruning by
partition, leases, and concurrent writers."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import asyncpg
import pytest

from portcullis.gateway.audit.chain import Anchor, ChainWriter, StoredEvent
from portcullis.gateway.audit.events import AuditEvent
from portcullis.gateway.audit.postgres import DAY_US, PostgresAuditStore, day_table, server_table
from portcullis.gateway.audit.store import AuditQuery, AuditStoreError
from portcullis.gateway.audit.trail import verify_audit
from tests.support.postgres import PostgresServer, free_port

pytestmark = pytest.mark.anyio

SERVER = "acme/summarizer"
OTHER = "acme/o'brien \\ co"  # quotes and backslashes must survive the partition DDL
MIDNIGHT = 1_773_532_800_000_000  # 2026-03-15T00:00:00Z
NOON = MIDNIGHT + DAY_US // 2
MINUTE = 60 * 1_000_000


def event(i: int, time_us: int, server: str = SERVER, **changes: Any) -> AuditEvent:
    """An event whose every field varies with i (floats that are not short decimals, Nones too)."""
    base = AuditEvent(
        time_us=time_us, request_id=f"req-{i}", server=server, tenant="acme", user=("alice", "bob", None)[i % 3],
        method=("tools/call", "tools/list")[i % 2], tool=(f"tool-{i % 4}" if i % 2 == 0 else None),
        connection=("inbox", "calendar")[i % 2], decision=("allow", "deny")[i % 5 == 0],
        reason=("allowlisted", "not_exposed")[i % 5 == 0], outcome=("ok", "tool_error", "denied")[i % 3],
        latency_ms=i / 7 + 0.1, upstream_ms=(None if i % 4 == 0 else i / 3), jti=f"jti-{i}",
        agent_run_id=(f"run-{i % 6}" if i % 2 else None), args_digest=secrets.token_hex(8),
        result_digest=(None if i % 3 else "r" * 64), detail=(f"detail {i}" if i % 7 == 0 else None),
    )
    return dataclasses.replace(base, **changes)


def unstored(rows: Sequence[StoredEvent]) -> list[StoredEvent]:
    """Rows as they compare across stores: without the row id."""
    return [dataclasses.replace(r, id=None) for r in rows]


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[PostgresAuditStore]:
    store = PostgresAuditStore(url)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def sql(url: str) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(url)
    try:
        yield conn
    finally:
        await conn.close()


async def append_in_batches(store: PostgresAuditStore, rows: Sequence[StoredEvent], size: int = 100) -> None:
    for start in range(0, len(rows), size):
        await store.append(rows[start:start + size])


async def everything(store: PostgresAuditStore, server: str = SERVER) -> list[StoredEvent]:
    page = await store.query(AuditQuery(server=server, limit=1000))
    assert page.next_cursor is None
    return page.events


async def test_migrations_apply_once_even_when_replicas_start_together(database: str) -> None:
    stores = [PostgresAuditStore(database) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        await stores[0].close()
        await stores[0].open()  # and again, on a migrated database
    finally:
        for store in stores:
            await store.close()
    async with sql(database) as conn:
        assert [tuple(r) for r in await conn.fetch("SELECT version FROM portcullis_audit_schema_migrations")] == [(1,)]
        kind = await conn.fetchval("SELECT relkind::text FROM pg_class WHERE relname = 'audit_events'")
        assert kind == "p"  # partitioned


async def test_appended_events_come_back_exactly_and_filters_and_pages_select_them(database: str) -> None:
    writer = ChainWriter(secrets.token_bytes(32), "gw-1")
    # 250 events about 16.7 minutes apart from late on one day: they span four day partitions.
    rows = [writer.link(event(i, MIDNIGHT - 3 * MINUTE + i * 1_000_000_007)) for i in range(250)]
    noise = ChainWriter(secrets.token_bytes(32), "gw-2")
    others = [noise.link(event(i, MIDNIGHT + i, server=OTHER)) for i in range(20)]
    async with opened(database) as store:
        await append_in_batches(store, rows)
        await store.append(others)

        assert unstored(await everything(store)) == rows  # every field, exact microseconds and floats
        assert unstored(await everything(store, OTHER)) == others

        pages: list[list[StoredEvent]] = []
        cursor: str | None = None
        while True:
            page = await store.query(AuditQuery(server=SERVER, limit=100, cursor=cursor))
            pages.append(page.events)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert [len(p) for p in pages] == [100, 100, 50]
        assert unstored([r for p in pages for r in p]) == rows

        cases: list[tuple[AuditQuery, Callable[[AuditEvent], bool]]] = [
            (AuditQuery(server=SERVER, user="alice"), lambda e: e.user == "alice"),
            (AuditQuery(server=SERVER, tool="tool-2"), lambda e: e.tool == "tool-2"),
            (AuditQuery(server=SERVER, connection="calendar"), lambda e: e.connection == "calendar"),
            (AuditQuery(server=SERVER, outcome="tool_error"), lambda e: e.outcome == "tool_error"),
            (AuditQuery(server=SERVER, decision="deny"), lambda e: e.decision == "deny"),
            (AuditQuery(server=SERVER, method="tools/list"), lambda e: e.method == "tools/list"),
            (AuditQuery(server=SERVER, agent_run_id="run-3"), lambda e: e.agent_run_id == "run-3"),
            (AuditQuery(server=SERVER, since_us=rows[60].event.time_us, until_us=rows[140].event.time_us),
             lambda e: rows[60].event.time_us <= e.time_us < rows[140].event.time_us),
            (AuditQuery(server=SERVER, user="bob", outcome="tool_error", since_us=rows[100].event.time_us),
             lambda e: e.user == "bob" and e.outcome == "tool_error" and e.time_us >= rows[100].event.time_us),
            (AuditQuery(user="alice", connection="inbox"), lambda e: e.user == "alice" and e.connection == "inbox"),
        ]
        for query, keep in cases:
            expected = [r for r in [*rows, *others] if query.server in (None, r.event.server) and keep(r.event)]
            expected.sort(key=lambda r: r.event.time_us)
            page = await store.query(dataclasses.replace(query, limit=1000))
            assert expected and unstored(page.events) == expected, query

        with pytest.raises(ValueError):
            await store.query(AuditQuery(server=SERVER, cursor="not a cursor"))


async def test_a_retried_batch_is_stored_once(database: str) -> None:
    writer = ChainWriter(secrets.token_bytes(32), "gw-1")
    rows = [writer.link(event(i, NOON + i * MINUTE)) for i in range(60)]
    async with opened(database) as store:
        await store.append(rows[:40])
        await store.append(rows[:40])  # the same batch after an unclear failure
        await store.append(rows[20:])  # a later batch that overlaps it
        assert unstored(await everything(store)) == rows


async def test_verify_reports_altered_deleted_and_inserted_events_where_they_are(database: str) -> None:
    key = secrets.token_bytes(32)
    writers = [ChainWriter(key, "gw-a"), ChainWriter(key, "gw-b")]
    rows = [w.link(event(i, NOON + i * MINUTE)) for i in range(50) for w in writers]
    async with opened(database) as store, sql(database) as conn:
        await append_in_batches(store, rows)
        report = await verify_audit(store, key, SERVER, None, None)
        assert report.ok and (report.events, report.writers) == (100, 2)
        ranged = await verify_audit(store, key, SERVER, rows[40].event.time_us, rows[80].event.time_us)
        assert ranged.ok and ranged.events == 40  # each chain's range starts from its stored predecessor

        await conn.execute("UPDATE audit_events SET user_id = 'mallory' WHERE writer = 'gw-a' AND seq = 10")
        report = await verify_audit(store, key, SERVER, None, None)
        assert [(b.writer, b.seq, b.problem) for b in report.breaks] == [("gw-a", 10, "altered")]
        original = next(r for r in rows if (r.writer, r.seq) == ("gw-a", 10))
        await conn.execute("UPDATE audit_events SET user_id = $1 WHERE writer = 'gw-a' AND seq = 10", original.event.user)
        assert (await verify_audit(store, key, SERVER, None, None)).ok

        await conn.execute("DELETE FROM audit_events WHERE writer = 'gw-b' AND seq = 20")
        report = await verify_audit(store, key, SERVER, None, None)
        # The break shows at the first event after the hole.
        assert [(b.writer, b.seq, b.problem) for b in report.breaks] == [("gw-b", 21, "deleted")]
        await store.append([r for r in rows if (r.writer, r.seq) == ("gw-b", 20)])
        assert (await verify_audit(store, key, SERVER, None, None)).ok

        # A forged copy of seq 30 a microsecond later: the unique index allows it (another time),
        # and the walk finds a second event claiming that seq.
        await conn.execute(
            "INSERT INTO audit_events (time_us, writer, seq, prev_hash, hash, request_id, server, tenant, user_id, method,"
            " tool, connection, decision, reason, outcome, latency_ms, kind)"
            " SELECT time_us + 1, writer, seq, prev_hash, hash, 'forged', server, tenant, 'mallory', method, 'wire_money',"
            " connection, 'allow', reason, 'ok', latency_ms, kind FROM audit_events WHERE writer = 'gw-a' AND seq = 30"
        )
        report = await verify_audit(store, key, SERVER, None, None)
        assert [(b.writer, b.seq, b.problem, b.request_id) for b in report.breaks] == [("gw-a", 30, "inserted", "forged")]


async def test_pruning_drops_whole_day_partitions_and_leaves_anchors(database: str) -> None:
    key = secrets.token_bytes(32)
    now = NOON
    writers = [ChainWriter(key, "gw-a"), ChainWriter(key, "gw-b")]
    bystander = ChainWriter(key, "gw-c")
    # Ten events an hour apart, ending at noon, on each of the last five days (4 days ago .. today).
    times = [now - days * DAY_US - hour * 3_600_000_000 for days in range(4, -1, -1) for hour in range(9, -1, -1)]
    rows = [w.link(event(i, t)) for i, t in enumerate(times) for w in writers]
    others = [bystander.link(event(i, t, server=OTHER)) for i, t in enumerate(times)]
    async with opened(database) as store, sql(database) as conn:
        await append_in_batches(store, rows)
        await append_in_batches(store, others)

        async def partitions(server: str) -> set[str]:
            records = await conn.fetch(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = to_regclass($1)",
                server_table(server),
            )
            return {r[0] for r in records}

        days = [MIDNIGHT // DAY_US - d for d in range(4, -1, -1)]
        assert {day_table(SERVER, d) for d in days} <= await partitions(SERVER)

        # 3 days ago at noon rounds down to that day's midnight: only the day before it goes.
        before = now - 3 * DAY_US
        edge = MIDNIGHT - 3 * DAY_US
        result = await store.prune(SERVER, before)
        gone = [r for r in rows if r.event.time_us < edge]
        assert len(gone) == 20 and result.removed == 20 and result.before_us == edge
        expected = {w.writer: max((r for r in gone if r.writer == w.writer), key=lambda r: r.seq) for w in writers}
        anchors = {w: Anchor(w, r.seq, r.hash, r.event.time_us) for w, r in expected.items()}
        assert {a.writer: a for a in result.anchors} == anchors
        assert await store.anchors(SERVER) == anchors

        left = await partitions(SERVER)
        assert day_table(SERVER, days[0]) not in left and {day_table(SERVER, d) for d in days[1:]} <= left
        assert await conn.fetchval("SELECT to_regclass($1)", day_table(SERVER, days[0])) is None
        assert unstored(await everything(store)) == sorted(
            [r for r in rows if r.event.time_us >= edge], key=lambda r: r.event.time_us
        )
        prunes = await conn.fetch("SELECT server, before_us, removed FROM audit_prunes")
        assert [tuple(p) for p in prunes] == [(SERVER, edge, 20)]
        report = await verify_audit(store, key, SERVER, None, None)
        assert report.ok and report.anchored == 2 and report.events == 80

        # The other server keeps everything, its oldest partition included.
        assert day_table(OTHER, days[0]) in await partitions(OTHER)
        assert unstored(await everything(store, OTHER)) == others
        assert (await verify_audit(store, key, OTHER, None, None)).ok

        # A later pruning moves the anchors forward; a repeated one removes nothing.
        assert (await store.prune(SERVER, now - DAY_US)).removed == 40
        again = await store.prune(SERVER, now - DAY_US)
        assert (again.removed, again.anchors) == (0, [])
        assert {a.seq for a in (await store.anchors(SERVER)).values()} == {30}
        report = await verify_audit(store, key, SERVER, None, None)
        assert report.ok and report.anchored == 2 and report.events == 40


async def test_a_lease_has_one_holder_until_it_expires(database: str) -> None:
    async with opened(database) as one, opened(database) as two:
        assert await one.acquire_lease("prune:acme/summarizer", "replica-1", 60)
        assert not await two.acquire_lease("prune:acme/summarizer", "replica-2", 60)
        assert await one.acquire_lease("prune:acme/summarizer", "replica-1", 60)  # renewing
        assert await two.acquire_lease("prune:acme/other", "replica-2", 60)  # another lease is free
        assert await one.acquire_lease("prune:acme/summarizer", "replica-1", 0.05)  # shortened: expires soon
        with anyio.fail_after(5):
            while not await two.acquire_lease("prune:acme/summarizer", "replica-2", 60):
                await anyio.sleep(0.02)
        assert not await one.acquire_lease("prune:acme/summarizer", "replica-1", 60)


async def test_four_writers_appending_at_once_store_every_event_in_verifiable_chains(database: str) -> None:
    key = secrets.token_bytes(32)
    # Across midnight, so that every writer needs the same two new partitions at the same moment.
    start = MIDNIGHT - 1_000_000

    async def write(store: PostgresAuditStore, name: str) -> None:
        writer = ChainWriter(key, name)
        rows = [writer.link(event(i, start + i * 1000, request_id=f"{name}-{i}")) for i in range(2000)]
        await append_in_batches(store, rows, size=250)

    stores = [PostgresAuditStore(database) for _ in range(4)]
    try:
        with anyio.fail_after(60):
            await asyncio.gather(*(write(store, f"gw-{n}") for n, store in enumerate(stores)))
        async with sql(database) as conn:
            assert await conn.fetchval("SELECT count(*) FROM audit_events") == 8000
            assert await conn.fetchval("SELECT count(DISTINCT request_id) FROM audit_events") == 8000
        report = await verify_audit(stores[0], key, SERVER, None, None)
        assert report.ok and (report.events, report.writers) == (8000, 4)
    finally:
        for store in stores:
            await store.close()


async def test_errors_are_audit_store_errors_that_never_show_the_password() -> None:
    port = free_port()  # nothing listens there
    store = PostgresAuditStore(f"postgresql://portcullis:hunter2-secret@127.0.0.1:{port}/audit")
    with pytest.raises(AuditStoreError) as caught:
        await store.open()
    assert "hunter2-secret" not in str(caught.value) and f"127.0.0.1:{port}/audit" in str(caught.value)
    assert caught.value.__cause__ is None
    with pytest.raises(AuditStoreError):
        await store.append([ChainWriter(b"k" * 32, "gw").link(event(1, NOON))])


async def test_the_store_recovers_when_postgresql_restarts(postgres: PostgresServer, database: str) -> None:
    key = secrets.token_bytes(32)
    writer = ChainWriter(key, "gw-1")
    rows = [writer.link(event(i, NOON + i)) for i in range(30)]
    async with opened(database) as store:
        await store.append(rows[:10])
        postgres.stop()
        try:
            with pytest.raises(AuditStoreError):
                await store.append(rows[10:20])
        finally:
            postgres.start()
        with anyio.fail_after(10):  # the pool's dead connections fail once each, then it reconnects
            while True:
                try:
                    await store.append(rows[10:20])
                    break
                except AuditStoreError:
                    await anyio.sleep(0.05)
        await store.append(rows[20:])
        assert unstored(await everything(store)) == rows
        assert (await verify_audit(store, key, SERVER, None, None)).ok
