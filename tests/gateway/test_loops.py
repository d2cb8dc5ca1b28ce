"""Background loops survive failed iterations, pace their retries, report their health, stop cleanly.

All in virtual time: a loop sleeps through `VirtualTime.sleep`, which returns only when the
test wakes it, and reads `VirtualTime.time`. The test asks for the next sleep of one task by
name and so sees every delay a loop requests; no test waits for real time to pass.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from portcullis.api.config import GatewayConfig
from portcullis.api.resources import MCPConnection, SecretKeyReference, ToolMapping, VirtualMCPServer
from portcullis.compile import compile_strict
from portcullis.gateway.admin import status
from portcullis.gateway.audit import MemoryAuditSink
from portcullis.gateway.audit.keys import MemoryAuditKeys
from portcullis.gateway.audit.trail import AuditTrail
from portcullis.gateway.cluster import watch_object
from portcullis.gateway.core import Gateway
from portcullis.gateway.endpoint import build_app, build_mcp_server
from portcullis.gateway.loops import BackgroundTasks
from portcullis.gateway.identity.revocation import KubernetesRevocations, MemoryRevocations
from portcullis.gateway.identity.tokens import SessionClaims, SigningKeys, TokenVerifier
from portcullis.gateway.upstream import LISTENING, UpstreamError
from portcullis.kube import KubeClient, KubeError
from portcullis.vault.base import MemoryVault
from tests.support.kmock_support import emulator

pytestmark = pytest.mark.anyio

START = 1_800_000_000.0  # 2027-01-15T08:00:00Z
REFRESHER = "portcullis-catalog-refresh"


class VirtualTime:
    """A clock that moves only when a sleeper is woken, and sleepers that wake when the test says."""

    def __init__(self, start: float = START) -> None:
        self.now = start
        self._asleep: defaultdict[str, asyncio.Queue[tuple[float, asyncio.Future[None]]]] = defaultdict(asyncio.Queue)
        self._held: dict[str, tuple[float, asyncio.Future[None]]] = {}

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._asleep[task.get_name()].put_nowait((seconds, woken))
        await woken

    def wake(self, task: str) -> None:
        """Let `task` finish the sleep it is in, as if its delay had passed."""
        seconds, woken = self._held.pop(task)
        self.now += seconds
        woken.set_result(None)

    async def next_sleep(self, task: str) -> float:
        """Wake `task` if it sleeps, wait (bounded) until it sleeps again; the delay it asked for."""
        if task in self._held:
            self.wake(task)
        with anyio.fail_after(5):
            while True:
                seconds, woken = await self._asleep[task].get()
                if not woken.cancelled():  # a sleeper cancelled meanwhile is no sleep to report
                    break
        self._held[task] = (seconds, woken)
        return seconds


class FlakySecrets:
    """The shared-credential lookup, failing like an API server that is restarting until fixed."""

    def __init__(self) -> None:
        self.broken = True

    async def __call__(self, namespace: str, ref: SecretKeyReference) -> str | None:
        if self.broken:
            raise KubeError(503, "ServiceUnavailable", "the API server is restarting")
        return "shared-token"


def config(credential: dict[str, Any]) -> GatewayConfig:
    server = VirtualMCPServer.model_validate({"metadata": {"name": "s", "namespace": "acme"}})
    # Port 1 refuses at once: listing fails as an unreachable upstream (recorded, no loop failure).
    connection = MCPConnection.model_validate(
        {"metadata": {"name": "inbox", "namespace": "acme"}, "spec": {"url": "http://127.0.0.1:1/mcp", "credential": credential}}
    )
    mapping = ToolMapping.model_validate(
        {"metadata": {"name": "m", "namespace": "acme"},
         "spec": {"serverRef": {"name": "s"}, "connectionRef": {"name": "inbox"}, "tools": [{"name": "fetch_mails"}]}}
    )
    return compile_strict(server, [mapping], [connection])


SHARED = {"source": "shared", "secretRef": {"name": "inbox-token", "key": "token"}}


def make_gateway(time: VirtualTime, secrets: FlakySecrets | None = None, credential: dict[str, Any] = SHARED) -> Gateway:
    cfg = config(credential)
    keys = SigningKeys.generate()
    return Gateway(
        cfg,
        verifier=TokenVerifier(lambda: keys, issuer=cfg.server.issuer, audience=cfg.server.url),
        vault=MemoryVault(),
        revocations=MemoryRevocations(),
        audit=AuditTrail(server="acme/s", tenant="acme", keys=MemoryAuditKeys(), sinks=[MemoryAuditSink()]),
        secrets=secrets,
        background=BackgroundTasks(sleep=time.sleep, clock=time.time),
    )


def lines(caplog: pytest.LogCaptureFixture, loop: str, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and r.getMessage().startswith(loop + " ")]


HEALTHY = {"failing": False, "failingSince": None, "lastError": None, "consecutiveFailures": 0, "synced": True}


async def test_the_catalog_refresher_fails_twice_backs_off_reports_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="portcullis.gateway")
    time, secrets = VirtualTime(), FlakySecrets()
    gateway = make_gateway(time, secrets)
    await gateway.start()
    try:
        first = await time.next_sleep(REFRESHER)
        assert 0.5 <= first <= 1.0  # the first retry: about a second, jittered down by up to half
        report = status(gateway)["loops"]["catalog-refresh"]
        assert report == {
            "failing": True,
            "failingSince": "2027-01-15T08:00:00Z",
            "lastError": "KubeError: 503 ServiceUnavailable: the API server is restarting",
            "consecutiveFailures": 1,
            "synced": False,
        }
        second = await time.next_sleep(REFRESHER)
        assert 1.0 <= second <= 2.0  # doubled
        report = status(gateway)["loops"]["catalog-refresh"]
        assert report["consecutiveFailures"] == 2 and report["failingSince"] == "2027-01-15T08:00:00Z"
        assert len(lines(caplog, "catalog-refresh", logging.WARNING)) == 1  # once per streak, not per retry

        secrets.broken = False
        assert await time.next_sleep(REFRESHER) == 300.0  # recovered: back to the period
        assert status(gateway)["loops"]["catalog-refresh"] == HEALTHY
        [warning] = lines(caplog, "catalog-refresh", logging.WARNING)
        assert "503 ServiceUnavailable" in warning
        assert lines(caplog, "catalog-refresh", logging.INFO) == ["catalog-refresh recovered after 2 failed attempt(s)"]
        assert await time.next_sleep(REFRESHER) == 300.0  # and goes on
        # A failing loop never made it unready; what does is that its one upstream (port 1) is
        # unreachable, so there is no tool to serve.
        assert not gateway.background.unsynced() and gateway.catalog.settled(gateway.config)
        assert status(gateway)["connections"]["inbox"]["state"] == "unreachable" and gateway.nothing_to_serve()
    finally:
        await gateway.stop()


async def test_stop_after_failures_raises_nothing_and_every_task_was_kept_until_then() -> None:
    time = VirtualTime()
    gateway = make_gateway(time, FlakySecrets())
    await gateway.start()
    await time.next_sleep(REFRESHER)  # failed, and backing off
    await time.next_sleep("portcullis-change-stream/inbox")  # its change stream failed too
    running = {t.get_name() for t in gateway.background.tasks}
    assert {REFRESHER, "portcullis-change-stream/inbox"} <= running
    assert set(status(gateway)["loops"]) == {"catalog-refresh", "change-stream/inbox"}
    await gateway.stop()  # neither failure is raised here
    assert gateway.background.tasks == set()
    assert status(gateway)["loops"] == {}


async def test_an_unexpected_error_is_survived_and_its_traceback_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    time = VirtualTime()
    background = BackgroundTasks(sleep=time.sleep, clock=time.time)
    calls = 0

    async def step() -> None:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise RuntimeError("a bug, with data that must not be shown: s3cr3t")

    background.repeat("janitor", step, every=30.0)
    try:
        delays = [await time.next_sleep("portcullis-janitor") for _ in range(3)]
        report = background.status()["janitor"]
        assert report["lastError"] == "RuntimeError"  # only its type: its text may carry anything
        assert report["consecutiveFailures"] == 3
        assert [1.0 * 2**i / 2 <= d <= 1.0 * 2**i for i, d in enumerate(delays)] == [True, True, True]
        assert await time.next_sleep("portcullis-janitor") == 30.0
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.getMessage().startswith("janitor ")]
        assert len(warnings) == 1 and warnings[0].exc_info is not None
    finally:
        await background.stop()


class ScriptedUpstream:
    """An upstream's change streams, one script step per open: an error, "close" at once, or "hold"."""

    def __init__(self, *steps: Exception | str) -> None:
        self.steps = list(steps)

    async def changes(self, credential: Any = None) -> AsyncIterator[str]:
        step = self.steps.pop(0) if self.steps else "hold"
        if isinstance(step, Exception):
            raise step
        yield LISTENING
        if step == "hold":
            await asyncio.Event().wait()


