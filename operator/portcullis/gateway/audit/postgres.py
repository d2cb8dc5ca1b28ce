"""The production audit store: PostgreSQL, shared by every replica of every virtual server.

**Partitions, so that retention drops tables.** `audit_events` is partitioned by LIST
(server), one sub-table per server (`audit_events_s_<sha256(server)[:12]>`), each itself
partitioned by RANGE (time_us), one partition per UTC day (`..._dYYYYMMDD`). Pruning a
server removes whole day partitions (DETACH, DROP): no row-by-row DELETE, no dead tuples,
no vacuum debt, and each server can keep its own retention. The price is that pruning
rounds `before` down to a day edge, which `PruneResult.before_us` reports.

`append` creates the partitions its batch needs (and the next day's, so midnight does not
need DDL on the write path), remembers in-process what exists, and inserts the whole batch
with one `INSERT ... SELECT FROM unnest(...)` (one round trip, one plan). A retried batch
is skipped by `ON CONFLICT DO NOTHING` on the unique index (server, time_us, writer, seq):
a unique index of a partitioned table must hold the partition keys, and a retry carries
the same time. So unlike SQLite, (writer, seq) alone is not unique here; a second row with
the same seq and another time can only be forged, and `chain()` returns it (ordered by id
after seq) for verification to report as inserted.

**Concurrency.** Several replicas start, create partitions and prune at once. Migrations
run in one transaction under `pg_advisory_xact_lock(MIGRATION_LOCK)` (even
`CREATE TABLE IF NOT EXISTS` fails when two sessions run it at once); partition creation
and pruning share `PARTITION_LOCK`, so this store's catalog changes never race. DDL waits at
most `lock_timeout` behind readers, then fails and the writer retries, rather than queueing
every writer behind it. A replica whose cache still holds a day another replica pruned gets
a "no partition" error, forgets those days, and retries once.

The lease uses the database's clock, not the replica's: it is the one clock all replicas share.

**Errors.** Every asyncpg and OS error leaves as `AuditStoreError`, translated in one place
(`_translated`). Messages name host, port and database, never the URL (it holds the password).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import re
import urllib.parse
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Final

import asyncpg

from portcullis.gateway.audit.chain import Anchor, StoredEvent
from portcullis.gateway.audit.sqlite import EVENT_COLUMNS, event_row, query_filters, stored_from_row
from portcullis.gateway.audit.store import MAX_PAGE, AuditPage, AuditQuery, AuditStoreError, PruneResult, decode_cursor, page_of

DAY_US: Final = 86_400 * 1_000_000
_BATCH: Final = 5000
_LOCK_TIMEOUT: Final = "10s"
_NOW_US: Final = "(extract(epoch FROM statement_timestamp()) * 1000000)::bigint"


def _lock_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


MIGRATION_LOCK: Final = _lock_key("portcullis.audit/migrations")
PARTITION_LOCK: Final = _lock_key("portcullis.audit/partitions")

# Versioned migrations, applied in order, each once. Never edit one that has shipped: add the next.
MIGRATIONS: Final[list[tuple[int, list[str]]]] = [
    (
        1,
        [
            """CREATE TABLE audit_events (
                id bigint GENERATED ALWAYS AS IDENTITY,
                time_us bigint NOT NULL,
                writer text NOT NULL, seq bigint NOT NULL, prev_hash text NOT NULL, hash text NOT NULL,
                request_id text NOT NULL, server text NOT NULL, tenant text NOT NULL, user_id text,
                method text NOT NULL, tool text, connection text, decision text NOT NULL, reason text NOT NULL,
                outcome text NOT NULL, latency_ms double precision NOT NULL, upstream_ms double precision,
                jti text, agent_run_id text, args_digest text, result_digest text, detail text, kind text NOT NULL,
                -- For people at a psql prompt; time_us is the exact value the chain covers.
                time timestamptz GENERATED ALWAYS AS (to_timestamp(time_us / 1000000.0)) STORED
            ) PARTITION BY LIST (server)""",
            "CREATE UNIQUE INDEX audit_events_link ON audit_events (server, time_us, writer, seq)",
            "CREATE INDEX audit_events_server_time ON audit_events (server, time_us, id)",
            "CREATE INDEX audit_events_user_time ON audit_events (user_id, time_us)",
            "CREATE INDEX audit_events_run ON audit_events (agent_run_id) WHERE agent_run_id IS NOT NULL",
            "CREATE INDEX audit_events_chain ON audit_events (writer, seq, id)",
            """CREATE TABLE audit_anchors (
                server text NOT NULL, writer text NOT NULL, seq bigint NOT NULL, hash text NOT NULL, time_us bigint NOT NULL,
                PRIMARY KEY (server, writer)
            )""",
            """CREATE TABLE audit_prunes (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, time_us bigint NOT NULL, server text NOT NULL,
                before_us bigint NOT NULL, removed bigint NOT NULL
            )""",
            "CREATE TABLE audit_leases (name text PRIMARY KEY, holder text NOT NULL, expires_us bigint NOT NULL)",
        ],
    ),
]

_COLUMN_TYPES: Final = {
    "time_us": "bigint", "seq": "bigint", "latency_ms": "float8", "upstream_ms": "float8",
}
_SELECT: Final = "SELECT id, " + ", ".join(EVENT_COLUMNS) + " FROM audit_events"
_INSERT: Final = (
    f"INSERT INTO audit_events ({', '.join(EVENT_COLUMNS)}) SELECT * FROM unnest("
    + ", ".join(f"${i}::{_COLUMN_TYPES.get(c, 'text')}[]" for i, c in enumerate(EVENT_COLUMNS, 1))
    + ") ON CONFLICT DO NOTHING"
)
# The writers of one partition, one index probe each (a "loose index scan"), and each one's last event.
_LAST_PER_WRITER: Final = """
WITH RECURSIVE writers(writer) AS (
    (SELECT writer FROM {table} ORDER BY writer LIMIT 1)
    UNION ALL
    SELECT (SELECT t.writer FROM {table} t WHERE t.writer > w.writer ORDER BY t.writer LIMIT 1)
    FROM writers w WHERE w.writer IS NOT NULL
)
SELECT w.writer, last.seq, last.hash, last.time_us
FROM writers w
CROSS JOIN LATERAL (
    SELECT seq, hash, time_us FROM {table} e WHERE e.writer = w.writer ORDER BY seq DESC, id LIMIT 1
) AS last
WHERE w.writer IS NOT NULL
"""
_BOUND: Final = re.compile(r"FOR VALUES FROM \('?(-?\d+)'?\) TO \('?(-?\d+)'?\)")


def server_table(server: str) -> str:
    """The server's sub-table: a digest, since server names are neither short nor identifier-safe."""
    return "audit_events_s_" + hashlib.sha256(server.encode()).hexdigest()[:12]


