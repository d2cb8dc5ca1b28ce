"""`KubeClient.watch` never reopens a stream without a pause unless the last one served its time.

Virtual time: the watch's sleep and clock are injected; the sleep records each requested pause
and advances the clock by it, without waiting. Servers are real HTTP on loopback: kmock's
emulator, and a scripted aiohttp server for sequences the emulator cannot play.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import pytest
from aiohttp import web

from portcullis.kube import KubeClient, KubeError
from tests.support.kmock_support import emulator

pytestmark = pytest.mark.anyio
CM = "/api/v1/namespaces/acme/configmaps"


class Enough(Exception):
    """Ends an endless watch after a bounded number of reconnects."""


class Time:
    def __init__(self, stop_after: int | None = None) -> None:
        self.now = 0.0
        self.pauses: list[float] = []
        self.stop_after = stop_after

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds
        if self.stop_after is not None and len(self.pauses) >= self.stop_after:
            raise Enough


def within_jitter(pauses: list[float], steps: list[float]) -> bool:
    """Each pause is its step jittered down by at most half."""
    return len(pauses) == len(steps) and all(step / 2 <= pause <= step for pause, step in zip(pauses, steps))


async def test_streams_that_close_at_once_are_reopened_after_growing_pauses() -> None:
    time = Time(stop_after=8)
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        k8s["watch", CM] << b""  # 200, and the stream ends at once: every time
        with anyio.fail_after(10), pytest.raises(Enough):
            async for _ in client.watch(CM, max_backoff=2.0, sleep=time.sleep, clock=time.clock):
                pytest.fail("the stream carries no events")
        watches = [r for r in k8s if r.params.get("watch") == "true"]
    assert len(watches) == 8  # eight streams, and a pause after each: no hot loop
    assert within_jitter(time.pauses, [0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0, 2.0]), time.pauses


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def closes_at_once() -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return web.Response(status=200, content_type="application/json", body=b"")

    return handle


def one_event(name: str, rv: str) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        event = {"type": "ADDED", "object": {"metadata": {"name": name, "resourceVersion": rv}}}
        return web.Response(status=200, content_type="application/json", body=json.dumps(event).encode() + b"\n")

    return handle


def status(code: int, reason: str) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        body = {"kind": "Status", "code": code, "reason": reason, "message": f"{reason.lower()} for this test"}
        return web.json_response(body, status=code)

    return handle


@asynccontextmanager
async def scripted_api(*script: Handler) -> AsyncIterator[tuple[str, list[str | None]]]:
    """An API server whose n-th watch request gets the n-th handler; the versions asked for are recorded."""
    steps = list(script)
    asked: list[str | None] = []

    async def watch(request: web.Request) -> web.StreamResponse:
        asked.append(request.query.get("resourceVersion"))
        return await (steps.pop(0) if steps else closes_at_once())(request)

    app = web.Application()
    app.router.add_get(CM, watch)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}", asked
    finally:
        await runner.cleanup()


class Observer:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def opened(self) -> None:
        self.seen.append("opened")

    def ended(self, failure: str | None) -> None:
        self.seen.append(f"ended: {failure}" if failure else "ended")


async def test_a_stream_that_served_its_time_resets_the_pauses_and_errors_pause_too() -> None:
    time, observer = Time(), Observer()
    script = (
        closes_at_once(),
        closes_at_once(),
        one_event("one", "7"),  # the consumer holds this one for a minute (below)
        closes_at_once(),
        status(500, "InternalError"),
        status(410, "Gone"),
        status(403, "Forbidden"),
    )
    async with scripted_api(*script) as (url, asked), KubeClient(url) as client:
        with anyio.fail_after(10), pytest.raises(KubeError) as refused:
            async for kind, obj in client.watch(CM, "3", sleep=time.sleep, clock=time.clock, observer=observer):
                assert (kind, obj["metadata"]["name"]) == ("ADDED", "one")
                time.now += 60  # a stream that lived a minute: it served
    assert refused.value.status == 403  # not retried: retrying cannot fix it
    # 0.2, 0.4 while streams close at once; none after the stream that served; then from 0.2 again,
    # growing through the 500 and the 410 (which also drops the stale version).
    assert within_jitter(time.pauses, [0.2, 0.4, 0.2, 0.4, 0.8]), time.pauses
    assert asked == ["3", "3", "3", "7", "7", "7", None]
    assert observer.seen == [
        "opened", "ended", "opened", "ended", "opened", "ended", "opened", "ended",
        "ended: 500 InternalError: internalerror for this test",
    ]


async def test_an_unreachable_api_server_is_retried_after_growing_pauses() -> None:
    time, observer = Time(stop_after=4), Observer()
    async with scripted_api() as (url, _):
        pass  # the port is closed again: connections are refused
    async with KubeClient(url) as client:
        with anyio.fail_after(10), pytest.raises(Enough):
            async for _ in client.watch(CM, sleep=time.sleep, clock=time.clock, observer=observer):
                pytest.fail("no server, no events")
    assert within_jitter(time.pauses, [0.2, 0.4, 0.8, 1.6]), time.pauses
    assert len(observer.seen) == 4 and all(s.startswith("ended: ClientConnectorError") for s in observer.seen)
