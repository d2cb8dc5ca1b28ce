"""Rate limits: the per-replica MemoryLimiter, and the PostgresLimiter against a real PostgreSQL,
exact across pools and across OS processes."""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from portcullis.gateway.policy.limits import (
    DAY,
    MINUTE,
    TABLE,
    Limit,
    Limiter,
    LimitsUnavailable,
    MemoryLimiter,
    PostgresLimiter,
    Verdict,
    key_for,
)
from tests.support.postgres import PostgresServer, free_port

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[3]
T0 = 1_773_532_800.0  # 2026-03-15T00:00:00Z: a minute and a day edge
PER_MINUTE = Limit(3, MINUTE)


# --- the model and the keys --------------------------------------------------------------


def test_limits_are_validated() -> None:
    assert Limit(30, MINUTE).scope == "user"
    for bad in ({"calls": 0, "window_seconds": 60}, {"calls": 2**31, "window_seconds": 60},
                {"calls": 1, "window_seconds": 0}, {"calls": 1, "window_seconds": 60, "scope": "tool"}):
        with pytest.raises(ValueError):
            Limit(**bad)


def test_keys_hash_the_user_and_tell_limits_apart() -> None:
    per_tool = Limit(10, DAY, "user+tool")
    key = key_for("acme/summarizer", "alice@example.com", "fetch_mails", per_tool)
    assert "alice" not in key and "example" not in key
    assert hashlib.sha256(b"alice@example.com").hexdigest()[:32] in key
    assert key == key_for("acme/summarizer", "alice@example.com", "fetch_mails", per_tool)
    others = {
        key_for("acme/summarizer", "bob@example.com", "fetch_mails", per_tool),
        key_for("acme/summarizer", "alice@example.com", "search_mails", per_tool),
        key_for("acme/other", "alice@example.com", "fetch_mails", per_tool),
        key_for("acme/summarizer", "alice@example.com", "fetch_mails", Limit(10, MINUTE, "user+tool")),
        key_for("acme/summarizer", "alice@example.com", "fetch_mails", Limit(11, DAY, "user+tool")),
        key_for("acme/summarizer", "alice@example.com", "*", per_tool),
        key_for("acme/summarizer", "alice@example.com", None, Limit(10, DAY)),
    }
    assert key not in others and len(others) == 7
    # Scope "user" counts every tool together; "user+tool" needs the tool.
    assert key_for("s", "u", "a", PER_MINUTE) == key_for("s", "u", None, PER_MINUTE)
    with pytest.raises(ValueError):
        key_for("s", "u", None, per_tool)
    # Separators in names cannot make two keys collide.
    assert key_for("a/b", "u", "c", per_tool) != key_for("a", "u", "b/c", per_tool)


# --- MemoryLimiter -------------------------------------------------------------------------


async def test_memory_allows_calls_per_window_then_refuses_until_it_ends() -> None:
    limiter: Limiter = MemoryLimiter()
    assert limiter.shared is False
    verdicts = [await limiter.hit("k", PER_MINUTE, now=T0 + 15) for _ in range(3)]
    assert [(v.allowed, v.count, v.retry_after_seconds) for v in verdicts] == [(True, 1, 0), (True, 2, 0), (True, 3, 0)]
    assert await limiter.hit("k", PER_MINUTE, now=T0 + 15) == Verdict(False, 45.0, 3, PER_MINUTE)
    assert await limiter.hit("k", PER_MINUTE, now=T0 + 59.75) == Verdict(False, 0.25, 3, PER_MINUTE)
    # The next window starts afresh, on the minute (epoch-aligned, not 60 s after the first call).
    assert await limiter.hit("k", PER_MINUTE, now=T0 + 60) == Verdict(True, 0.0, 1, PER_MINUTE)
    # Keys are independent.
    assert (await limiter.hit("other", PER_MINUTE, now=T0 + 60.5)).count == 1
    assert (await limiter.hit("k", PER_MINUTE, now=T0 + 61)).count == 2
    await limiter.close()


async def test_memory_uses_the_clock_when_not_told_the_time() -> None:
    limiter = MemoryLimiter()
    day = Limit(1, DAY)
    assert (await limiter.hit("k", day)).allowed
    refused = await limiter.hit("k", day)
    assert not refused.allowed and 0 < refused.retry_after_seconds <= DAY