def day_table(server: str, day: int) -> str:
    """The partition of `server` holding day number `day` (UTC days since the epoch)."""
    date = datetime.date(1970, 1, 1) + datetime.timedelta(days=day)
    return f"{server_table(server)}_d{date:%Y%m%d}"


def _day(time_us: int) -> int:
    return time_us // DAY_US


def _ident(name: str) -> str:
    """A quoted identifier (ours are plain, but the catalog may hold anything)."""
    return '"' + name.replace('"', '""') + '"'


class PostgresAuditStore:
    name = "postgres"

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 4, command_timeout: float = 60.0):
        self._url = url
        self._min_size = min_size
        self._max_size = max_size
        self._command_timeout = command_timeout
        self._pool: Any = None
        self._opening = asyncio.Lock()
        self._partitions: set[tuple[str, int]] = set()
        """(server, day) partitions known to exist (this process created or saw them)."""
        self.where = _describe(url)
        """host:port/database, for messages (never the URL: it holds the password)."""

    # --- plumbing -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _translated(self, doing: str) -> Iterator[None]:
        """The one place foreign errors become AuditStoreError."""
        try:
            yield
        except asyncpg.PostgresError as exc:
            # The server's own words: they never contain the client's URL.
            raise AuditStoreError(f"PostgreSQL audit store {self.where}: {doing}: {self._safe(exc)}") from exc
        except (asyncpg.InterfaceError, asyncpg.InternalClientError, OSError) as exc:
            # Client-side errors may have parsed the URL: the cause is not chained, so no
            # traceback can carry it either.
            raise AuditStoreError(f"PostgreSQL audit store {self.where}: {doing}: {self._safe(exc)}") from None

    def _safe(self, exc: BaseException) -> str:
        text = str(exc) or "no message"
        for secret in (self._url, *_passwords(self._url)):
            if secret:
                text = text.replace(secret, "***")
        return f"{type(exc).__name__}: {text}"

    async def _ready(self) -> Any:
        if self._pool is None:
            await self.open()
        return self._pool

    # --- AuditStore -------------------------------------------------------------------------

    async def open(self) -> None:
        async with self._opening:
            if self._pool is not None:
                return
            with self._translated("connecting"):
                pool = await asyncpg.create_pool(
                    self._url, min_size=self._min_size, max_size=self._max_size, command_timeout=self._command_timeout,
                    server_settings={"application_name": "portcullis-audit"},
                )
            try:
                with self._translated("applying schema migrations"):
                    async with pool.acquire() as conn:
                        await _migrate(conn)
            except BaseException:
                await _close_pool(pool)
                raise
            self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        self._partitions.clear()
        if pool is not None:
            await _close_pool(pool)

    async def append(self, rows: Sequence[StoredEvent]) -> None:
        if not rows:
            return
        pool = await self._ready()
        values = [event_row(r) for r in rows]
        columns = [list(column) for column in zip(*values, strict=True)]
        needed = {(r.event.server, _day(r.event.time_us)) for r in rows}
        latest: dict[str, int] = {}
        for server, day in needed:
            latest[server] = max(day, latest.get(server, day))
        needed |= {(server, day + 1) for server, day in latest.items()}  # the next day's, ahead of midnight
        with self._translated("storing a batch"):
            async with pool.acquire() as conn:
                await self._ensure_partitions(conn, needed)
                try:
                    await conn.execute(_INSERT, *columns)
                except asyncpg.CheckViolationError:
                    # "No partition for this row": another replica pruned a day this cache still holds.
                    self._partitions -= needed
                    await self._ensure_partitions(conn, needed)
                    await conn.execute(_INSERT, *columns)

    async def _ensure_partitions(self, conn: Any, needed: set[tuple[str, int]]) -> None:
        missing = needed - self._partitions
        if not missing:
            return
        # Most often another replica made them already: look before taking the lock.
        names = {day_table(s, d): (s, d) for s, d in missing}
        found = await conn.fetch("SELECT n FROM unnest($1::text[]) AS n WHERE to_regclass(n) IS NOT NULL", list(names))
        for (name,) in found:
            missing.discard(names[name])
            self._partitions.add(names[name])
        if not missing:
            return
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
            await conn.execute("SELECT pg_advisory_xact_lock($1)", PARTITION_LOCK)
            for server in sorted({s for s, _ in missing}):
                ddl = await conn.fetchval(
                    "SELECT format('CREATE TABLE IF NOT EXISTS %I PARTITION OF audit_events FOR VALUES IN (%L)"
                    " PARTITION BY RANGE (time_us)', $1::text, $2::text)",
                    server_table(server), server,
                )
                await conn.execute(ddl)
            for server, day in sorted(missing):
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {_ident(day_table(server, day))} PARTITION OF {_ident(server_table(server))}"
                    f" FOR VALUES FROM ({day * DAY_US}) TO ({(day + 1) * DAY_US})"
                )
        self._partitions |= missing

    async def query(self, query: AuditQuery) -> AuditPage:
        args: list[Any] = []

        def param(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        clauses = [f"{column} = {param(value)}" for column, value in query_filters(query)]
        if query.since_us is not None:
            clauses.append(f"time_us >= {param(query.since_us)}")
        if query.until_us is not None:
            clauses.append(f"time_us < {param(query.until_us)}")
        if query.cursor is not None:
            time_us, row_id = decode_cursor(query.cursor)
            clauses.append(f"(time_us, id) > ({param(time_us)}, {param(row_id)})")
        limit = max(1, min(query.limit, MAX_PAGE))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"{_SELECT} {where} ORDER BY time_us, id LIMIT {param(limit + 1)}"
        pool = await self._ready()
        with self._translated("querying"):
            records = await pool.fetch(sql, *args)
        return page_of([stored_from_row(r) for r in records], limit)

    async def chain(self, server: str, since_us: int | None, until_us: int | None) -> AsyncIterator[StoredEvent]:
        # Keyset batches on (writer, seq, id): id breaks a tie between two rows claiming one seq.
        sql = f"{_SELECT} WHERE server = $1 AND (writer, seq, id) > ($2, $3, $4)"
        bounds: list[int] = []
        # Only the bounds given, not `$5 IS NULL OR ...`: a generic plan could not prune partitions by those.
        if since_us is not None:
            bounds.append(since_us)
            sql += f" AND time_us >= ${4 + len(bounds)}"
        if until_us is not None:
            bounds.append(until_us)
            sql += f" AND time_us < ${4 + len(bounds)}"
        sql += f" ORDER BY writer, seq, id LIMIT {_BATCH}"
        after: tuple[str, int, int] = ("", 0, 0)
        pool = await self._ready()
        while True:
            with self._translated("reading a chain"):
                records = await pool.fetch(sql, server, *after, *bounds)
            batch = [stored_from_row(r) for r in records]
            for row in batch:
                yield row
            if len(batch) < _BATCH:
                return
            last = batch[-1]
            assert last.id is not None
            after = (last.writer, last.seq, last.id)

    async def link(self, server: str, writer: str, seq: int) -> StoredEvent | None:
        pool = await self._ready()
        with self._translated("reading a link"):
            record = await pool.fetchrow(
                f"{_SELECT} WHERE server = $1 AND writer = $2 AND seq = $3 ORDER BY id LIMIT 1", server, writer, seq
            )
        return stored_from_row(record) if record is not None else None

    async def anchors(self, server: str) -> dict[str, Anchor]:
        pool = await self._ready()
        with self._translated("reading anchors"):
            records = await pool.fetch("SELECT writer, seq, hash, time_us FROM audit_anchors WHERE server = $1", server)
        return {w: Anchor(w, int(s), h, int(t)) for w, s, h, t in records}

    async def prune(self, server: str, before_us: int) -> PruneResult:
        edge = _day(before_us) * DAY_US  # whole days only: a partition goes or stays
        parent = server_table(server)
        pool = await self._ready()
        with self._translated("pruning"):
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
                await conn.execute("SELECT pg_advisory_xact_lock($1)", PARTITION_LOCK)
                doomed = [(name, lower) for name, lower, upper in await _day_partitions(conn, parent) if upper <= edge]
                anchors: list[Anchor] = []
                removed = 0
                if doomed:
                    rows = " UNION ALL ".join(f"SELECT writer, seq, hash, time_us, id FROM {_ident(name)}" for name, _ in doomed)
                    removed = int(await conn.fetchval(f"SELECT count(*) FROM ({rows}) AS doomed"))
                    # Per writer, the last event removed (the first stored, should a forged twin share its seq).
                    # A loose index scan per partition on its (writer, seq, id) index: a handful of probes per
                    # writer instead of sorting the day (DISTINCT ON over 10 million rows took 10 s).
                    last: dict[str, Anchor] = {}
                    for name, _ in doomed:
                        for w, s, h, t in await conn.fetch(_LAST_PER_WRITER.format(table=_ident(name))):
                            if w not in last or int(s) > last[w].seq:
                                last[w] = Anchor(w, int(s), h, int(t))
                    anchors = [last[w] for w in sorted(last)]
                    await conn.executemany(
                        "INSERT INTO audit_anchors VALUES ($1, $2, $3, $4, $5) ON CONFLICT (server, writer) DO UPDATE SET"
                        " seq = excluded.seq, hash = excluded.hash, time_us = excluded.time_us"
                        " WHERE excluded.seq > audit_anchors.seq",
                        [(server, a.writer, a.seq, a.hash, a.time_us) for a in anchors],
                    )
                    for name, _ in doomed:
                        await conn.execute(f"ALTER TABLE {_ident(parent)} DETACH PARTITION {_ident(name)}")
                        await conn.execute(f"DROP TABLE {_ident(name)}")
                await conn.execute(
                    f"INSERT INTO audit_prunes (time_us, server, before_us, removed) VALUES ({_NOW_US}, $1, $2, $3)",
                    server, edge, removed,
                )
        self._partitions -= {(server, _day(lower)) for _, lower in doomed}
        return PruneResult(removed, edge, anchors)

    async def acquire_lease(self, name: str, holder: str, ttl_seconds: float) -> bool:
        pool = await self._ready()
        with self._translated("taking a lease"):
            taken = await pool.fetchval(
                f"INSERT INTO audit_leases VALUES ($1, $2, {_NOW_US} + $3) ON CONFLICT (name) DO UPDATE SET"
                " holder = excluded.holder, expires_us = excluded.expires_us"
                f" WHERE audit_leases.expires_us < {_NOW_US} OR audit_leases.holder = excluded.holder"
                " RETURNING holder",
                name, holder, int(ttl_seconds * 1_000_000),
            )
        return bool(taken == holder)


async def _migrate(conn: Any) -> None:
    async with conn.transaction():
        # Taken before anything else, even the bookkeeping table's creation, which races too.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS portcullis_audit_schema_migrations"
            " (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {v for (v,) in await conn.fetch("SELECT version FROM portcullis_audit_schema_migrations")}
        for version, statements in MIGRATIONS:
            if version in done:
                continue
            for statement in statements:
                await conn.execute(statement)
            await conn.execute("INSERT INTO portcullis_audit_schema_migrations (version) VALUES ($1)", version)


async def _day_partitions(conn: Any, parent: str) -> list[tuple[str, int, int]]:
    """(name, lower, upper) of each range partition of `parent`, read from the catalog's bounds."""
    children = await conn.fetch(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
        " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass($1) ORDER BY c.relname",
        parent,
    )
    found = []
    for name, bound in children:
        match = _BOUND.fullmatch(bound or "")  # a DEFAULT or MINVALUE partition someone added is left alone
        if match:
            found.append((str(name), int(match[1]), int(match[2])))
    return found


async def _close_pool(pool: Any) -> None:
    try:
        await asyncio.wait_for(pool.close(), 10.0)
    except Exception:  # busy or broken connections: do not wait for them
        pool.terminate()


def _describe(url: str) -> str:
    """host:port/database: what messages may say about where the store is."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("postgres", "postgresql"):
            return "(a URL that is not postgresql://)"
        host = parts.hostname or "localhost"
        port = parts.port or 5432
        database = urllib.parse.unquote(parts.path.lstrip("/")) or "(default database)"
    except ValueError:
        return "(an unparsable URL)"
    return f"{host}:{port}/{database}"


def _passwords(url: str) -> list[str]:
    """The password in the URL's user part or its `?password=` (both work with asyncpg)."""
    try:
        parts = urllib.parse.urlsplit(url)
        found = [parts.password or "", *urllib.parse.parse_qs(parts.query).get("password", [])]
    except ValueError:
        return []
    return [p for p in {*found, *map(urllib.parse.unquote, found)} if p]
