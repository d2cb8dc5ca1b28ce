"""The gateway's ASGI server: uvicorn (today) against granian and hypercorn, on the same app.

Results (benchmarks/results/asgi-servers-2026-12-02.md; 2-core machine shared with other work, so read the
ratios, not the absolute figures; the last full run, with the range over three full runs in brackets):

| concurrency | granian-uvloop / uvicorn calls/s | CPU per call | p99 | context switches per call, uvicorn → granian |
|---:|---:|---:|---:|---|
| 1 | 0.71 (0.65-0.85 over the runs) | 1.33 (1.31-1.58) | 1.13 | 1.6 → 23 |
| 8 | 1.18 (0.78-1.18) | 0.92 (0.92-1.29) | 0.96 | 0.3 → 9.7 |
| 64 | 0.88 (0.88-1.19) | 1.22 (0.88-1.22) | 0.48 | 0.2 → 5.8 |
| 256 | 0.89 (0.88-1.34) | 1.05 (0.92-1.05) | 0.17 | 0.2 → 6.0 |

Per call the gateway's own work (0.45-1 ms of CPU here) dwarfs the server's; granian's Rust thread hands
every request to the Python loop and back (6-23 context switches per call on one core, against 0.2-1.6 for
uvicorn), which costs more than httptools' parsing saves. granian's real advantage is the tail under
saturation: it accepts connections on its own thread, while uvloop (libuv >= 1.45 accepts one connection per
loop iteration) leaves new connections in the listen queue for seconds when the loop is saturated (uvicorn's
and hypercorn's p99 of 2-2.5 s at c=256 is that wait, seen with `ss -ltn`). granian-asyncio and the
embedded server are no better than granian-uvloop; hypercorn (h11) costs 1.3-1.9x uvicorn's CPU per call.

Recommendation: stay on uvicorn. Switching buys no throughput and no CPU on one core, costs 35 MiB per
process (supervisor + worker; 10 MiB embedded), and loses things the gateway relies on: an idle keep-alive
(75 s) independent of the request-head deadline (10 s) — in granian one hyper timer bounds both, at most
60 s, so it is either a 10 s keep-alive (agents pausing between calls reconnect; closing before a 60 s load
balancer idle timeout invites reuse-after-close failures) or a 60 s slowloris window; pre-bound sockets
(port 0, the URL known before tokens are minted) and four listeners (mcp, admin, metrics, connect) on one
loop sharing one Gateway, which granian's process model does not offer (its embedded server, which does,
is experimental); a bounded graceful drain (`timeout_graceful_shutdown=5`; by granian's issues #518 and
#547, not measured here, it waits for requests in flight with no bound unless `--workers-kill-timeout`,
and sends `lifespan.shutdown` only after them). The tail under saturation is better addressed where it
arises (accepting, and keeping the process out of saturation) than by changing servers.

How it is measured:

- The app is the one `portcullis serve` builds (`serve.local_gateway`: the same manifests,
  compile, `build_local_gateway`, `build_app`, `with_lifespan(endpoint, gateway.start,
  gateway.stop)`), in front of `fast_upstream.py`, with the benchmark's per-user credential
  stored through the admin API and a session token minted, as in `stack.gateway`.
- uvicorn is `portcullis serve` itself, unchanged (uvicorn + uvloop + httptools with the
  gateway's header deadline, `timeout_keep_alive=75`, heap frozen after startup).
- granian is its own CLI, `granian --interface asgi --factory --loop asyncio|uvloop --workers 1
  ... benchmarks.asgi_servers:granian_app`: the factory below builds the app exactly as
  `local_gateway` does (its public URL is granian's address, so tokens have the same audience),
  and the gateway's lifespan (gateway.start: the upstream HTTP pool, audit store, catalog
  refresh; gateway.stop: their shutdown) runs under granian's lifespan protocol. The admin app
  is served by uvicorn on granian's own event loop (it is only used to store the credential
  and mint the token), started once the lifespan startup completed; the heap is then frozen,
  as `portcullis serve` does. granian runs a supervisor process and one worker process: CPU
  and RSS are summed over both (the supervisor's share is shown).
- hypercorn (if installed) is `hypercorn.asyncio.serve` on uvloop in one process, with the same
  factory, `keep_alive_timeout=75` and `keep_alive_max_requests` raised (its default, 1000,
  would close every connection after 1000 requests).
- Placement: each server alone on core 0 (taskset); the upstream, wrk and this harness on
  core 1. All servers of a repetition are up at once and the load runs interleave: for each
  concurrency, every server in turn (the order rotated every repetition), so drift of the shared
  machine hits all alike. Figures are medians over the repetitions; ratios are medians of the
  per-repetition ratios against uvicorn's run at the same concurrency.
- Load: wrk (`load.wrk_load`) replaying a 2026-07-28 `tools/call echo`, every answer checked
  (HTTP 200, a JSON-RPC result, not a tool error); failures (non-200, bad bodies, socket
  errors) are counted and shown. The upstream's own count of `tools/call`s is checked against
  the calls answered in every run. Before timing, each server answers one call whose result
  text is checked, then 1 s of warm-up load.
- CPU per call: utime+stime (/proc/<pid>/stat, all processes of the server) over the run
  divided by the calls answered. Startup: from exec to the first `/readyz` 200. Idle RSS:
  after startup (before any call), and after the load (all processes of the server).
- Probes (not in --quick): the limits the gateway relies on, checked on the wire for every
  server at once: an idle keep-alive connection after one answer, a request head that stops
  half way (slowloris), a connection that sends nothing; and on shutdown (SIGTERM) the time to
  exit, the exit code, and whether every answered call's audit event reached the SQLite store
  (so the lifespan shutdown ran and drained the audit queue).

    .venv/bin/pip install granian hypercorn        # not project dependencies
    .venv/bin/python benchmarks/asgi_servers.py             # full run, about 6 minutes
    .venv/bin/python benchmarks/asgi_servers.py --quick     # smoke run, about 1 minute
    .venv/bin/python benchmarks/asgi_servers.py --servers uvicorn,granian-uvloop --reps 5 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import secrets
import selectors
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import load, stack  # noqa: E402

TOOL = "echo"
ARGUMENTS = {"text": "hello from the benchmark"}
CONCURRENCY: tuple[int, ...] = (1, 8, 64, 256)
HEADER_TIMEOUT_S = 10  # the gateway's request-head deadline (gateway/deadlines.py), given to every server
KEEP_ALIVE_S = 75  # the gateway's uvicorn timeout_keep_alive (gateway/runtime.py)
BACKLOG = 2048  # runtime.bind's listen backlog
SHUTDOWN_WAIT_S = 15.0  # after SIGTERM, then SIGKILL
SOURCE: Path | None = None
"""Where the servers import `portcullis` from (a snapshot of operator/, put first on PYTHONPATH); None: the work tree."""

ENV_MANIFESTS = "PORTCULLIS_BENCH_MANIFESTS"
ENV_STATE = "PORTCULLIS_BENCH_STATE"
ENV_ADMIN_PORT = "PORTCULLIS_BENCH_ADMIN_PORT"
ENV_PUBLIC_URL = "PORTCULLIS_BENCH_URL"
ENV_PORT = "PORTCULLIS_BENCH_PORT"


# --- the entry: the gateway app as `portcullis serve` builds it, for another server ------------------


def granian_app() -> Any:
    """ASGI factory (`granian --factory benchmarks.asgi_servers:granian_app`): the `portcullis serve`
    app, its lifespan included; the admin app is served beside it by uvicorn on the same loop."""
    from portcullis.serve import local_gateway

    keep = contextlib.ExitStack()
    handle = keep.enter_context(local_gateway(
        [os.environ[ENV_MANIFESTS]],
        state_dir=Path(os.environ[ENV_STATE]),
        host="127.0.0.1",
        port=0,  # local_gateway binds an MCP socket of its own; the server under test binds the real one
        admin_port=int(os.environ[ENV_ADMIN_PORT]),
        background=False,
        public_url=os.environ[ENV_PUBLIC_URL],
    ))
    mcp, admin = handle.servers.listeners
    mcp.sock.close()
    return _admin_beside(mcp.app, admin, keep)


def _admin_beside(app: Any, admin: Any, keep: contextlib.ExitStack) -> Any:
    """`app` whose lifespan, once started, also serves `admin` (a runtime.Listener) with uvicorn as
    `runtime.Servers` configures it, then freezes the heap; on shutdown, stops it."""
    import uvicorn

    from portcullis.gateway.protocol import http_protocol
    from portcullis.gateway.runtime import freeze_heap

    class QuietServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:  # the ASGI server under test owns the signals
            yield

    running: dict[str, Any] = {}

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return

        async def send_hooked(message: Any) -> None:
            if message["type"] == "lifespan.startup.complete":
                server = QuietServer(uvicorn.Config(
                    admin.app, log_level="warning", lifespan="off", access_log=False, timeout_graceful_shutdown=5,
                    timeout_keep_alive=KEEP_ALIVE_S, http=http_protocol(HEADER_TIMEOUT_S)))
                task = asyncio.get_running_loop().create_task(server.serve(sockets=[admin.sock]))
                while not server.started and not task.done():
                    await asyncio.sleep(0.01)
                if task.done():
                    task.result()
                running.update(server=server, task=task)
                freeze_heap()
            elif message["type"] == "lifespan.shutdown.complete" and running:
                running["server"].should_exit = True
                await running["task"]
                keep.close()
            await send(message)

        await app(scope, receive, send_hooked)

    return wrapped


def serve_hypercorn() -> None:
    """`python benchmarks/asgi_servers.py --serve-hypercorn`: the same app under hypercorn on uvloop."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    from portcullis.gateway.runtime import new_event_loop

    config = Config()
    config.bind = [f"127.0.0.1:{os.environ[ENV_PORT]}"]
    config.keep_alive_timeout = KEEP_ALIVE_S
    config.keep_alive_max_requests = 10**9
    config.graceful_timeout = 5
    config.backlog = BACKLOG
    config.loglevel = "WARNING"
    config.accesslog = None
    app = granian_app()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(app, config, shutdown_trigger=stop.wait)

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(main())


