"""Rate limits and quotas: at most `calls` calls per fixed window, per user or per user and tool.

A `Limit` is declared on a VirtualMCPServer (all its tools) or a ToolMapping (its tools); the
caller builds one key per limit with `key_for` and asks a `Limiter` to `hit` it once per call.
Windows are fixed and aligned to the epoch (start = floor(now / window) * window), so a
per-day quota resets at 00:00 UTC. A denied call is not counted; an allowed one is counted even
if a later check refuses the call, so hit the limits of a call scarcest first.

**Accuracy with N replicas.** `PostgresLimiter` is exact: each hit is one atomic
`INSERT ... ON CONFLICT DO UPDATE ... WHERE count < calls`, which locks the window's row and
re-checks the count on its latest committed version (PostgreSQL's guarantee for ON CONFLICT
under READ COMMITTED), so no window ever counts more than `calls` calls, whatever the number
of replicas, pools or processes. `MemoryLimiter` counts per replica: with N replicas behind a
load balancer a user gets at most N x `calls` per window.

**Why PostgreSQL, not Redis.** Redis would be the usual store for counters, but it would add a
server to run, secure and back up, and a client library to the gateway. The platform already
runs PostgreSQL for the audit trail and the gateway already speaks to it with asyncpg; a hit is
one round trip of one single-row upsert, like a Redis INCR, and exact without a Lua script.
Counters of one key serialize on one row lock, which bounds one user's rate (thousands of calls
a second), not the gateway's. Without PostgreSQL, `MemoryLimiter` is the fallback.

**Failures.** Every database error, refused connection or timeout (`timeout`, default 2 s, which
covers connecting) leaves `PostgresLimiter.hit` as `LimitsUnavailable`. Whether a call then
proceeds (fail open) or is refused (fail closed) is the caller's decision; the limiter never
guesses. A hit that timed out may still have been counted. The next hit tries again (the pool
reconnects). Messages never contain the DSN.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

import asyncpg

from portcullis.gateway.audit.postgres import _close_pool, _describe

log = logging.getLogger(__name__)

MINUTE: Final = 60
DAY: Final = 86_400
TABLE: Final = "portcullis_rate_limits"
_SCHEMA_LOCK: Final = int.from_bytes(hashlib.sha256(b"portcullis.limits/schema").digest()[:8], "big", signed=True)


@dataclass(frozen=True)
class Limit:
    """At most `calls` calls per `window_seconds` (e.g. 60 or 86 400).

    scope "user": one counter per user for all tools the limit covers; "user+tool": one counter
    per user and tool.
    """

    calls: int
    window_seconds: int
    scope: Literal["user", "user+tool"] = "user"

    def __post_init__(self) -> None:
        if not 1 <= self.calls < 2**31:  # the count column is an integer
            raise ValueError(f"calls must be between 1 and 2**31 - 1, not {self.calls}")
        if self.window_seconds < 1:
            raise ValueError(f"window_seconds must be at least 1, not {self.window_seconds}")
        if self.scope not in ("user", "user+tool"):
            raise ValueError(f"scope must be 'user' or 'user+tool', not {self.scope!r}")


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after_seconds: float
    """0 when allowed; else the seconds until the window ends."""
    count: int
    """Calls counted in the window: this call's number when allowed, `limit.calls` when denied."""
    limit: Limit


class LimitsUnavailable(Exception):
    """The shared store could not count this call; the caller fails open or closed."""


class Limiter(Protocol):
    @property
    def shared(self) -> bool:
        """True when the counts hold across replicas."""
        ...

    async def hit(self, key: str, limit: Limit, *, now: float | None = None) -> Verdict:
        """Count one call under `key` if `limit` allows it (a denied call is not counted)."""
        ...

    async def close(self) -> None: ...


