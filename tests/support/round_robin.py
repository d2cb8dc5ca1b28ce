"""A load balancer with no stickiness: every HTTP request goes to the next backend in turn.

What it stands in for: an L7 balancer (an Ingress controller, a mesh sidecar)
in front of several gateway replicas, with no session affinity. It balances per
*request*, not per connection - a plain Kubernetes Service balances connections,
and the MCP SDK clients keep one keep-alive connection open, so that would send
a whole agent run to one replica and prove nothing. Here two consecutive requests on one client connection reach two
different backends, which is exactly what "any replica serves any request" has
to survive.

Behaviour a test relies on, and why:

- **No retry elsewhere.** A request whose backend fails (connection refused,
  reset, closed mid-answer) is answered 502, or, when the answer had already
  started streaming, the client's connection is cut so it sees a truncated
  answer rather than a clean end. It is never re-sent to another backend: a
  test then sees exactly which calls were on the failing replica. (aiohttp's
  client retries an *idempotent* request once on a fresh connection to the
  *same* backend when a pooled connection turns out stale; MCP POSTs are never
  retried.)
- **Passive health check, one strike, no re-admission.** The first
  connection-level failure of a backend drops it from the rotation for the
  rest of the proxy's life (nginx's `max_fails=1` with an infinite
  `fail_timeout`). Requests already dispatched to it when it failed still fail,
  including the few sent in the moment between a replica's death and the first
  failure the proxy sees (a SIGKILLed gateway takes some 10-20 ms to lose its
  sockets; the kernel still accepts connections meanwhile); every request
  dispatched after the drop goes to a survivor. An HTTP error
  status (4xx/5xx) from a live backend is relayed as is and drops nothing.
- **Streaming.** Response bytes are written to the client as they arrive
  (server-sent events pass through unbuffered); request bodies, which in MCP
  are small JSON-RPC messages, are read whole and then forwarded.
- **Accounting.** Per backend: requests dispatched, answered, failed, and the
  ids in flight right now; with `record=True` every exchange is kept (its
  backend, MCP method, dispatch and end times, outcome), so a fault test can
  say which calls were in flight on a replica when it died.

Two ways to run it: `round_robin_proxy([...])` in a test (its own thread and
event loop, like tests/support/servers.py, so a blocking test body cannot stall
it; backends may join later with `add_backend`), or as a process of its own for
a benchmark::

    python -m tests.support.round_robin --backend http://127.0.0.1:8001 --backend http://127.0.0.1:8002

which prints `round-robin proxy ready at http://127.0.0.1:PORT` and answers
`GET /_round_robin/stats` itself (never forwarded).

The replicas it balances are started with `replica(name, serve_argv(..., url=...))`:
`portcullis serve --url` with one public URL for all of them, the balancer's, since
that URL is the audience of the session tokens each replica mints and accepts.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import aiohttp
from aiohttp import web

STATS_PATH = "/_round_robin/stats"
STARTUP_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0

# RFC 9110 §7.6.1 hop-by-hop fields, plus the framing fields each side recomputes.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length"}
)
# No overall deadline: an SSE answer (progress, a `subscriptions/listen` stream) may
# legitimately run long. A dead backend is noticed by the socket, not by a timer.
_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5)
# Shorter than any backend's idle keep-alive (uvicorn's default is 5 s; the gateway
# keeps 75 s), so the proxy closes an idle pooled connection before the backend
# does and never mistakes a routine close for a dead backend.
_POOL_IDLE_SECONDS = 4.0

Outcome = Literal["ok", "refused", "broken", "client_gone"]


class NoBackend(RuntimeError):
    """Every backend has been dropped."""


@dataclass
class Exchange:
    """One proxied request (kept only with `record=True`)."""

    id: int
    backend: str
    http_method: str
    rpc_method: str | None  # the JSON-RPC method of the body (None: no body, a batch, not JSON)
    dispatched: float  # time.monotonic(), the same clock in every process on Linux
    ended: float | None = None
    status: int | None = None  # the backend's HTTP status, once it answered
    outcome: Outcome | None = None  # None while in flight
    error: str = ""

    def in_flight_at(self, moment: float) -> bool:
        return self.dispatched <= moment and (self.ended is None or self.ended > moment)


@dataclass
class Backend:
    name: str
    url: str  # origin, no path: http://127.0.0.1:PORT
    alive: bool = True
    dropped_at: float | None = None
    dispatched: int = 0
    answered: int = 0
    failed: int = 0
    in_flight: set[int] = field(default_factory=set)

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name, "url": self.url, "alive": self.alive, "droppedAt": self.dropped_at,
            "dispatched": self.dispatched, "answered": self.answered, "failed": self.failed, "inFlight": len(self.in_flight),
        }


class RoundRobinProxy:
    """The proxy's state and its aiohttp application; see the module docstring."""

    def __init__(self, backends: Sequence[str] = (), *, names: Sequence[str] | None = None, record: bool = True):
        labels = list(names) if names is not None else [f"b{i}" for i in range(len(backends))]
        if len(labels) != len(backends):
            raise ValueError("one name per backend")
        self.backends = [Backend(n, _origin(u)) for n, u in zip(labels, backends, strict=True)]
        self.record = record
        self.exchanges: list[Exchange] = []
        self.no_backend = 0
        self._lock = threading.Lock()  # the test thread reads what the proxy's loop writes
        self._ids = itertools.count(1)
        self._turn = 0
        self._http: aiohttp.ClientSession | None = None

    # --- what tests and benchmarks read -------------------------------------------------

    def backend(self, name: str) -> Backend:
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(name)

    def add_backend(self, name: str, url: str) -> None:
        """Join the rotation (a pod becoming an endpoint); the proxy may already be serving."""
        with self._lock:
            if any(b.name == name for b in self.backends):
                raise ValueError(f"backend {name!r} exists")
            self.backends.append(Backend(name, _origin(url)))

    def in_flight(self, name: str) -> set[int]:
        with self._lock:
            return set(self.backend(name).in_flight)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"backends": [b.stats() for b in self.backends], "noBackend": self.no_backend}

    def recorded(self) -> list[Exchange]:
        with self._lock:
            return [Exchange(**asdict(e)) for e in self.exchanges]

    def settled(self, timeout: float = 5.0) -> list[Exchange]:
        """`recorded()` once every exchange has ended: the proxy marks one ended just after it
        passed the answer on, so a client can hold the answer before the record says so."""
        deadline = time.monotonic() + timeout
        exchanges = self.recorded()
        while any(e.ended is None for e in exchanges) and time.monotonic() < deadline:
            time.sleep(0.01)  # the proxy runs on its own thread: its records can only be polled
            exchanges = self.recorded()
        return exchanges

    # --- the proxy ----------------------------------------------------------------------

    def app(self) -> web.Application:
        application = web.Application(client_max_size=64 * 1024 * 1024)
        application.router.add_get(STATS_PATH, self._stats_handler)
        application.router.add_route("*", "/{tail:.*}", self._forward)
        application.on_startup.append(self._open)
        application.on_cleanup.append(self._close)
        return application

    async def _open(self, _: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=_POOL_IDLE_SECONDS, enable_cleanup_closed=False)
        # auto_decompress off: bytes pass through as the backend encoded them.
        self._http = aiohttp.ClientSession(connector=connector, timeout=_TIMEOUT, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())

    async def _close(self, _: web.Application) -> None:
        if self._http is not None:
            await self._http.close()

    async def _stats_handler(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    def _choose(self, request: web.Request, body: bytes) -> tuple[Backend, Exchange | None, int]:
        with self._lock:
            alive = [b for b in self.backends if b.alive]
            if not alive:
                self.no_backend += 1
                raise NoBackend()
            backend = alive[self._turn % len(alive)]
            self._turn += 1
            exchange_id = next(self._ids)
            backend.dispatched += 1
            backend.in_flight.add(exchange_id)
            exchange = None
            if self.record:
                exchange = Exchange(exchange_id, backend.name, request.method, _rpc_method(body), time.monotonic())
                self.exchanges.append(exchange)
            return backend, exchange, exchange_id

    def _finish(self, backend: Backend, exchange: Exchange | None, exchange_id: int, outcome: Outcome,
                status: int | None = None, error: str = "") -> None:
        with self._lock:
            backend.in_flight.discard(exchange_id)
            if outcome in ("refused", "broken"):
                backend.failed += 1
                if backend.alive:  # one strike: out of the rotation for good
                    backend.alive = False
                    backend.dropped_at = time.monotonic()
            elif outcome == "ok":
                backend.answered += 1
            if exchange is not None:
                exchange.ended = time.monotonic()
                exchange.outcome = outcome
                exchange.status = status
                exchange.error = error

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._http is not None, "the application did not start"
        body = await request.read()
        try:
            backend, exchange, exchange_id = self._choose(request, body)
        except NoBackend:
            return web.json_response({"error": "no backend left"}, status=503)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP]
        response: web.StreamResponse | None = None
        status: int | None = None
        try:
            async with self._http.request(
                request.method, backend.url + request.rel_url.raw_path_qs, headers=headers,
                data=body if body else None, allow_redirects=False,
            ) as answer:
                status = answer.status
                response = web.StreamResponse(status=answer.status, reason=answer.reason)
                for key, value in answer.headers.items():
                    if key.lower() not in _HOP_BY_HOP or key.lower() == "content-length":
                        response.headers.add(key, value)
                await _to_client(response.prepare(request))
                # A body cut short by a dying backend raises ClientPayloadError here.
                async for chunk in answer.content.iter_any():
                    await _to_client(response.write(chunk))
                await _to_client(response.write_eof())
        except _ClientGone:
            # The client stopped reading (the session-era SDK client closes an SSE answer
            # once it has its result): not the backend's fault, and nothing to answer.
            self._finish(backend, exchange, exchange_id, "client_gone", status)
            return response if response is not None else web.Response(status=499)
        except aiohttp.ClientConnectorError as exc:  # never reached the backend
            self._finish(backend, exchange, exchange_id, "refused", None, type(exc).__name__)
            return web.json_response({"error": f"backend {backend.name} refused the connection"}, status=502)
        except (aiohttp.ClientError, OSError) as exc:  # the backend went away mid-exchange
            self._finish(backend, exchange, exchange_id, "broken", status, type(exc).__name__)
            if response is None or not response.prepared:
                return web.json_response({"error": f"backend {backend.name} failed: {type(exc).__name__}"}, status=502)
            # The answer already started: cut the client's connection so it sees a
            # truncated answer, never a clean end of one that did not finish.
            if request.transport is not None:
                request.transport.abort()
            return response
        except asyncio.CancelledError:
            self._finish(backend, exchange, exchange_id, "client_gone", status)
            raise
        self._finish(backend, exchange, exchange_id, "ok", status)
        return response