async def test_a_change_stream_that_cannot_open_backs_off_reports_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="portcullis.gateway")
    time = VirtualTime()
    gateway = make_gateway(time, credential={"source": "none"})
    refused = UpstreamError("inbox", "unreachable (connection refused)", transport=True)
    upstream = ScriptedUpstream(refused, refused, "hold")
    gateway.background.run("change-stream/scripted", functools.partial(gateway._watch, "inbox", upstream))
    task = "portcullis-change-stream/scripted"
    try:
        first = await time.next_sleep(task)
        assert 0.5 <= first <= 1.0
        second = await time.next_sleep(task)
        assert 1.0 <= second <= 2.0
        report = gateway.background.status()["change-stream/scripted"]
        assert report["failing"] and report["consecutiveFailures"] == 2
        assert report["lastError"] == "UpstreamError: upstream 'inbox': unreachable (connection refused)"
        time.wake(task)  # the third attempt opens and holds its stream
        with anyio.fail_after(5):
            while gateway.background.status()["change-stream/scripted"]["failing"]:
                await asyncio.sleep(0)
        assert gateway.background.status()["change-stream/scripted"] == HEALTHY
        assert len(lines(caplog, "change-stream/scripted", logging.WARNING)) == 1
        assert len(lines(caplog, "change-stream/scripted", logging.INFO)) == 1
    finally:
        await gateway.background.stop()


