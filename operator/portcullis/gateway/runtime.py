"""Running a gateway: the MCP port and the admin port, one event loop, one process.

Sockets are bound before anything else so that port 0 works (tests, the demo)
and the public URL, which is every session token's audience, is known before
the first token is minted.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from portcullis.gateway.deadlines import HEADER_READ_TIMEOUT
from portcullis.gateway.protocol import http_protocol

log = logging.getLogger("portcullis.gateway")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (it ships with uvicorn[standard] on Linux and macOS).

    The event loop's own bookkeeping was the third-largest cost of a relayed call.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


YOUNG_GENERATION = 10_000
"""Objects allocated (net) between young collections in a gateway process; CPython's default is 700.

A call allocates a few hundred objects that live until its answer, so at 64 calls in flight a
young collection every 700 allocations walks the objects of every call in flight again and
again: 3.5% of the gateway's instructions per call at 64 connections
(benchmarks/results/instructions-2026-12-02.md)."""


def freeze_heap() -> None:
    """Move everything alive after startup out of the garbage collector's sight, and collect less often.

    Imports, models and schemas are permanent; without this every full collection walks
    them all (about 85 ms per collection under load, a fifth of the gateway's CPU).
    Only for a process that is the gateway: it would keep a test process's garbage too.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_GENERATION, *gc.get_threshold()[1:])


class PortInUse(OSError):
    """The address is taken; the message names it and the flag that moves it."""


def bind(host: str, port: int, flag: str | None = None) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only when the
    # listening socket says it is TCP. Without it Nagle holds each response body behind
    # the client's delayed ACK of the headers: 40 ms on every keep-alive call.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            hint = f": choose another with {flag} (0 picks a free one)" if flag else ""
            error = PortInUse(f"{host}:{port} is already in use{hint}")
            error.errno = exc.errno
            raise error from None
        raise
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def with_lifespan(
    app: ASGIApp, startup: Callable[[], Awaitable[None]], shutdown: Callable[[], Awaitable[None]]
) -> ASGIApp:
    """Run `startup` before the app's own startup and `shutdown` before its shutdown completes.

    Both hooks run inside the lifespan protocol, so the server waits for them: a
    shutdown that ran after `lifespan.shutdown.complete` would be cut off with the loop.
    """

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return

        async def receive_hooked() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await startup()
            return message

        async def send_hooked(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await shutdown()
            await send(message)

        await app(scope, receive_hooked, send_hooked)

    return wrapped


ACCEPT_BATCH = 128
"""Connections taken off a listening socket per readiness event (asyncio takes up to its backlog)."""
ACCEPT_PAUSE_SECONDS = 1.0
"""How long accepting pauses after the process ran out of file descriptors (or another accept error)."""


class _Acceptor:
    """Accepts a listening socket's connections in batches and hands each to uvicorn's protocol.

    uvloop (libuv) accepts one connection per loop iteration. Under load an iteration is long,
    so a burst of new connections waited in the listen queue for seconds (measured: 135 queued,
    drained at about 25 a second, a 2 s p99 at 256 connections, benchmarks/results/
    asgi-servers-2026-12-02.md). This takes every pending connection at once, as asyncio's own
    loop does. It has what uvicorn's shutdown uses of a server: `close` and `wait_closed`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, factory: Callable[[], asyncio.Protocol]):
        self._loop = loop
        self._sock = sock
        self._factory = factory
        self._closed = False
        self._handshakes: set[asyncio.Task[Any]] = set()
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: stop for a moment rather than spin
                log.warning("accepting connections paused for %.0f s: %s", ACCEPT_PAUSE_SECONDS, exc)
                self._loop.remove_reader(self._sock.fileno())
                self._loop.call_later(ACCEPT_PAUSE_SECONDS, self._resume)
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self._loop.create_task(self._connect(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except OSError:  # the peer went away before its transport existed
            conn.close()

    def _resume(self) -> None:
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._loop.remove_reader(self._sock.fileno())

    async def wait_closed(self) -> None:
        return None


class _QuietServer(uvicorn.Server):
    """uvicorn without its signal capture (whoever runs the loop handles signals, once for all servers),
    accepting connections in batches (`_Acceptor`) on the pre-bound sockets it is given."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if sockets is None:
            await super().startup(sockets)
            return
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            raise SystemExit(3)  # uvicorn's STARTUP_FAILURE; the lifespan has said why
        config = self.config

        def create_protocol() -> asyncio.Protocol:
            protocol: asyncio.Protocol = config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )
            return protocol

        loop = asyncio.get_running_loop()
        self.servers = [_Acceptor(loop, sock, create_protocol) for sock in sockets]  # type: ignore[misc]
        self.started = True


@dataclass
class Listener:
    app: ASGIApp
    sock: socket.socket
    name: str

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])