class _ClientGone(Exception):
    """Writing to the proxy's own client failed (kept apart from the backend's failures)."""


async def _to_client(write: Awaitable[Any]) -> None:
    try:
        await write
    except (ConnectionError, aiohttp.ClientConnectionResetError) as exc:
        raise _ClientGone() from exc


def _rpc_method(body: bytes) -> str | None:
    try:
        message = json.loads(body) if body[:1] == b"{" else None
    except ValueError:
        return None
    method = message.get("method") if isinstance(message, dict) else None
    return method if isinstance(method, str) else None


def _origin(url: str) -> str:
    scheme, _, rest = url.partition("://")
    if not rest:
        raise ValueError(f"not an absolute URL: {url!r}")
    return f"{scheme}://{rest.split('/', 1)[0]}"


# --- in a test: a background thread with its own loop ----------------------------------------


@dataclass
class RunningProxy:
    proxy: RoundRobinProxy
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = "/mcp") -> str:
        return self.base_url + path


@contextmanager
def round_robin_proxy(backends: Sequence[str] = (), *, names: Sequence[str] | None = None, record: bool = True) -> Iterator[RunningProxy]:
    """Serve a `RoundRobinProxy` on 127.0.0.1 (a free port) until the block exits."""
    proxy = RoundRobinProxy(backends, names=names, record=record)
    loop = asyncio.new_event_loop()
    started: Future[int] = Future()
    stop = asyncio.Event()

    async def serve() -> None:
        runner = web.AppRunner(proxy.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0, handler_cancellation=True)
        try:
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            started.set_result(int(runner.addresses[0][1]))
            await stop.wait()
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            raise
        finally:
            await runner.cleanup()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(serve())
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="round-robin-proxy", daemon=True)
    thread.start()
    try:
        port = started.result(timeout=STARTUP_TIMEOUT)
        yield RunningProxy(proxy, port)
    finally:
        if not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError(f"the round-robin proxy did not stop within {STOP_TIMEOUT}s")