async def test_memory_stays_bounded() -> None:
    limiter = MemoryLimiter(max_entries=100, sweep_every=30)
    for i in range(1000):
        assert (await limiter.hit(f"user-{i}", PER_MINUTE, now=T0 + i / 100)).allowed
        assert len(limiter) <= 100
    # Live windows stay (the cap forgets the oldest-started only); expired ones go at the next sweep.
    await limiter.hit("day", Limit(5, DAY), now=T0 + 10)
    assert 50 < len(limiter) <= 100
    await limiter.hit("later", PER_MINUTE, now=T0 + 120)
    assert len(limiter) == 2  # "day" and "later"
    assert (await limiter.hit("day", Limit(5, DAY), now=T0 + 121)).count == 2


# --- PostgresLimiter -----------------------------------------------------------------------




@asynccontextmanager
async def limiter_at(url: str, **options: Any) -> AsyncIterator[PostgresLimiter]:
    limiter = PostgresLimiter(url, **options)
    try:
        yield limiter
    finally:
        await limiter.close()


async def rows(url: str) -> list[tuple[str, int, int, int]]:
    conn = await asyncpg.connect(url)
    try:
        found = await conn.fetch(f"SELECT key, window_start, expires_at, count FROM {TABLE} ORDER BY key, window_start")
    finally:
        await conn.close()
    return [tuple(r) for r in found]


async def test_postgres_counts_per_window_and_never_counts_a_denial(database: str) -> None:
    async with limiter_at(database) as limiter:
        assert limiter.shared is True
        verdicts = [await limiter.hit("k", PER_MINUTE, now=T0 + 15) for _ in range(3)]
        assert [(v.allowed, v.count) for v in verdicts] == [(True, 1), (True, 2), (True, 3)]
        assert await limiter.hit("k", PER_MINUTE, now=T0 + 15) == Verdict(False, 45.0, 3, PER_MINUTE)
        assert await limiter.hit("k", PER_MINUTE, now=T0 + 59.5) == Verdict(False, 0.5, 3, PER_MINUTE)
        assert await limiter.hit("k", PER_MINUTE, now=T0 + 60) == Verdict(True, 0.0, 1, PER_MINUTE)
        assert (await limiter.hit("other", PER_MINUTE, now=T0 + 60)).count == 1
    start = int(T0)
    assert await rows(database) == [
        ("k", start, start + 60, 3), ("k", start + 60, start + 120, 1), ("other", start + 60, start + 120, 1),
    ]


async def test_postgres_follows_the_database_clock_when_not_told_the_time(database: str) -> None:
    year = Limit(1, 365 * DAY)
    async with limiter_at(database) as limiter:
        assert (await limiter.hit("k", year)).allowed
        refused = await limiter.hit("k", year)
    assert not refused.allowed and 0 < refused.retry_after_seconds <= year.window_seconds


async def test_two_replicas_never_exceed_the_limit(database: str) -> None:
    limit = Limit(30, MINUTE)
    async with limiter_at(database, max_size=10) as one, limiter_at(database, max_size=10) as two:
        await asyncio.gather(one.open(), two.open())  # both create the table at once, too
        with anyio.fail_after(20):
            verdicts = await asyncio.gather(
                *(replica.hit("k", limit, now=T0 + 30) for _ in range(50) for replica in (one, two))
            )
    allowed = [v for v in verdicts if v.allowed]
    assert len(allowed) == 30 and sorted(v.count for v in allowed) == list(range(1, 31))
    assert all(v.retry_after_seconds == 30.0 for v in verdicts if not v.allowed)
    assert [r[3] for r in await rows(database)] == [30]


REPLICA = """
import asyncio, sys
from portcullis.gateway.policy.limits import Limit, PostgresLimiter

async def main() -> None:
    limiter = PostgresLimiter(sys.argv[1], max_size=10, timeout=15)
    limit, now = Limit(30, 60), float(sys.argv[2])
    await asyncio.gather(*(limiter.hit("warm-up", limit, now=now) for _ in range(10)))  # open the pool's connections
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    verdicts = await asyncio.gather(*(limiter.hit("k", limit, now=now) for _ in range(50)))
    print(sum(v.allowed for v in verdicts), flush=True)
    await limiter.close()

asyncio.run(main())
"""


