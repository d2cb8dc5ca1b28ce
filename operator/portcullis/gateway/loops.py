"""The gateway's background loops: kept, paced, reported, and stopped in one place.

Every background task (the catalog refresher, one change stream per upstream, the cluster
watches of config, keys and revocations, one-shot publishes) is started through the
`BackgroundTasks` of the object whose lifetime it shares, never with a bare `create_task`:

- kept: the event loop holds tasks only weakly, so a task nobody references can be collected
  mid-flight (see `asyncio.create_task`). The owner's set holds each one until it is done.
- paced: a failed iteration is retried after a jittered, doubling delay, never at once and
  never given up on. Jitter comes from a generator of our own, not the module-level `random`.
- reported: a streak of failures is logged once (WARNING, with its reason) and its end once
  (INFO); each loop keeps a `LoopHealth` that `/v1/status` and `/readyz` show. Error text is
  shown only for errors whose messages are ours or the transport's; of anything else, only its
  type (the log has the traceback).
- stopped: `stop()` cancels and awaits every task, and never re-raises what a loop failed with.

Sleep and clock are injected, so tests drive the loops in virtual time.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp

from portcullis.gateway.upstream import UpstreamError, UpstreamRPCError
from portcullis.kube import KubeError

log = logging.getLogger("portcullis.gateway")

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]

# Errors whose text names what failed and never a secret (upstream errors are shown to agents
# already; Kubernetes Status messages name objects, not their data; transport errors name hosts).
_SHOWN = (UpstreamError, UpstreamRPCError, KubeError, aiohttp.ClientError, OSError)
# A stream that lasted this long was a working stream, whatever ended it.
STABLE_AFTER = 10.0


def describe(error: BaseException | str) -> str:
    """Text about a failure that is safe to show on the status endpoints."""
    if isinstance(error, str):
        return error
    if isinstance(error, _SHOWN) and str(error):
        return f"{type(error).__name__}: {error}"
    return type(error).__name__


class Backoff:
    """Delays from `minimum`, doubling to `maximum`, each jittered down by up to half."""

    def __init__(self, minimum: float, maximum: float, rng: random.Random | None = None) -> None:
        self.minimum, self.maximum = minimum, max(minimum, maximum)
        self._rng = rng or random.Random()
        self._step = self.minimum

    def delay(self) -> float:
        delay = self._step * self._rng.uniform(0.5, 1.0)
        self._step = min(self._step * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self._step = self.minimum


@dataclass
class LoopHealth:
    name: str
    failing_since: float | None = None
    """Wall-clock time of the first failure of the current streak; None while healthy."""
    last_error: str | None = None
    failures: int = 0
    """Consecutive failures."""
    synced: bool = False
    """The loop has done its work at least once."""

    def to_dict(self) -> dict[str, Any]:
        since = self.failing_since
        return {
            "failing": since is not None,
            "failingSince": None if since is None else _rfc3339(since),
            "lastError": self.last_error,
            "consecutiveFailures": self.failures,
            "synced": self.synced,
        }


class Loop:
    """One background loop's health and pacing; its body calls `ok`, `failed` and `pause`."""

    def __init__(
        self,
        name: str,
        *,
        tasks: BackgroundTasks | None = None,
        backoff: Backoff | None = None,
        gates_readiness: bool = False,
    ) -> None:
        self.name = name
        self.tasks = tasks or BackgroundTasks()
        self.sleep: Sleep = self.tasks.sleep
        self.clock: Clock = self.tasks.clock
        self.backoff = backoff or Backoff(1.0, 60.0, self.tasks.rng)
        self.gates_readiness = gates_readiness
        self.health = LoopHealth(name)

    def ok(self) -> None:
        """An iteration worked: the end of a failure streak, if there was one."""
        health = self.health
        health.synced = True
        if health.failing_since is not None:
            log.info("%s recovered after %d failed attempt(s)", self.name, health.failures)
            health.failing_since, health.last_error, health.failures = None, None, 0

    def mark_synced(self) -> None:
        """The loop has its data (for readiness); only `ok` ends a failure streak."""
        self.health.synced = True

    def failed(self, error: BaseException | str) -> None:
        """An iteration failed: logged if it starts a streak, counted in any case."""
        health = self.health
        health.failures += 1
        health.last_error = describe(error)
        if health.failing_since is None:
            health.failing_since = self.clock()
            # A type we did not anticipate is a bug: its traceback, once.
            trace = error if isinstance(error, BaseException) and not isinstance(error, _SHOWN) else None
            log.warning("%s failed: %s; retrying with backoff until it recovers", self.name, health.last_error, exc_info=trace)
        else:
            log.debug("%s failed again (%d in a row): %s", self.name, health.failures, health.last_error)

    async def pause(self) -> None:
        """Sleep the next backoff delay."""
        await self.sleep(self.backoff.delay())

    async def repeat(self, step: Callable[[], Awaitable[None]], every: float) -> None:
        """Run `step` now and every `every` seconds after; a failed step is retried with backoff."""
        while True:
            try:
                await step()
            except Exception as exc:
                self.failed(exc)
                await self.pause()
            else:
                self.ok()
                self.backoff.reset()
                await self.sleep(every)