# --- replicas for the proxy to balance ----------------------------------------------------------


def serve_argv(manifests: Sequence[str], state_dir: str, *, url: str | None = None, port: int = 0, admin_port: int = 0,
               python: str = sys.executable) -> list[str]:
    """argv of `portcullis serve -f ... --state-dir ...`, with `--url` (the tokens' audience) when given."""
    files = [arg for path in manifests for arg in ("-f", str(path))]
    public = ["--url", url] if url is not None else []
    return [python, "-m", "portcullis.cli", "serve", *files, "--state-dir", str(state_dir),
            "--port", str(port), "--admin-port", str(admin_port), *public]


@dataclass
class Replica:
    """One gateway process: its own MCP and admin URLs (not the balancer's), and the public URL it was given."""

    name: str
    process: subprocess.Popen[bytes]
    mcp: str
    admin: str
    public: str  # `--url`, the tokens' audience; `mcp` when it was started without one

    @property
    def origin(self) -> str:
        return _origin(self.mcp)

    @property
    def pid(self) -> int:
        return self.process.pid


@contextmanager
def replica(name: str, argv: Sequence[str], *, env: dict[str, str] | None = None, stdout: Any = subprocess.DEVNULL,
            ready_timeout: float = 30.0) -> Iterator[Replica]:
    """Start a `serve` process, wait for its banner and `/readyz`; terminate (or kill) it on exit.

    Its stdout (the audit JSON lines) goes to `stdout` (default: discarded); stderr is kept
    to explain a replica that does not come up.
    """
    process = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE,
                               env={**os.environ, **(env or {})})
    assert process.stderr is not None
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []
    stderr = process.stderr

    def read_stderr() -> None:
        for raw in stderr:
            lines.put(raw.decode(errors="replace"))

    threading.Thread(target=read_stderr, daemon=True).start()
    try:
        urls: dict[str, str] = {}
        deadline = time.monotonic() + ready_timeout
        while "admin" not in urls:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"replica {name} printed no banner within {ready_timeout}s:\n{''.join(seen)}") from None
            seen.append(line)
            # The banner names the public URL as "MCP URL", and the bound one as "listening"
            # when they differ.
            for key, label in (("public", "MCP URL:"), ("listening", "listening:"), ("admin", "admin API:")):
                if label in line:
                    urls[key] = line.split(label, 1)[1].strip()
        running = Replica(name, process, urls.get("listening", urls["public"]), urls["admin"], urls["public"])
        _wait_ready(running, deadline, seen)
        yield running
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
        stderr.close()


