"""A client that does not finish its request's headers is cut off; an idle one is, too."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from portcullis.gateway.runtime import Listener, Servers, bind, run_in_thread

DEADLINE = 0.5


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))])
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
