"""Pending connections are accepted in batches, not one per event-loop iteration."""

from __future__ import annotations

import asyncio
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from portcullis.gateway import runtime
from portcullis.gateway.runtime import Listener, Servers, bind, new_event_loop, run_in_thread


class _Counting(asyncio.Protocol):
    made: list[_Counting] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _Counting.made.append(self)
        self.transport = transport


def test_one_readiness_event_takes_every_pending_connection() -> None:
    loop = new_event_loop()
    listener = bind("127.0.0.1", 0)
    clients = []
    try:
        _Counting.made = []
        acceptor = runtime._Acceptor(loop, listener, _Counting)
        for _ in range(20):  # queued by the kernel: the loop has not run yet
            clients.append(socket.create_connection(listener.getsockname(), timeout=5))
        acceptor._accept()  # what one readiness event runs
        loop.run_until_complete(asyncio.wait_for(asyncio.gather(*acceptor._handshakes), 5))
        assert len(_Counting.made) == 20
        acceptor.close()
        clients.append(socket.create_connection(listener.getsockname(), timeout=5))
        loop.run_until_complete(asyncio.sleep(0.05))  # a closed acceptor takes nothing more
        assert len(_Counting.made) == 20
        for protocol in _Counting.made:
            protocol.transport.close()
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        for client in clients:
            client.close()
        listener.close()
        loop.close()


@pytest.mark.parametrize("connections", [300])
def test_a_burst_of_new_connections_is_served(connections: int) -> None:
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))])
    servers = Servers([Listener(app, bind("127.0.0.1", 0), "test")])
    with run_in_thread(servers):
        port = servers.listeners[0].port

        def one(_: int) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                data = b""
                while chunk := sock.recv(4096):
                    data += chunk
                return data

        with ThreadPoolExecutor(64) as pool:
            answers = list(pool.map(one, range(connections)))
    assert all(a.startswith(b"HTTP/1.1 200") and a.endswith(b"ok") for a in answers)
