"""The embedded audit store: one SQLite file under the state directory.

`portcullis serve` and `portcullis demo` write here by default (`<state>/audit/audit.db`,
mode 0600). WAL mode lets the CLI query and verify while gateways write, and several local
gateways share one file (each its own chain). `synchronous=NORMAL` in WAL mode makes a
committed batch survive a crash of the process; a power loss can lose the last batches.

sqlite3 is blocking, so every operation runs in a worker thread, one at a time per store
(one connection, one lock): the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from portcullis.gateway.audit.chain import Anchor, StoredEvent
from portcullis.gateway.audit.events import AuditEvent
from portcullis.gateway.audit.store import MAX_PAGE, AuditPage, AuditQuery, AuditStoreError, PruneResult, decode_cursor, page_of

T = TypeVar("T")
_BATCH = 5000

# Versioned migrations, applied in order, each once. Never edit one that has shipped: add the next.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE audit_events (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                time_us INTEGER NOT NULL,
                writer TEXT NOT NULL, seq INTEGER NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL,
                request_id TEXT NOT NULL, server TEXT NOT NULL, tenant TEXT NOT NULL, user_id TEXT,
                method TEXT NOT NULL, tool TEXT, connection TEXT, decision TEXT NOT NULL, reason TEXT NOT NULL,
                outcome TEXT NOT NULL, latency_ms REAL NOT NULL, upstream_ms REAL, jti TEXT, agent_run_id TEXT,
                args_digest TEXT, result_digest TEXT, detail TEXT, kind TEXT NOT NULL,
                UNIQUE (writer, seq)
            )""",
            "CREATE INDEX audit_events_server_time ON audit_events (server, time_us, id)",
            "CREATE INDEX audit_events_user_time ON audit_events (user_id, time_us)",
            "CREATE INDEX audit_events_run ON audit_events (agent_run_id) WHERE agent_run_id IS NOT NULL",
            """CREATE TABLE audit_anchors (
                server TEXT NOT NULL, writer TEXT NOT NULL, seq INTEGER NOT NULL, hash TEXT NOT NULL, time_us INTEGER NOT NULL,
                PRIMARY KEY (server, writer)
            )""",
            """CREATE TABLE audit_prunes (
                id INTEGER PRIMARY KEY AUTOINCREMENT, time_us INTEGER NOT NULL, server TEXT NOT NULL,
                before_us INTEGER NOT NULL, removed INTEGER NOT NULL
            )""",
            "CREATE TABLE audit_leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_us INTEGER NOT NULL)",
        ],
    ),
]

EVENT_COLUMNS = (
    "time_us", "writer", "seq", "prev_hash", "hash", "request_id", "server", "tenant", "user_id", "method", "tool",
    "connection", "decision", "reason", "outcome", "latency_ms", "upstream_ms", "jti", "agent_run_id", "args_digest",
    "result_digest", "detail", "kind",
)
_SELECT = "SELECT id, " + ", ".join(EVENT_COLUMNS) + " FROM audit_events"


def event_row(stored: StoredEvent) -> tuple[Any, ...]:
    """The column values of one stored event, in EVENT_COLUMNS order (shared with the PostgreSQL store)."""
    e = stored.event
    return (
        e.time_us, stored.writer, stored.seq, stored.prev_hash, stored.hash, e.request_id, e.server, e.tenant, e.user,
        e.method, e.tool, e.connection, e.decision, e.reason, e.outcome, e.latency_ms, e.upstream_ms, e.jti,
        e.agent_run_id, e.args_digest, e.result_digest, e.detail, e.kind,
    )