@dataclass
class Servers:
    """Several ASGI apps served by uvicorn on pre-bound sockets in one loop."""

    listeners: list[Listener]
    freeze_heap_when_started: bool = False
    header_timeout: float = HEADER_READ_TIMEOUT
    """Seconds a client has to send a request's headers (slowloris); idle keep-alive is apart."""
    gateway: Any = None
    """The gateway these servers front, when there is one (for callers that built it indirectly)."""
    _servers: list[uvicorn.Server] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)

    async def serve(self) -> None:
        self._servers = [
            _QuietServer(
                uvicorn.Config(
                    listener.app,
                    log_level="warning",
                    lifespan="on" if index == 0 else "off",
                    access_log=False,
                    timeout_graceful_shutdown=5,
                    # Agents pause for seconds between tool calls (model time); uvicorn's 5 s
                    # default would make most calls pay a new connection. 75 s outlives common
                    # load-balancer idle timeouts (60 s), so the balancer closes first, cleanly.
                    timeout_keep_alive=75,
                    http=http_protocol(self.header_timeout),
                    # Nothing here reads the client address or scheme a balancer's X-Forwarded-*
                    # would rewrite (tokens, not addresses, say who calls; `--url` is configured),
                    # so uvicorn's middleware for them would only scan every request's headers.
                    proxy_headers=False,
                )
            )
            for index, listener in enumerate(self.listeners)
        ]
        tasks = [
            asyncio.create_task(server.serve(sockets=[listener.sock]))
            for server, listener in zip(self._servers, self.listeners, strict=True)
        ]
        watcher = asyncio.create_task(self._mark_started())
        try:
            await asyncio.gather(*tasks)
        finally:
            watcher.cancel()

    async def _mark_started(self) -> None:
        while not all(s.started for s in self._servers):
            await asyncio.sleep(0.01)
        if self.freeze_heap_when_started:
            freeze_heap()
        self.started.set()

    def stop(self) -> None:
        for server in self._servers:
            server.should_exit = True


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """What asyncio.run does on exit: cancel tasks still pending (e.g. sse-starlette's
    shutdown watcher), let them finish, and close async generators."""
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())


@contextlib.contextmanager
def run_in_thread(servers: Servers, timeout: float = 20.0) -> Iterator[Servers]:
    """Serve in a background thread (tests, the demo); stop and join on exit."""
    loop = new_event_loop()
    errors: list[BaseException] = []

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(servers.serve())
        except BaseException as exc:  # surfaced to the caller below
            errors.append(exc)
            servers.started.set()
        finally:
            _cancel_leftovers(loop)
            loop.close()

    thread = threading.Thread(target=main, name="portcullis-gateway", daemon=True)
    thread.start()
    if not servers.started.wait(timeout) or errors:
        servers.stop()
        thread.join(timeout)
        raise RuntimeError(f"gateway did not start: {errors[0] if errors else 'timeout'}")
    try:
        yield servers
    finally:
        loop.call_soon_threadsafe(servers.stop)
        thread.join(timeout)