def serve_granian_embedded() -> None:
    """`python benchmarks/asgi_servers.py --serve-granian-embedded`: granian's embedded server (experimental in
    2.8) on the gateway's own uvloop loop, in one process: how `runtime.Servers` could swap uvicorn for granian
    on the MCP port alone and keep uvicorn on the others."""
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings
    from granian.server.embed import Server

    from portcullis.gateway.runtime import new_event_loop

    app = granian_app()
    server = Server(
        target=app, address="127.0.0.1", port=int(os.environ[ENV_PORT]), interface=Interfaces.ASGI, http=HTTPModes.http1,
        websockets=False, backlog=BACKLOG, http1_settings=HTTP1Settings(header_read_timeout=HEADER_TIMEOUT_S * 1000),
        log_access=False,
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.stop)
        await server.serve()

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(main())


# --- the servers under test -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    name: str
    describe: str


KINDS = {
    "uvicorn": Kind("uvicorn", "`portcullis serve` (uvicorn, uvloop, httptools + header deadline)"),
    "granian-asyncio": Kind("granian-asyncio", "granian ASGI, --loop asyncio, 1 worker, 1 runtime thread"),
    "granian-uvloop": Kind("granian-uvloop", "granian ASGI, --loop uvloop, 1 worker, 1 runtime thread"),
    "hypercorn": Kind("hypercorn", "hypercorn.asyncio.serve on uvloop (h11), 1 process"),
    # Not run by default: other granian settings, to check that the default ones are not the slow ones.
    "granian-uvloop-st": Kind("granian-uvloop-st", "granian as granian-uvloop, --runtime-mode st (the default for ASGI is mt)"),
    "granian-embedded": Kind("granian-embedded", "granian's embedded server (experimental) on the gateway's uvloop loop, 1 process"),
    "granian-uvloop-rust": Kind("granian-uvloop-rust", "granian as granian-uvloop, --task-impl rust (experimental)"),
}