async def test_a_change_stream_that_keeps_closing_at_once_is_one_streak_and_recovers_only_by_lasting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="portcullis.gateway")
    time = VirtualTime()
    gateway = make_gateway(time, credential={"source": "none"})
    upstream = ScriptedUpstream("close", "close", "close", "hold")
    gateway.background.run("change-stream/flappy", functools.partial(gateway._watch, "inbox", upstream))
    task = "portcullis-change-stream/flappy"
    try:
        delays = [await time.next_sleep(task) for _ in range(3)]
        # Each reopen waits, and the wait grows while the streams keep closing at once.
        assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0 and 2.0 <= delays[2] <= 4.0
        report = gateway.background.status()["change-stream/flappy"]
        assert report["failing"] and report["consecutiveFailures"] == 2
        assert report["lastError"] == "streams keep ending at once (3 in a row, the last after 0.0s)"
        time.wake(task)  # the fourth stream opens and stays open: healthy only once it has lasted
        assert await time.next_sleep(task + "-proving") == 10.0
        assert gateway.background.status()["change-stream/flappy"]["failing"]
        proving = next(t for t in gateway.background.tasks if t.get_name() == task + "-proving")
        time.wake(task + "-proving")
        with anyio.fail_after(5):
            await proving
        assert gateway.background.status()["change-stream/flappy"] == HEALTHY
        # One streak: one warning, one recovery, however many reconnects.
        assert len(lines(caplog, "change-stream/flappy", logging.WARNING)) == 1
        assert len(lines(caplog, "change-stream/flappy", logging.INFO)) == 1
    finally:
        await gateway.background.stop()


