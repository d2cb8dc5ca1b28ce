"""The two clocks of one upstream request (`_Deadline`): idle, restarted by `touch`, inside a hard cap.

The call-level behaviour (progress keeps a call alive, a silent upstream is cut off) is tested
through the gateway in test_call_streams.py and test_upstream_faults.py; these pin the clock's
own rules, which those cannot reach with whole-second connection settings.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest

from portcullis.gateway.upstream import UpstreamError, _Deadline

pytestmark = pytest.mark.anyio

IDLE = 0.15
CAP = 0.6


def deadline(idle: float = IDLE, cap: float = CAP) -> _Deadline:
    config: Any = SimpleNamespace(name="mail", timeout_seconds=idle, max_duration_seconds=cap)
    task = asyncio.current_task()
    assert task is not None
    return _Deadline(config, asyncio.get_running_loop(), task)


async def test_a_silent_exchange_ends_at_the_idle_clock() -> None:
    started = time.monotonic()
    with pytest.raises(UpstreamError, match=r"sent nothing for 0.15s \(timeoutSeconds of connection mail\)"):
        async with deadline():
            await asyncio.sleep(5)
    assert IDLE <= time.monotonic() - started < CAP


async def test_touch_keeps_it_alive_until_the_cap() -> None:
    started = time.monotonic()
    with pytest.raises(UpstreamError, match=r"did not finish within 0.6s \(maxDurationSeconds of connection mail\)"):
        async with deadline() as clock:
            while True:
                await asyncio.sleep(IDLE / 3)
                clock.touch()
    assert CAP <= time.monotonic() - started < CAP + 0.3


async def test_after_hold_a_touch_brings_the_idle_clock_back() -> None:
    # hold() lets the timer run to the cap; the touch after it must pull the expiry back in.
    started = time.monotonic()
    with pytest.raises(UpstreamError, match="sent nothing for"):
        async with deadline(cap=5.0) as clock:
            clock.hold()
            await asyncio.sleep(IDLE * 2)  # past the idle clock: held, so still alive
            clock.touch()
            await asyncio.sleep(5)
    assert IDLE * 3 <= time.monotonic() - started < 1.5


async def test_an_exchange_that_ends_in_time_is_not_cancelled_later() -> None:
    async with deadline() as clock:
        clock.touch()
    await asyncio.sleep(IDLE * 2)  # the timer is gone: this sleep is not cut short
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_someone_elses_cancellation_stays_a_cancellation() -> None:
    async def exchange() -> None:
        async with deadline():
            await asyncio.sleep(5)

    task = asyncio.create_task(exchange())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_after_its_error_the_task_is_not_left_cancelling() -> None:
    # The clock's cancellation is taken back (uncancel) when it becomes the UpstreamError, so the
    # gateway's own timeouts later in the same call still work.
    with pytest.raises(UpstreamError):
        async with deadline():
            await asyncio.sleep(5)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    async with asyncio.timeout(1):
        await asyncio.sleep(0.01)