def available_kinds() -> list[str]:
    kinds = ["uvicorn"]
    if _version("granian") != "not installed":
        kinds += ["granian-asyncio", "granian-uvloop", "granian-embedded"]
    if _version("hypercorn") != "not installed":
        kinds.append("hypercorn")
    return kinds


@dataclass
class Running:
    kind: str
    gateway: stack.Gateway
    startup_s: float
    rss_start_kib: int
    workdir: Path
    log: Path
    exit: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.gateway.pid


def _argv(kind: str, cores: Sequence[int] | None, manifests: Path, state: Path, port: int, admin_port: int) -> list[str]:
    pin = stack.pin_prefix(cores)
    if kind == "uvicorn":
        return [*pin, stack.portcullis_executable(), "serve", "-f", str(manifests), "--state-dir", str(state),
                "--port", str(port), "--admin-port", str(admin_port)]
    if kind.startswith("granian-") and kind != "granian-embedded":
        granian = Path(sys.executable).parent / "granian"
        loop, *extras = kind.split("-")[1:]
        variant = [*(["--runtime-mode", "st"] if "st" in extras else []), *(["--task-impl", "rust"] if "rust" in extras else [])]
        return [*pin, str(granian), "--interface", "asgi", "--factory", "--loop", loop, *variant,
                "--workers", "1", "--runtime-threads", "1", "--host", "127.0.0.1", "--port", str(port),
                "--backlog", str(BACKLOG), "--http", "1", "--no-ws", "--log-level", "warning", "--no-access-log",
                "--http1-header-read-timeout", str(HEADER_TIMEOUT_S * 1000), "--working-dir", str(stack.REPO),
                "benchmarks.asgi_servers:granian_app"]
    if kind == "hypercorn":
        return [*pin, sys.executable, str(Path(__file__).resolve()), "--serve-hypercorn"]
    if kind == "granian-embedded":
        return [*pin, sys.executable, str(Path(__file__).resolve()), "--serve-granian-embedded"]
    raise ValueError(kind)


def _pythonpath() -> str:
    return os.pathsep.join(filter(None, [str(SOURCE) if SOURCE else None, str(stack.REPO), os.environ.get("PYTHONPATH")]))