def stored_from_row(row: Sequence[Any]) -> StoredEvent:
    """The inverse of event_row, for a row selected as `id, EVENT_COLUMNS...`."""
    (row_id, time_us, writer, seq, prev_hash, digest, request_id, server, tenant, user, method, tool, connection,
     decision, reason, outcome, latency_ms, upstream_ms, jti, run, args_digest, result_digest, detail, kind) = row
    event = AuditEvent(
        time_us=int(time_us), request_id=request_id, server=server, tenant=tenant, user=user, method=method, tool=tool,
        connection=connection, decision=decision, reason=reason, outcome=outcome, latency_ms=float(latency_ms),
        upstream_ms=None if upstream_ms is None else float(upstream_ms), jti=jti, agent_run_id=run,
        args_digest=args_digest, result_digest=result_digest, detail=detail, kind=kind,
    )
    return StoredEvent(event, writer, int(seq), prev_hash, digest, int(row_id))


def query_filters(query: AuditQuery) -> list[tuple[str, Any]]:
    """(column, value) equality filters of a query, shared with the PostgreSQL store."""
    pairs = [
        ("server", query.server), ("user_id", query.user), ("tool", query.tool), ("connection", query.connection),
        ("outcome", query.outcome), ("decision", query.decision), ("method", query.method),
        ("agent_run_id", query.agent_run_id),
    ]
    return [(column, value) for column, value in pairs if value is not None]