def key_for(server: str, user: str, tool: str | None, limit: Limit) -> str:
    """The counter's key: server, a digest of the user, the tool ("*" for scope "user"), the limit.

    The user id is hashed (it may be an email). Server and tool are percent-quoted, so the key
    is unambiguous. The limit is part of the key, so two limits never share a counter; identical
    limits do, so count each distinct key once per call.
    """
    if limit.scope == "user+tool" and tool is None:
        raise ValueError("a 'user+tool' limit needs the tool")
    user_digest = hashlib.sha256(user.encode()).hexdigest()[:32]
    tool_part = urllib.parse.quote(tool, safe="") if limit.scope == "user+tool" and tool is not None else "*"
    return f"{urllib.parse.quote(server, safe='')}/{user_digest}/{tool_part}/{limit.calls}per{limit.window_seconds}s"


def window_start(now: float, window_seconds: int) -> int:
    return math.floor(now / window_seconds) * window_seconds


def _verdict(count: int | None, start: int, now: float, limit: Limit) -> Verdict:
    if count is None:
        return Verdict(False, max(start + limit.window_seconds - now, 0.0), limit.calls, limit)
    return Verdict(True, 0.0, count, limit)


class MemoryLimiter:
    """Counts in this process: exact for one replica, N x `calls` at worst for N.

    Holds one entry per key (its current window). Expired entries are dropped every
    `sweep_every` seconds and whenever `max_entries` is reached; if 90 % of that many windows
    are still live, the oldest-started are forgotten down to 90 % (so a full table costs one scan
    per tenth of it, not per hit), which can only let calls through, never refuse them.
    Not thread-safe: one event loop (`hit` never awaits, so it is atomic there).
    """

    shared: bool = False

    def __init__(self, *, max_entries: int = 100_000, sweep_every: float = 60.0) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._sweep_every = sweep_every
        self._next_sweep = -math.inf
        self._windows: dict[str, tuple[int, int, int]] = {}
        """key -> (window start, window end, count), oldest-started first."""

    def __len__(self) -> int:
        return len(self._windows)

    async def hit(self, key: str, limit: Limit, *, now: float | None = None) -> Verdict:
        now = time.time() if now is None else now
        if now >= self._next_sweep or len(self._windows) >= self._max_entries:
            self._sweep(now)
        start = window_start(now, limit.window_seconds)
        entry = self._windows.get(key)
        count = entry[2] if entry is not None and entry[0] == start else 0
        if count >= limit.calls:
            return _verdict(None, start, now, limit)
        if count == 0:
            self._windows.pop(key, None)  # a new window goes to the end, with the youngest
        self._windows[key] = (start, start + limit.window_seconds, count + 1)
        return _verdict(count + 1, start, now, limit)

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self._sweep_every
        for key in [k for k, (_, end, _) in self._windows.items() if end <= now]:
            del self._windows[key]
        if len(self._windows) >= self._max_entries:
            for key in list(self._windows)[: len(self._windows) - self._max_entries * 9 // 10]:
                del self._windows[key]

    async def close(self) -> None:
        self._windows.clear()


_CREATE: Final = f"""CREATE TABLE IF NOT EXISTS {TABLE} (
    key text NOT NULL,
    window_start bigint NOT NULL,
    expires_at bigint NOT NULL,
    count integer NOT NULL,
    PRIMARY KEY (key, window_start)
) WITH (fillfactor = 70)"""  # room on each page, so that count updates stay HOT (no index change)

_NOW: Final = "coalesce($1::float8, extract(epoch FROM statement_timestamp())::float8)"

# $1 now (NULL: the database's clock), $2 key, $3 window seconds, $4 calls. The INSERT returns no
# row when the window is full (the WHERE refused the update); the outer SELECT still returns the clock.
_HIT: Final = f"""
WITH clock AS (SELECT {_NOW} AS now),
hit AS (
    INSERT INTO {TABLE} AS t (key, window_start, expires_at, count)
    SELECT $2, s.start, s.start + $3::integer, 1
    FROM (SELECT floor(now / $3::integer)::bigint * $3::integer AS start FROM clock) AS s
    ON CONFLICT (key, window_start) DO UPDATE SET count = t.count + 1 WHERE t.count < $4::integer
    RETURNING t.count
)
SELECT clock.now, (SELECT count FROM hit) AS count FROM clock
"""

_PRUNE: Final = f"DELETE FROM {TABLE} WHERE expires_at <= {_NOW}"


class PostgresLimiter:
    """Counts in one PostgreSQL table shared by every replica: exact (see the module's docstring).

    Give a DSN (the limiter owns its pool) or an asyncpg pool (the caller owns it). The table is
    created if missing on first use. Windows follow the database's clock unless `now` is given.
    Every `prune_every` seconds a hit also starts, in the background, a DELETE of expired windows.
    """

    shared: bool = True

    def __init__(
        self, dsn_or_pool: str | Any, *, timeout: float = 2.0, prune_every: float = 300.0, max_size: int = 4,
    ) -> None:
        self._dsn = dsn_or_pool if isinstance(dsn_or_pool, str) else None
        self._pool: Any = None if self._dsn is not None else dsn_or_pool
        """None until opened (DSN) or after closing; a pool given is never closed here."""
        self._migrated = False
        self._timeout = timeout
        self._max_size = max_size
        self._prune_every = prune_every
        self._next_prune = time.monotonic() + prune_every
        self._pruning: asyncio.Task[int] | None = None
        self._opening = asyncio.Lock()
        self.where = _describe(self._dsn) if self._dsn is not None else "(a pool given by the caller)"

    @contextlib.contextmanager
    def _translated(self, doing: str) -> Iterator[None]:
        """The one place foreign errors become LimitsUnavailable (never with the DSN in it)."""
        try:
            yield
        except asyncpg.PostgresError as exc:  # the server's words: no client URL in them
            raise LimitsUnavailable(f"rate limits in PostgreSQL {self.where}: {doing}: {exc}") from exc
        except (TimeoutError, OSError) as exc:  # no DSN in these either
            named = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise LimitsUnavailable(f"rate limits in PostgreSQL {self.where}: {doing}: {named}") from None
        except (asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:  # may have parsed the DSN: no text
            raise LimitsUnavailable(f"rate limits in PostgreSQL {self.where}: {doing}: {type(exc).__name__}") from None

    async def open(self) -> None:
        """Connect (a DSN) and create the table if missing; `hit` does it when needed."""
        async with self._opening:
            with self._translated("connecting"):
                if self._pool is None:
                    assert self._dsn is not None
                    self._pool = await asyncpg.create_pool(
                        self._dsn, min_size=1, max_size=self._max_size, timeout=self._timeout,
                        server_settings={"application_name": "portcullis-limits"},
                    )
                if not self._migrated:
                    async with self._pool.acquire() as conn, conn.transaction():
                        # Even CREATE TABLE IF NOT EXISTS fails when two sessions run it at once.
                        await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
                        await conn.execute(_CREATE)
                    self._migrated = True

    async def hit(self, key: str, limit: Limit, *, now: float | None = None) -> Verdict:
        with self._translated("counting a call"):
            async with asyncio.timeout(self._timeout):
                if not self._migrated:
                    await self.open()
                row = await self._pool.fetchrow(_HIT, now, key, limit.window_seconds, limit.calls)
        clock = float(row["now"])
        if time.monotonic() >= self._next_prune and self._pruning is None:
            self._next_prune = time.monotonic() + self._prune_every
            self._pruning = asyncio.create_task(self._prune_in_background(now))
        return _verdict(row["count"], window_start(clock, limit.window_seconds), clock, limit)

    async def prune(self, *, now: float | None = None) -> int:
        """Delete the windows that have ended; how many rows went."""
        with self._translated("pruning expired windows"):
            if not self._migrated:
                await self.open()
            status = await self._pool.execute(_PRUNE, now)
        return int(status.split()[-1])  # "DELETE <n>"

    async def _prune_in_background(self, now: float | None) -> int:
        try:
            return await self.prune(now=now)
        except LimitsUnavailable as exc:
            log.warning("could not prune expired rate limit windows: %s", exc)
            return 0
        finally:
            self._pruning = None

    async def close(self) -> None:
        task, self._pruning = self._pruning, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._dsn is not None:
            pool, self._pool = self._pool, None
            self._migrated = False
            if pool is not None:
                await _close_pool(pool)