def snapshot(revision: str, into: Path) -> Path:
    """operator/ as committed at `revision`, extracted into `into` (read-only git: `git archive`), so that
    edits other people make in the work tree during a run do not change the code under test."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(stack.REPO), "archive", revision, "operator"], capture_output=True, check=True,
                             timeout=60).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True, timeout=60)
    source = into / "operator"
    found = subprocess.run([sys.executable, "-c", "import portcullis; print(portcullis.__file__)"], capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": _pythonpath_for(source)}, timeout=60).stdout.strip()
    if not found.startswith(str(source)):
        raise RuntimeError(f"the snapshot at {source} does not shadow the installed portcullis ({found})")
    return source


def _pythonpath_for(source: Path) -> str:
    return os.pathsep.join(filter(None, [str(source), str(stack.REPO), os.environ.get("PYTHONPATH")]))


def _ready(url: str, process: stack.Process, log: Path, timeout: float = stack.STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.argv[0]} exited ({process.popen.returncode}):\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.01)  # polling a readiness probe, bounded by the deadline above
    raise TimeoutError(f"not ready within {timeout} s:\n{log.read_text()}")


@contextlib.contextmanager
def start(kind: str, upstream_url: str, workdir: Path, cores: Sequence[int] | None) -> Iterator[Running]:
    """One server in front of `upstream_url`, with the benchmark's credential stored and a token minted."""
    manifests = workdir / "manifests"
    manifests.mkdir(parents=True, exist_ok=True)
    (manifests / "bench.yaml").write_text(stack.manifests_text(upstream_url))
    state = workdir / "state"
    port, admin_port = stack.free_port(), stack.free_port()
    base, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    secret = secrets.token_urlsafe(24)
    env = {**os.environ, "PORTCULLIS_ADMIN_SECRET": secret, ENV_MANIFESTS: str(manifests), ENV_STATE: str(state),
           ENV_ADMIN_PORT: str(admin_port), ENV_PUBLIC_URL: base + "/mcp", ENV_PORT: str(port),
           "PYTHONPATH": _pythonpath()}
    argv = _argv(kind, cores, manifests, state, port, admin_port)
    log = workdir / "server.log"
    started = time.monotonic()
    with open(os.devnull, "wb") as devnull, open(log, "wb") as errors:
        popen = subprocess.Popen(argv, stdout=devnull, stderr=errors, env=env, start_new_session=True)
    process = stack.Process(popen, argv)
    running: Running | None = None
    try:
        _ready(base + "/readyz", process, log)
        startup = time.monotonic() - started
        rss = tree_rss_kib(popen.pid)
        status, answer = stack._http("PUT", f"{admin}/v1/users/{stack.USER}/connections/{stack.CONNECTION}",
                                     {"secret": stack.UPSTREAM_SECRET}, secret)
        if status >= 300:
            raise RuntimeError(f"{kind}: storing the benchmark credential failed: HTTP {status} {answer}")
        status, answer = stack._http("POST", f"{admin}/v1/tokens", {"user": stack.USER, "ttl": "1h"}, secret)
        if status != 201:
            raise RuntimeError(f"{kind}: minting the benchmark token failed: HTTP {status} {answer}")
        gw = stack.Gateway(process, base + "/mcp", admin, secret, str(answer["token"]), log, state)
        running = Running(kind, gw, startup, rss, workdir, log)
        yield running
    finally:
        stop_started = time.monotonic()
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(SHUTDOWN_WAIT_S)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(10)
        if running is not None:
            running.exit = {"exit_s": time.monotonic() - stop_started, "returncode": popen.returncode,
                            "killed": popen.returncode == -signal.SIGKILL}


# --- processes ---------------------------------------------------------------------------------------------


def tree_pids(pid: int) -> list[int]:
    """`pid` and its descendants (granian's worker is a child of its supervisor)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
    return out


def tree_cpu(pid: int) -> dict[int, float]:
    out = {}
    for p in tree_pids(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            out[p] = load.cpu_seconds(p)
    return out


def tree_rss_kib(pid: int) -> int:
    total = 0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError, RuntimeError):
            total += load.rss_kib(p)
    return total


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of every thread of `pid` and its descendants."""
    total = 0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    for line in Path(f"/proc/{p}/task/{task}/status").read_text().splitlines():
                        if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                            total += int(line.split()[1])
    return total


def threads(pid: int) -> int:
    return sum(_status_field(p, "Threads") for p in tree_pids(pid))