async def test_two_processes_never_exceed_the_limit(database: str) -> None:
    async with limiter_at(database) as limiter:
        await limiter.open()  # the table, before the race under test
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", REPLICA, database, str(T0 + 30), cwd=REPO,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    try:
        with anyio.fail_after(25):
            for process in processes:
                assert process.stdout is not None
                line = await process.stdout.readline()
                if line != b"ready\n":
                    _, err = await process.communicate()
                    pytest.fail(f"replica did not start: {line!r}\n{err.decode()}")
            for process in processes:  # both fire at once
                assert process.stdin is not None
                process.stdin.write(b"go\n")
                await process.stdin.drain()
            results = [await process.communicate() for process in processes]
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert [p.returncode for p in processes] == [0, 0], [err.decode() for _, err in results]
    allowed = [int(out) for out, _ in results]
    assert sum(allowed) == 30, allowed
    assert [r[3] for r in await rows(database) if r[0] == "k"] == [30]


async def test_pruning_drops_ended_windows_only(database: str) -> None:
    day = Limit(5, DAY)
    async with limiter_at(database) as limiter:
        await limiter.hit("minute", PER_MINUTE, now=T0 + 1)
        await limiter.hit("minute", PER_MINUTE, now=T0 + 61)
        await limiter.hit("day", day, now=T0 + 1)
        assert await limiter.prune(now=T0 + 59.9) == 0  # no window has ended yet
        assert await limiter.prune(now=T0 + 120) == 2  # both minutes have ended, not the day
        assert [r[:2] for r in await rows(database)] == [("day", int(T0))]
        assert (await limiter.hit("day", day, now=T0 + 121)).count == 2
        assert await limiter.prune(now=T0 + DAY) == 1
        assert await rows(database) == []


async def test_pruning_runs_now_and_then_in_the_background(database: str) -> None:
    async with limiter_at(database, prune_every=3600) as limiter:
        await limiter.hit("old", PER_MINUTE, now=T0)
        await limiter.hit("new", PER_MINUTE, now=T0 + DAY)
        assert len(await rows(database)) == 2  # not due yet: no prune on every call
    async with limiter_at(database, prune_every=0) as limiter:
        await limiter.hit("new", PER_MINUTE, now=T0 + DAY)  # due: starts a prune at that time
        with anyio.fail_after(10):
            while [r[0] for r in await rows(database)] != ["new"]:
                await anyio.sleep(0.02)


async def test_an_unreachable_database_raises_limits_unavailable() -> None:
    port = free_port()  # nothing listens there
    async with limiter_at(f"postgresql://portcullis:hunter2-secret@127.0.0.1:{port}/limits") as limiter:
        with pytest.raises(LimitsUnavailable) as caught:
            await limiter.hit("k", PER_MINUTE)
        assert "hunter2-secret" not in str(caught.value) and f"127.0.0.1:{port}/limits" in str(caught.value)
        assert caught.value.__cause__ is None
        with pytest.raises(LimitsUnavailable):
            await limiter.prune()


async def test_a_stuck_database_raises_limits_unavailable_after_the_timeout(database: str) -> None:
    async with limiter_at(database, timeout=0.5) as limiter:
        await limiter.hit("k", PER_MINUTE, now=T0)
        blocker = await asyncpg.connect(database)
        try:
            async with blocker.transaction():
                await blocker.execute(f"SELECT * FROM {TABLE} FOR UPDATE")  # the row stays locked
                with pytest.raises(LimitsUnavailable, match="TimeoutError"):
                    await limiter.hit("k", PER_MINUTE, now=T0)
        finally:
            await blocker.close()
        assert (await limiter.hit("k", PER_MINUTE, now=T0)).allowed  # the lock gone, calls count again


async def test_a_pool_given_is_used_and_left_open(database: str) -> None:
    pool = await asyncpg.create_pool(database, min_size=1, max_size=2)
    try:
        limiter = PostgresLimiter(pool)
        assert (await limiter.hit("k", PER_MINUTE, now=T0)).allowed
        await limiter.close()
        assert await pool.fetchval(f"SELECT count FROM {TABLE}") == 1
    finally:
        await pool.close()


async def test_limits_come_back_when_postgresql_does(postgres: PostgresServer, database: str) -> None:
    async with limiter_at(database) as limiter:
        await limiter.hit("k", PER_MINUTE, now=T0)
        postgres.stop()
        try:
            with pytest.raises(LimitsUnavailable):
                await limiter.hit("k", PER_MINUTE, now=T0)
        finally:
            postgres.start()
        with anyio.fail_after(10):  # the pool's dead connection fails once, then it reconnects
            while True:
                try:
                    verdict = await limiter.hit("k", PER_MINUTE, now=T0)
                    break
                except LimitsUnavailable:
                    await anyio.sleep(0.05)
    assert verdict.count == 2