def _wait_ready(running: Replica, deadline: float, seen: list[str]) -> None:
    """Until `/readyz` answers 200 (the upstream lists are in), bounded by `deadline`."""
    url = running.origin + "/readyz"
    while True:
        if running.process.poll() is not None:
            raise RuntimeError(f"replica {running.name} exited ({running.process.returncode}):\n{''.join(seen)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"replica {running.name} not ready within the deadline:\n{''.join(seen)}")
        time.sleep(0.05)  # polling a readiness probe, bounded by the deadline


# --- as a process of its own (benchmarks) ---------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A per-request round-robin HTTP proxy with no stickiness and no retries.")
    parser.add_argument("--backend", action="append", required=True, help="backend origin (repeat), e.g. http://127.0.0.1:8001")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--no-uvloop", action="store_true", help="run on the stock asyncio loop")
    args = parser.parse_args(argv)
    if not args.no_uvloop:
        try:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        except ImportError:
            pass
    proxy = RoundRobinProxy(args.backend, record=False)

    async def serve() -> None:
        runner = web.AppRunner(proxy.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", args.port)
        await site.start()
        port = runner.addresses[0][1]
        print(f"round-robin proxy ready at http://127.0.0.1:{port}", flush=True)
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        try:
            await done.wait()
        finally:
            await runner.cleanup()

    asyncio.run(serve())
    print(json.dumps(proxy.stats()), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