def _status_field(pid: int, name: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def _upstream_calls(upstream_url: str) -> int:
    with urllib.request.urlopen(upstream_url.rsplit("/", 1)[0] + "/stats", timeout=10) as response:
        return int(json.loads(response.read()).get("tools/call", 0))


def _settled_upstream_calls(upstream_url: str, timeout: float = 10.0) -> int:
    """The upstream's count once it stops moving: a server that was loaded just before may still be
    working through requests whose client (wrk) has gone."""
    deadline = time.monotonic() + timeout
    last = _upstream_calls(upstream_url)
    while time.monotonic() < deadline:
        time.sleep(0.1)  # polling a counter for quiescence, bounded by the deadline
        now = _upstream_calls(upstream_url)
        if now == last:
            return now
        last = now
    return last


def _audited_calls(state: Path) -> int:
    db = state / "audit" / "audit.db"
    if not db.exists():
        return -1
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return int(conn.execute("SELECT count(*) FROM audit_events WHERE method = 'tools/call'").fetchone()[0])


# --- measurement ------------------------------------------------------------------------------------------


@dataclass
class Settings:
    seconds: float = 3.0
    reps: int = 4
    warm_seconds: float = 1.0
    probes: bool = True
    pin: bool = True

    @classmethod
    def quick(cls) -> Settings:
        return cls(seconds=1.0, reps=1, warm_seconds=1.0, probes=False)


@dataclass
class Report:
    settings: dict[str, Any]
    machine: dict[str, Any]
    kinds: list[str]
    runs: list[dict[str, Any]] = field(default_factory=list)
    servers: list[dict[str, Any]] = field(default_factory=list)
    """Per (repetition, server): startup, RSS, threads, exit, audit counts."""
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    commands: dict[str, str] = field(default_factory=dict)


def verify(gw: stack.Gateway) -> str:
    """One call through the server: the tool's own result must come back (not an error)."""
    target = load.tool_call(gw.url, TOOL, ARGUMENTS, token=gw.token)
    client = load.KeepAliveClient(target.host, target.port, timeout=10)
    try:
        _, status, body = client.send(target.raw())
    finally:
        client.close()
    message = json.loads(body) if status == 200 else {}
    result = message.get("result") or {}
    texts = [c.get("text") for c in result.get("content", []) if isinstance(c, dict)]
    if status != 200 or result.get("isError") or texts != [ARGUMENTS["text"]]:
        raise RuntimeError(f"{gw.url}: the check call did not return the tool's result: HTTP {status} {body[:300]!r}")
    return str(texts[0])


def run_rep(rep: int, kinds: Sequence[str], upstream_url: str, tmp: Path, s: Settings, wrk: str,
            cores: tuple[list[int] | None, list[int] | None], report: Report, log: Callable[[str], None]) -> None:
    server_cores, client_cores = cores
    order = list(kinds[rep % len(kinds):]) + list(kinds[: rep % len(kinds)])
    with contextlib.ExitStack() as stack_:
        held: list[socket.socket] = []
        def close_held() -> None:
            for sock in held:
                sock.close()

        stack_.callback(close_held)  # registered first: runs after every server stopped
        running: dict[str, Running] = {}
        for kind in order:  # started one at a time, so each startup has core 0 to itself
            running[kind] = stack_.enter_context(start(kind, upstream_url, tmp / f"rep{rep}-{kind}", server_cores))
            if rep == 0:
                report.commands[kind] = " ".join(running[kind].gateway.process.argv)
        answered = dict.fromkeys(order, 0)
        for kind in order:
            verify(running[kind].gateway)
            answered[kind] += 1
            warm = load.wrk_load(load.tool_call(running[kind].gateway.url, TOOL, ARGUMENTS, token=running[kind].gateway.token),
                                 8, s.warm_seconds, wrk=wrk, prefix=stack.pin_prefix(client_cores))
            answered[kind] += warm.calls
            if warm.failures:
                raise RuntimeError(f"{kind}: {warm.failures} failures in the warm-up, e.g. {warm.failure_samples[:1]}")
        for connections in CONCURRENCY:
            for kind in order:
                gw = running[kind].gateway
                target = load.tool_call(gw.url, TOOL, ARGUMENTS, token=gw.token, label=kind)
                others = {k: tree_cpu(r.pid) for k, r in running.items() if k != kind}
                upstream_before = _settled_upstream_calls(upstream_url)
                cpu_before = tree_cpu(gw.pid)
                switches_before = context_switches(gw.pid)
                result = load.wrk_load(target, connections, s.seconds, wrk=wrk, prefix=stack.pin_prefix(client_cores))
                upstream_delta = _settled_upstream_calls(upstream_url) - upstream_before
                cpu_after = tree_cpu(gw.pid)  # after the server finished what wrk left in flight
                switches = context_switches(gw.pid) - switches_before
                answered[kind] += result.calls
                cpu = {p: cpu_after[p] - cpu_before.get(p, 0.0) for p in cpu_after}
                total_cpu = sum(cpu.values())
                supervisor_cpu = cpu.get(gw.pid, 0.0) if len(cpu) > 1 else 0.0
                idle_others = sum(sum(tree_cpu(r.pid).values()) - sum(others[k].values()) for k, r in running.items() if k != kind)
                row = {
                    "rep": rep, "kind": kind, "connections": connections, "rps": result.rps, "calls": result.calls,
                    "failures": result.failures, "failure_samples": result.failure_samples[:2],
                    "p50_ms": result.p50_ms, "p99_ms": result.p99_ms, "p999_ms": result.p999_ms,
                    # Per call the server handled: the upstream's count, which includes the calls still in
                    # flight when wrk stopped (their CPU is in `total_cpu` too).
                    "cpu_us_per_call": total_cpu / upstream_delta * 1e6 if upstream_delta else float("nan"),
                    "supervisor_cpu_us_per_call": supervisor_cpu / upstream_delta * 1e6 if upstream_delta else float("nan"),
                    "cpu_share_of_core": total_cpu / result.seconds if result.seconds else float("nan"),
                    "context_switches_per_call": switches / upstream_delta if upstream_delta else float("nan"),
                    "upstream_calls": upstream_delta,
                    "upstream_mismatch": not (result.calls <= upstream_delta <= result.calls + result.failures + connections),
                    "idle_others_cpu_s": idle_others,
                }
                report.runs.append(row)
                log(f"  rep {rep + 1}/{s.reps} c={connections:<3} {kind:<16} {result.rps:8.0f} calls/s  p50 {result.p50_ms:7.3f}  "
                    f"p99 {result.p99_ms:7.3f}  p99.9 {result.p999_ms:7.3f} ms  CPU {row['cpu_us_per_call']:5.0f} µs/call "
                    f"({row['cpu_share_of_core']:.2f} core, {row['context_switches_per_call']:.1f} cs/call)  failures {result.failures}"
                    + (f"  upstream counted {upstream_delta} tools/call for {result.calls} answered" if row["upstream_mismatch"] else "")
                    + (f"  e.g. {result.failure_samples[0]}" if result.failure_samples else ""))
        facts: dict[str, dict[str, Any]] = {}
        for kind in order:
            r = running[kind]
            facts[kind] = {"held_connection_at_shutdown": False, "rep": rep, "kind": kind, "startup_s": r.startup_s, "rss_start_kib": r.rss_start_kib,
                           "rss_after_kib": tree_rss_kib(r.pid), "processes": len(tree_pids(r.pid)), "threads": threads(r.pid),
                           "answered": answered[kind]}
        if s.probes and rep == 0:
            log(f"  probes: idle keep-alive, half-sent head, silent connection ({HEADER_TIMEOUT_S + 4} s, all servers at once)")
            report.probes = probe({k: r.gateway for k, r in running.items()}, HEADER_TIMEOUT_S + 4)
            # Shutdown with a client's idle keep-alive connection open (a load balancer's, an agent's), as in a
            # rolling update: the server should close it and exit, its lifespan shutdown draining the audit.
            for kind in order:
                held.append(_idle_connection(running[kind].gateway))
                facts[kind]["answered"] += 1
                facts[kind]["held_connection_at_shutdown"] = True
            log(f"  stopping with one idle keep-alive connection held open on each (SIGKILL after {SHUTDOWN_WAIT_S:g} s)")
    # Every server has been stopped (SIGTERM) on leaving the block: how it went, and whether the audit was drained.
    for kind in order:
        r = running[kind]
        audited = _audited_calls(r.gateway.state) if r.gateway.state else -1
        facts[kind].update(r.exit, audited=audited, log_tail=r.log.read_text(errors="replace")[-600:])
        report.servers.append(facts[kind])
        log(f"  {kind:<16} {'(connection held) ' if facts[kind]['held_connection_at_shutdown'] else ''}startup {r.startup_s:.2f} s, RSS {r.rss_start_kib / 1024:.1f} -> {facts[kind]['rss_after_kib'] / 1024:.1f} MiB, "
            f"{facts[kind]['processes']} process(es), {facts[kind]['threads']} threads; SIGTERM -> exit {r.exit.get('returncode')} in "
            f"{r.exit.get('exit_s', float('nan')):.2f} s; audited tools/call {audited} of {answered[kind]} answered")


# --- probes ---------------------------------------------------------------------------------------------------


def _idle_connection(gw: stack.Gateway) -> socket.socket:
    """A keep-alive connection that made one successful call and is left open."""
    target = load.tool_call(gw.url, TOOL, ARGUMENTS, token=gw.token)
    client = load.KeepAliveClient(target.host, target.port, timeout=10)
    _, status, body = client.send(target.raw())
    if not load.call_succeeded(status, body):
        client.close()
        raise RuntimeError(f"{gw.url}: call failed: {status} {body[:200]!r}")
    return client.sock


def probe(servers: dict[str, stack.Gateway], wait_s: float) -> dict[str, dict[str, Any]]:
    """For each server, three connections, watched together for `wait_s`: when (if) the server closes them.

    - `idle_keepalive`: one complete call answered, then nothing (an agent thinking between calls);
    - `half_head`: a request line and one header, then nothing (slowloris);
    - `silent`: connected, nothing sent.
    """
    selector = selectors.DefaultSelector()
    opened: dict[tuple[str, str], float] = {}
    closed: dict[tuple[str, str], float | None] = {}
    socks = []
    try:
        for kind, gw in servers.items():
            target = load.tool_call(gw.url, TOOL, ARGUMENTS, token=gw.token)
            for what in ("idle_keepalive", "half_head", "silent"):
                sock = socket.create_connection((target.host, target.port), timeout=10)
                socks.append(sock)
                if what == "idle_keepalive":
                    sock.sendall(target.raw())
                    parser = load.ResponseParser()
                    while (answer := parser.next()) is None:
                        data = sock.recv(65536)
                        if not data:
                            raise ConnectionError(f"{kind}: closed before answering the probe call")
                        parser.feed(data)
                    if not load.call_succeeded(*answer):
                        raise RuntimeError(f"{kind}: probe call failed: {answer[0]} {answer[1][:200]!r}")
                elif what == "half_head":
                    sock.sendall(f"POST {target.path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n".encode())
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ, (kind, what))
                opened[(kind, what)] = time.monotonic()
                closed[(kind, what)] = None
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(v is None for v in closed.values()):
            for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
                watched = key.fileobj
                assert isinstance(watched, socket.socket)
                try:
                    data = watched.recv(65536)
                except ConnectionResetError:
                    data = b""
                except BlockingIOError:
                    continue
                if not data:  # a response (e.g. 408) before closing still counts as closed when the FIN comes
                    closed[key.data] = time.monotonic() - opened[key.data]
                    selector.unregister(watched)
    finally:
        selector.close()
        for sock in socks:
            sock.close()
    out: dict[str, dict[str, Any]] = {}
    for (kind, what), after in closed.items():
        out.setdefault(kind, {})[what] = after
    return out


