"""A client that does not finish its request's headers is cut off; an idle one is, too."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from portcullis.gateway.runtime import Listener, Servers, bind, run_in_thread

DEADLINE = 0.5


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    async def slow(request: Request) -> PlainTextResponse:
        await asyncio.sleep(1.5 * DEADLINE)
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok")), Route("/slow", slow)])
    servers = Servers([Listener(app, bind("127.0.0.1", 0), "test")], header_timeout=DEADLINE)
    with run_in_thread(servers):
        yield servers.listeners[0].port


def closed_within(sock: socket.socket, limit: float) -> float:
    """Seconds until the server closed `sock` (recv returns b""), failing after `limit`."""
    sock.settimeout(limit)
    started = time.monotonic()
    while True:
        data = sock.recv(4096)
        if not data:
            return time.monotonic() - started


@pytest.mark.parametrize("sent", [b"", b"POST /mcp HTTP/1.1\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: "])
def test_an_unfinished_request_head_is_closed_after_the_deadline(port: int, sent: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(sent)
        assert closed_within(sock, 10 * DEADLINE + 5) >= DEADLINE * 0.8


def test_a_trickle_of_half_open_connections_is_released(port: int) -> None:
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
    try:
        for sock in socks:
            sock.sendall(b"GET / HTTP/1.1\r\n")
        for sock in socks:
            closed_within(sock, 10 * DEADLINE + 5)
    finally:
        for sock in socks:
            sock.close()


def test_a_complete_request_is_answered_and_the_next_one_on_the_connection_too(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        for _ in range(2):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = sock.recv(4096)
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok")


def answered(sock: socket.socket) -> None:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while not data.endswith(b"ok"):
        data += sock.recv(4096)


@pytest.mark.parametrize("pause", [0.7 * DEADLINE, 1.4 * DEADLINE])
def test_a_later_unfinished_head_gets_its_own_full_deadline(port: int, pause: float) -> None:
    """One timer serves a connection's requests: a head begun just before it fires (0.7), or after
    it fired with no head being read (1.4), still gets the whole deadline from its own start."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        answered(sock)
        time.sleep(pause)
        sock.sendall(b"GET / HTTP/1.1\r\n")
        assert closed_within(sock, 10 * DEADLINE + 5) >= DEADLINE * 0.8


def test_a_request_whose_head_arrived_is_answered_however_long_the_app_takes(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while not data.endswith(b"ok"):
            chunk = sock.recv(4096)
            assert chunk, "closed before the answer"
            data += chunk
        answered(sock)  # and the connection serves the next request