class StreamWatch:
    """The health and pacing of a loop that holds one long-lived stream after another.

    The stream's code calls `opened()` when a stream is open and `ended(reason)` when it, or
    the attempt to open it, is over. A failure to open is a failure. A stream that served
    `stable_after` seconds was healthy, whatever ended it: the next opens after the minimum
    delay. One that ended sooner (an upstream or proxy that closes every stream at once) makes
    the delay grow, and from the second in a row it is a failure; then an open stream counts
    as a recovery only once it has lasted `stable_after`, so a stream that flaps is one streak
    in the log, not two lines per reconnect. Fits `portcullis.kube.WatchObserver`.
    """

    def __init__(self, loop: Loop, stable_after: float = STABLE_AFTER) -> None:
        self.loop = loop
        self.stable_after = stable_after
        self._opened_at: float | None = None
        self._short = 0  # streams in a row that ended before stable_after
        self._proving: asyncio.Task[Any] | None = None

    def opened(self) -> None:
        self._opened_at = self.loop.clock()
        if self._short == 0:
            self.loop.backoff.reset()
        if self._short < 2:
            self.loop.ok()
        elif self._proving is None:
            self._proving = self.loop.tasks.spawn(self._prove(), name=f"{self.loop.name}-proving")

    async def _prove(self) -> None:
        await self.loop.sleep(self.stable_after)
        self._short = 0
        self.loop.ok()

    def ended(self, reason: BaseException | str | None) -> None:
        opened_at = self._opened_at
        self.abandon()
        lived = None if opened_at is None else self.loop.clock() - opened_at
        if lived is not None and lived >= self.stable_after:
            self._short = 0
            self.loop.backoff.reset()
            if reason is not None:  # a proxy's idle cut, an upstream restart: routine
                log.debug("%s: a stream ended after %.0fs: %s", self.loop.name, lived, describe(reason))
            return
        if lived is not None:
            self._short += 1
            if reason is None and self._short >= 2:
                reason = f"streams keep ending at once ({self._short} in a row, the last after {lived:.1f}s)"
        elif reason is None:
            reason = "the stream ended before it opened"
        if reason is not None:
            self.loop.failed(reason)

    def abandon(self) -> None:
        """Forget the current stream without a verdict on it (cancelled, or cut short by a bug)."""
        self._opened_at = None
        if self._proving is not None:
            self._proving.cancel()
            self._proving = None

    async def pause(self) -> None:
        await self.loop.pause()


class BackgroundTasks:
    """The background tasks of one owner: each referenced until done, all stopped together."""

    def __init__(self, *, sleep: Sleep = asyncio.sleep, clock: Clock = time.time, rng: random.Random | None = None) -> None:
        self.sleep = sleep
        self.clock = clock
        self.rng = rng or random.Random()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.loops: dict[str, Loop] = {}

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """Run `coro` in the background, referenced until it is done; a failure is logged."""
        task = asyncio.get_running_loop().create_task(coro, name=f"portcullis-{name}")
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            trace = None if isinstance(exc, _SHOWN) else exc  # a bug's traceback; a known failure's text is enough
            log.warning("background task %s failed: %s", task.get_name(), describe(exc), exc_info=trace)

    def run(
        self,
        name: str,
        body: Callable[[Loop], Coroutine[Any, Any, None]],
        *,
        minimum: float = 1.0,
        maximum: float = 60.0,
        gates_readiness: bool = False,
    ) -> asyncio.Task[Any]:
        """Run a loop body with its own `Loop` (health and backoff), reported under `name`."""
        loop = Loop(name, tasks=self, backoff=Backoff(minimum, maximum, self.rng), gates_readiness=gates_readiness)
        self.loops[name] = loop

        def forget(_: asyncio.Task[Any]) -> None:
            if self.loops.get(name) is loop:  # not a successor of the same name
                del self.loops[name]

        task = self.spawn(body(loop), name=name)
        task.add_done_callback(forget)
        return task

    def repeat(
        self, name: str, step: Callable[[], Awaitable[None]], *, every: float, minimum: float = 1.0, maximum: float = 60.0
    ) -> asyncio.Task[Any]:
        """Run `step` now and every `every` seconds; a failure is retried sooner, with backoff."""
        return self.run(name, lambda loop: loop.repeat(step, every), minimum=minimum, maximum=maximum)

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: loop.health.to_dict() for name, loop in sorted(self.loops.items())}

    def failing(self) -> dict[str, str]:
        """Failing loops and their last error."""
        return {
            name: loop.health.last_error or ""
            for name, loop in sorted(self.loops.items())
            if loop.health.failing_since is not None
        }

    def unsynced(self) -> list[str]:
        """Loops that gate readiness and have not done their work once yet."""
        return [name for name, loop in sorted(self.loops.items()) if loop.gates_readiness and not loop.health.synced]

    async def stop(self) -> None:
        """Cancel every task and wait for it; what one failed with was logged and is not raised."""
        while self.tasks:
            pending = list(self.tasks)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


def _rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