# --- report ------------------------------------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine(wrk: str) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        head = subprocess.run(["git", "-C", str(stack.REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(stack.REPO), "status", "--porcelain", "--", "operator"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        source = f"{head}{' + uncommitted changes in operator/' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        source = "unknown"
    return {
        "gateway_source": source, "nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
        "python": platform.python_version(), "wrk": load.wrk_version(wrk),
        "versions": {d: _version(d) for d in ("portcullis", "uvicorn", "uvloop", "httptools", "granian", "hypercorn", "h11",
                                               "starlette", "mcp", "aiohttp")},
    }


def _median(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def _ms(v: float) -> str:
    return f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def render(report: Report) -> str:
    s, m = report.settings, report.machine
    base = report.kinds[0]
    out = ["## The gateway under uvicorn, granian and hypercorn (tools/call `echo`, 2026-07-28 wire, loopback)\n"]
    out.append(f"Gateway source: {m['gateway_source']}. Machine: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, "
               f"Python {m['python']}; {m['wrk']}.")
    out.append("Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".")
    out.append(f"Placement: {s['placement']}. {s['reps']} repetitions, runs of {s['seconds']:g} s, servers interleaved "
               f"(order rotated each repetition). Medians; ratios are medians of per-repetition ratios to {base}.\n")
    out.append("Servers:\n" + "\n".join(f"- **{k}**: {KINDS[k].describe}" for k in report.kinds) + "\n")

    out.append("### Throughput, latency and CPU per call\n")
    out.append("CPU µs/call and context switches/call: over all threads and processes of the server, per call it handled. "
               "Core used: the server's CPU seconds per second of the run (below 1 when other work took core 0).\n")
    out.append("| c | server | calls/s | p50 ms | p99 ms | p99.9 ms | CPU µs/call | context switches/call | core used | failures | calls/s ratio | p50 ratio | p99 ratio | CPU/call ratio |")
    out.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in CONCURRENCY:
        for kind in report.kinds:
            rows = [r for r in report.runs if r["kind"] == kind and r["connections"] == c]
            if not rows:
                continue
            ratios: dict[str, list[float]] = {"rps": [], "p50_ms": [], "p99_ms": [], "cpu_us_per_call": []}
            for r in rows:
                b = next((x for x in report.runs if x["kind"] == base and x["connections"] == c and x["rep"] == r["rep"]), None)
                if b is not None:
                    for key in ratios:
                        if b[key]:
                            ratios[key].append(r[key] / b[key])
            ratio = "" if kind == base else " | ".join(f"{_median(ratios[k]):.2f}" for k in ratios)
            out.append(f"| {c} | {kind} | {_median([r['rps'] for r in rows]):,.0f} | {_ms(_median([r['p50_ms'] for r in rows]))} | "
                       f"{_ms(_median([r['p99_ms'] for r in rows]))} | {_ms(_median([r['p999_ms'] for r in rows]))} | "
                       f"{_median([r['cpu_us_per_call'] for r in rows]):,.0f} | {_median([r.get('context_switches_per_call', float('nan')) for r in rows]):.1f} | "
                       f"{_median([r['cpu_share_of_core'] for r in rows]):.2f} | "
                       f"{sum(r['failures'] for r in rows)} | " + (ratio if ratio else "1 | 1 | 1 | 1") + " |")
    mismatches = [r for r in report.runs if r["upstream_mismatch"]]
    calls = sum(r["calls"] for r in report.runs)
    out.append(f"\nCalls answered in the timed runs: {calls:,}; failures: {sum(r['failures'] for r in report.runs)}; runs whose "
               f"upstream `tools/call` count did not match the calls answered: {len(mismatches)}.")
    sup = [r["supervisor_cpu_us_per_call"] for r in report.runs if r["kind"].startswith("granian") and r["connections"] == max(CONCURRENCY)]
    if sup:
        out.append(f"granian's supervisor process: median {_median(sup):.1f} µs/call of the CPU above (c={max(CONCURRENCY)}). "
                   f"Idle servers' CPU while another was loaded: median {_median([r['idle_others_cpu_s'] for r in report.runs]) * 1000:.0f} ms per run in all.")

    out.append("\n### Startup, memory, shutdown\n")
    out.append("SIGTERM → exit: median over the repetitions with no client connection open; \"held\": the repetition "
               "that stopped each server with one idle keep-alive connection open (SIGKILL after "
               f"{SHUTDOWN_WAIT_S:g} s). Audited/answered: `tools/call` events in the SQLite audit store after the exit, against "
               "the calls answered to the harness (the store also has the calls still in flight when each wrk run ended), "
               "one figure per repetition.\n")
    out.append("| server | startup s (exec → /readyz 200) | idle RSS MiB (after startup) | RSS MiB after the load | processes | threads | SIGTERM → exit s | held: SIGTERM → exit s | exit codes | audited / answered tools/call |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for kind in report.kinds:
        rows = [r for r in report.servers if r["kind"] == kind]
        if not rows:
            continue
        codes = ",".join(sorted({str(r.get("returncode")) for r in rows}))
        audit = "; ".join(f"{r['audited']:,}/{r['answered']:,}" for r in rows)
        plain = [r.get("exit_s", float("nan")) for r in rows if not r["held_connection_at_shutdown"]]
        held = [r for r in rows if r["held_connection_at_shutdown"]]
        held_cell = "; ".join(f"{r.get('exit_s', float('nan')):.2f}" + (" (killed)" if r.get("killed") else "") for r in held) or "—"
        out.append(f"| {kind} | {_median([r['startup_s'] for r in rows]):.2f} | {_median([r['rss_start_kib'] for r in rows]) / 1024:.1f} | "
                   f"{_median([r['rss_after_kib'] for r in rows]) / 1024:.1f} | {rows[0]['processes']} | {rows[0]['threads']} | "
                   f"{_median(plain):.2f} | {held_cell} | {codes} | {audit} |")

    if report.probes:
        out.append("\n### Connection limits on the wire (seconds until the server closed; — = still open when the probe ended)\n")
        wait = HEADER_TIMEOUT_S + 4
        out.append(f"Every server was given a {HEADER_TIMEOUT_S} s request-head deadline (uvicorn: the gateway's own, "
                   f"`deadlines.py`; granian: `--http1-header-read-timeout {HEADER_TIMEOUT_S * 1000}`; hypercorn has none) and a "
                   f"{KEEP_ALIVE_S} s idle keep-alive (uvicorn `timeout_keep_alive`, hypercorn `keep_alive_timeout`; granian has no "
                   f"such setting: hyper's header-read timeout also runs while an idle connection waits for its next request). "
                   f"Probe watched {wait} s.\n")
        out.append("| server | idle keep-alive after an answer | half-sent request head | connection that sends nothing |")
        out.append("|---|---:|---:|---:|")
        for kind in report.kinds:
            p = report.probes.get(kind, {})
            cells = [("—" if p.get(w) is None else f"{p[w]:.1f}") for w in ("idle_keepalive", "half_head", "silent")]
            out.append(f"| {kind} | " + " | ".join(cells) + " |")

    if report.notes:
        out.append("\nNotes:\n" + "\n".join(f"- {n}" for n in report.notes))
    if report.commands:
        out.append("\nServer commands (first repetition; wrk as in `load.wrk_load`, `-t 2 --latency --timeout 10s`):\n\n```\n"
                   + "\n".join(f"{k}: {v}" for k, v in report.commands.items()) + "\n```")
    return "\n".join(out)


# --- main ------------------------------------------------------------------------------------------------------


def run(kinds: Sequence[str], s: Settings, log: Callable[[str], None], source: str = "HEAD") -> Report:
    wrk = load.wrk_path()
    if wrk is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install -y wrk)")
    allowed = sorted(os.sched_getaffinity(0))
    server_cores: list[int] | None
    client_cores: list[int] | None
    if s.pin and len(allowed) >= 2:
        server_cores, client_cores = [allowed[0]], [allowed[1]]
        where = f"each server on core {allowed[0]}; the upstream, wrk and this harness on core {allowed[1]}"
        os.sched_setaffinity(0, client_cores)
    else:
        server_cores = client_cores = None
        where = "not pinned"
    report = Report(settings={**asdict(s), "placement": where}, machine=machine(wrk), kinds=list(kinds))
    with tempfile.TemporaryDirectory(prefix="portcullis-asgi-") as tmp, stack.upstream(client_cores) as (up, upstream_url):
        global SOURCE
        if source != "worktree":
            commit = subprocess.run(["git", "-C", str(stack.REPO), "rev-parse", "--short", source], capture_output=True,
                                    text=True, check=True, timeout=10).stdout.strip()
            SOURCE = snapshot(source, Path(tmp) / "source")
            report.machine["gateway_source"] = f"{commit} (operator/ as committed, extracted with git archive; the work tree not used)"
        else:
            report.machine["gateway_source"] += " (the work tree as it was during the run)"
        log(f"{', '.join(kinds)}; {s.reps} repetition(s) x concurrency {CONCURRENCY} x {s.seconds:g} s; {where}; "
            f"gateway: {report.machine['gateway_source']}")
        report.commands["upstream"] = " ".join(up.argv)
        for rep in range(s.reps):
            run_rep(rep, kinds, upstream_url, Path(tmp), s, wrk, (server_cores, client_cores), report, log)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repetition of 1 s runs, no probes")
    parser.add_argument("--reps", type=int, help="repetitions (default 5)")
    parser.add_argument("--seconds", type=float, help="length of each load run (default 3)")
    parser.add_argument("--servers", help=f"comma-separated, first is the baseline (default: those installed of {','.join(KINDS)})")
    parser.add_argument("--concurrency", help="comma-separated connection counts (default 1,8,64,256)")
    parser.add_argument("--no-probes", action="store_true", help="skip the connection-limit and shutdown probes")
    parser.add_argument("--source", default="HEAD",
                        help="the gateway code to serve: a git revision of operator/ (default HEAD, extracted so that others' "
                             "edits during the run do not change it), or `worktree`")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--json", type=Path, help="also write every raw figure here")
    parser.add_argument("--serve-hypercorn", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-granian-embedded", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_hypercorn:
        serve_hypercorn()
        return 0
    if args.serve_granian_embedded:
        serve_granian_embedded()
        return 0
    s = Settings.quick() if args.quick else Settings()
    if args.reps is not None:
        s.reps = args.reps
    if args.seconds is not None:
        s.seconds = max(1, round(args.seconds))  # wrk takes whole seconds
    if args.no_probes:
        s.probes = False
    s.pin = not args.no_pin
    if args.concurrency:
        global CONCURRENCY
        CONCURRENCY = tuple(int(c) for c in args.concurrency.split(","))
    kinds = args.servers.split(",") if args.servers else available_kinds()
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise SystemExit(f"unknown server(s) {unknown}; known: {', '.join(KINDS)}")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    started = time.monotonic()
    report = run(kinds, s, log, args.source)
    report.settings["wall_seconds"] = round(time.monotonic() - started, 1)
    print(render(report))
    print(f"\n(total wall time {report.settings['wall_seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