async def test_a_failing_refresh_after_a_config_swap_is_logged_and_released(caplog: pytest.LogCaptureFixture) -> None:
    time = VirtualTime()
    gateway = make_gateway(time, FlakySecrets())
    await gateway.start()
    try:
        gateway.swap_config(config(SHARED).model_copy(update={"tenant": "acme-2"}))
        [task] = [t for t in gateway.background.tasks if t.get_name() == "portcullis-refresh-after-config-change"]
        with anyio.fail_after(5):
            await asyncio.wait([task])
        assert task not in gateway.background.tasks
        assert any("refresh-after-config-change failed" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    finally:
        await gateway.stop()


async def test_list_changed_publishes_are_kept_until_done() -> None:
    gateway = make_gateway(VirtualTime(), credential={"source": "none"})
    build_mcp_server(gateway)
    gateway._tools_changed()
    assert "portcullis-publish-tools-changed" in {t.get_name() for t in gateway.background.tasks}
    await gateway.background.stop()


async def get(app: Any, path: str) -> tuple[int, dict[str, Any]]:
    """One GET through an ASGI app, in this event loop."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"host", b"127.0.0.1")], "scheme": "http", "server": ("127.0.0.1", 80),
             "client": ("127.0.0.1", 1), "http_version": "1.1", "root_path": ""}
    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


async def test_readiness_waits_for_a_gating_loop_to_sync_once_then_only_names_failures() -> None:
    gateway = make_gateway(VirtualTime(), credential={"source": "none"})
    gateway.catalog.record_tools("inbox", [])  # tool lists settled (an empty one: nothing unreachable)
    gateway.background.run("config-watch", lambda loop: asyncio.Event().wait(), gates_readiness=True)
    gateway.background.run("keys-watch", lambda loop: asyncio.Event().wait())
    app = build_app(gateway)
    try:
        watch, keys = gateway.background.loops["config-watch"], gateway.background.loops["keys-watch"]
        keys.failed(KubeError(403, "Forbidden", "secrets is forbidden"))
        assert await get(app, "/readyz") == (503, {
            "status": "waiting for config-watch", "pending": [], "unsynced": ["config-watch"],
            "failingLoops": {"keys-watch": "KubeError: 403 Forbidden: secrets is forbidden"},
        })
        watch.ok()  # its first stream opened
        assert await get(app, "/readyz") == (200, {
            "status": "ready", "failingLoops": {"keys-watch": "KubeError: 403 Forbidden: secrets is forbidden"},
        })
        watch.failed(KubeError(500, "InternalError", "etcd is down"))  # later failures: named, still ready
        status_code, body = await get(app, "/readyz")
        assert status_code == 200 and set(body["failingLoops"]) == {"config-watch", "keys-watch"}
        keys.ok()
        watch.ok()
        assert await get(app, "/readyz") == (200, {"status": "ready"})
    finally:
        await gateway.background.stop()


async def test_a_cluster_watch_whose_streams_close_at_once_is_paced_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="portcullis.gateway")
    time = VirtualTime()
    background = BackgroundTasks(sleep=time.sleep, clock=time.time)
    collection = "/api/v1/namespaces/acme/configmaps"
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        k8s["watch", collection] << b""  # every watch stream: 200, then closed at once
        background.run("config-watch", lambda loop: watch_object(client, collection, "s-config", lambda obj: None, loop), gates_readiness=True)
        try:
            delays = [await time.next_sleep("portcullis-config-watch") for _ in range(5)]
            steps = [0.2, 0.4, 0.8, 1.6, 3.2]
            assert all(step / 2 <= delay <= step for delay, step in zip(delays, steps, strict=True)), delays
            watches = [r for r in k8s if r.params.get("watch") == "true"]
            assert len(watches) == 5  # one stream per pause: none reopened without one
            report = background.status()["config-watch"]
            assert report["failing"] and report["synced"]  # its streams did open: it has read its object
            assert report["lastError"] == "streams keep ending at once (5 in a row, the last after 0.0s)"
            assert len(lines(caplog, "config-watch", logging.WARNING)) == 1
        finally:
            await background.stop()


async def test_the_revocation_watch_survives_a_refused_watch_and_goes_on_following_the_configmap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="portcullis.gateway")
    time = VirtualTime()
    background = BackgroundTasks(sleep=time.sleep, clock=time.time)
    collection = "/api/v1/namespaces/acme/configmaps"
    task = "portcullis-revocations-watch"
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        forbidden = {"kind": "Status", "code": 403, "reason": "Forbidden", "message": "configmaps is forbidden"}
        k8s["watch", collection][:1] << 403 << forbidden  # the first watch is refused (RBAC not applied yet)
        replica = KubernetesRevocations(client, "acme", "s-revocations")
        background.run("revocations-watch", replica.run, gates_readiness=True)
        try:
            assert 0.5 <= await time.next_sleep(task) <= 1.0
            report = background.status()["revocations-watch"]
            assert report["lastError"] == "KubeError: 403 Forbidden: configmaps is forbidden"
            assert report["failing"] and report["synced"]  # the read before the watch worked
            assert replica.synced and background.unsynced() == []
            time.wake(task)  # the next attempt reads again and its watch opens
            with anyio.fail_after(5):
                while background.status()["revocations-watch"]["failing"]:
                    await asyncio.sleep(0)
            assert background.status()["revocations-watch"] == HEALTHY
            await KubernetesRevocations(client, "acme", "s-revocations").revoke_token("j1", int(time.now) + 900)
            claims = SessionClaims(iss="i", aud="a", sub="alice", tenant="acme", exp=int(time.now) + 900, iat=int(time.now), jti="j1")
            with anyio.fail_after(5):
                while not replica.is_revoked(claims):
                    await replica.next_change().wait()
            assert len(lines(caplog, "revocations-watch", logging.WARNING)) == 1
        finally:
            await background.stop()