class SqliteAuditStore:
    name = "sqlite"

    def __init__(self, path: Path):
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    # --- plumbing -----------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # 0600 from the first byte
        os.close(fd)
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                if self._conn is None:
                    self._conn = self._connect()
                try:
                    return work(self._conn)
                except sqlite3.Error as exc:
                    raise AuditStoreError(f"SQLite audit store {self.path}: {exc}") from exc

        return await asyncio.to_thread(locked)

    @staticmethod
    def _transaction(conn: sqlite3.Connection, work: Callable[[], T]) -> T:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = work()
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    # --- AuditStore -------------------------------------------------------------------------

    async def open(self) -> None:
        def migrate(conn: sqlite3.Connection) -> None:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)")

            def apply() -> None:
                done = {v for (v,) in conn.execute("SELECT version FROM schema_migrations")}
                for version, statements in MIGRATIONS:
                    if version in done:
                        continue
                    for statement in statements:
                        conn.execute(statement)
                    conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, int(time.time())))

            self._transaction(conn, apply)

        await self._run(migrate)

    async def close(self) -> None:
        def close(conn: sqlite3.Connection) -> None:
            conn.close()
            self._conn = None

        if self._conn is not None:
            await self._run(close)

    async def append(self, rows: Sequence[StoredEvent]) -> None:
        values = [event_row(r) for r in rows]
        sql = f"INSERT OR IGNORE INTO audit_events ({', '.join(EVENT_COLUMNS)}) VALUES ({', '.join('?' * len(EVENT_COLUMNS))})"

        def write(conn: sqlite3.Connection) -> None:
            self._transaction(conn, lambda: conn.executemany(sql, values))

        await self._run(write)

    async def query(self, query: AuditQuery) -> AuditPage:
        where, args = _where(query)
        limit = max(1, min(query.limit, MAX_PAGE))
        sql = f"{_SELECT} {where} ORDER BY time_us, id LIMIT ?"

        def read(conn: sqlite3.Connection) -> list[StoredEvent]:
            return [stored_from_row(r) for r in conn.execute(sql, (*args, limit + 1))]

        return page_of(await self._run(read), limit)

    async def chain(self, server: str, since_us: int | None, until_us: int | None) -> AsyncIterator[StoredEvent]:
        after: tuple[str, int] = ("", 0)
        while True:
            sql = f"{_SELECT} WHERE server = ? AND (writer, seq) > (?, ?)"
            args: list[Any] = [server, *after]
            if since_us is not None:
                sql += " AND time_us >= ?"
                args.append(since_us)
            if until_us is not None:
                sql += " AND time_us < ?"
                args.append(until_us)
            sql += " ORDER BY writer, seq LIMIT ?"
            args.append(_BATCH)
            batch = await self._run(lambda conn: [stored_from_row(r) for r in conn.execute(sql, args)])
            for row in batch:
                yield row
            if len(batch) < _BATCH:
                return
            after = (batch[-1].writer, batch[-1].seq)

    async def link(self, server: str, writer: str, seq: int) -> StoredEvent | None:
        sql = f"{_SELECT} WHERE server = ? AND writer = ? AND seq = ? ORDER BY id LIMIT 1"
        rows = await self._run(lambda conn: conn.execute(sql, (server, writer, seq)).fetchall())
        return stored_from_row(rows[0]) if rows else None

    async def anchors(self, server: str) -> dict[str, Anchor]:
        sql = "SELECT writer, seq, hash, time_us FROM audit_anchors WHERE server = ?"
        rows = await self._run(lambda conn: conn.execute(sql, (server,)).fetchall())
        return {w: Anchor(w, int(s), h, int(t)) for w, s, h, t in rows}

    async def prune(self, server: str, before_us: int) -> PruneResult:
        def prune(conn: sqlite3.Connection) -> PruneResult:
            def work() -> PruneResult:
                last = conn.execute(
                    "SELECT e.writer, e.seq, e.hash, e.time_us FROM audit_events e JOIN ("
                    " SELECT writer, MAX(seq) AS seq FROM audit_events WHERE server = ? AND time_us < ? GROUP BY writer"
                    ") m ON e.writer = m.writer AND e.seq = m.seq WHERE e.server = ?",
                    (server, before_us, server),
                ).fetchall()
                anchors = [Anchor(w, int(s), h, int(t)) for w, s, h, t in last]
                conn.executemany(
                    "INSERT INTO audit_anchors VALUES (?, ?, ?, ?, ?) ON CONFLICT (server, writer) DO UPDATE SET"
                    " seq = excluded.seq, hash = excluded.hash, time_us = excluded.time_us WHERE excluded.seq > audit_anchors.seq",
                    [(server, a.writer, a.seq, a.hash, a.time_us) for a in anchors],
                )
                removed = conn.execute("DELETE FROM audit_events WHERE server = ? AND time_us < ?", (server, before_us)).rowcount
                conn.execute(
                    "INSERT INTO audit_prunes (time_us, server, before_us, removed) VALUES (?, ?, ?, ?)",
                    (int(time.time() * 1_000_000), server, before_us, removed),
                )
                return PruneResult(removed, before_us, anchors)

            return self._transaction(conn, work)

        return await self._run(prune)

    async def servers(self) -> list[str]:
        """Every server with events or anchors here (the CLI verifies each)."""
        sql = "SELECT server FROM audit_events UNION SELECT server FROM audit_anchors ORDER BY server"
        return [s for (s,) in await self._run(lambda conn: conn.execute(sql).fetchall())]

    async def acquire_lease(self, name: str, holder: str, ttl_seconds: float) -> bool:
        now = int(time.time() * 1_000_000)

        def acquire(conn: sqlite3.Connection) -> bool:
            def work() -> bool:
                conn.execute(
                    "INSERT INTO audit_leases VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
                    " holder = excluded.holder, expires_us = excluded.expires_us"
                    " WHERE audit_leases.expires_us < ? OR audit_leases.holder = excluded.holder",
                    (name, holder, now + int(ttl_seconds * 1_000_000), now),
                )
                row = conn.execute("SELECT holder FROM audit_leases WHERE name = ?", (name,)).fetchone()
                return bool(row and row[0] == holder)

            return self._transaction(conn, work)

        return await self._run(acquire)


def _where(query: AuditQuery) -> tuple[str, list[Any]]:
    clauses = [f"{column} = ?" for column, _ in query_filters(query)]
    args: list[Any] = [value for _, value in query_filters(query)]
    if query.since_us is not None:
        clauses.append("time_us >= ?")
        args.append(query.since_us)
    if query.until_us is not None:
        clauses.append("time_us < ?")
        args.append(query.until_us)
    if query.cursor is not None:
        time_us, row_id = decode_cursor(query.cursor)
        clauses.append("(time_us, id) > (?, ?)")
        args.extend([time_us, row_id])
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", args
