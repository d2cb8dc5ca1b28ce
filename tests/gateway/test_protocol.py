"""One write per answer (`OneWritePerStep`): what one loop step writes leaves in one write, in order, at once.

The transport's rules are pinned against a recording transport; the served protocol (uvicorn's,
with the header deadline and the held writes) against a real socket: small, large, streamed and
pipelined answers all arrive whole and in order, and a stream's events are not held back.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from portcullis.gateway.protocol import HOLD_LIMIT, OneWritePerStep
from portcullis.gateway.runtime import Listener, Servers, bind, run_in_thread

pytestmark = pytest.mark.anyio


class Recording:
    """The parts of a transport OneWritePerStep uses, recording what reaches the socket."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.events: list[str] = []
        self.closing = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.events.append(f"close after {len(self.writes)} writes")
        self.closing = True

    def abort(self) -> None:
        self.events.append("abort")
        self.closing = True

    def write_eof(self) -> None:
        self.events.append(f"eof after {len(self.writes)} writes")

    def get_write_buffer_size(self) -> int:
        return 0


def held() -> tuple[OneWritePerStep, Recording]:
    real = Recording()
    return OneWritePerStep(real, asyncio.get_running_loop()), real  # type: ignore[arg-type]


async def next_step() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_what_one_step_writes_leaves_in_one_write_at_the_end_of_the_step() -> None:
    transport, real = held()
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(bytearray(b"ok"))
    assert real.writes == []
    assert transport.get_write_buffer_size() == 40
    await next_step()
    assert real.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
    transport.write(b"event: 1\n\n")
    await next_step()
    transport.write(b"event: 2\n\n")
    await next_step()
    assert real.writes[1:] == [b"event: 1\n\n", b"event: 2\n\n"]


async def test_a_written_bytearray_is_copied_so_later_changes_do_not_reach_the_socket() -> None:
    transport, real = held()
    buffer = bytearray(b"first")
    transport.write(buffer)
    buffer[:] = b"later"
    await next_step()
    assert real.writes == [b"first"]


async def test_a_large_write_sends_what_is_held_then_itself_in_order() -> None:
    transport, real = held()
    big = b"x" * HOLD_LIMIT
    transport.write(b"head")
    transport.write(big)
    assert real.writes == [b"head", big]
    assert real.writes[1] is big  # not copied into a join
    transport.write(b"a" * (HOLD_LIMIT // 2))
    transport.write(b"b" * (HOLD_LIMIT // 2))  # together at the limit: sent without waiting
    assert real.writes[2:] == [b"a" * (HOLD_LIMIT // 2) + b"b" * (HOLD_LIMIT // 2)]
    await next_step()
    assert len(real.writes) == 3


async def test_close_and_eof_send_what_is_held_first_and_abort_drops_it() -> None:
    transport, real = held()
    transport.write(b"bye")
    transport.write_eof()
    transport.write(b"!")
    transport.close()
    assert real.writes == [b"bye", b"!"]
    assert real.events == ["eof after 1 writes", "close after 2 writes"]
    await next_step()
    assert real.writes == [b"bye", b"!"]

    transport, real = held()
    transport.write(b"never")
    transport.abort()
    await next_step()
    assert real.writes == [] and real.events == ["abort"]


async def test_what_is_held_when_the_connection_closes_under_it_is_dropped() -> None:
    transport, real = held()
    transport.write(b"late")
    real.closing = True  # the peer went away before the step ended
    await next_step()
    assert real.writes == []


# --- served -------------------------------------------------------------------------------

EVENT_GAP = 2.0  # seconds between the stream's events: far more than a loopback read takes, even loaded
BIG = b"0123456789abcdef" * (HOLD_LIMIT // 4)  # 4 x HOLD_LIMIT


async def stream(request: Request) -> Response:
    async def events() -> AsyncIterator[bytes]:
        for n in range(2):
            yield f"data: {n}\n\n".encode()
            await asyncio.sleep(EVENT_GAP)

    return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    app = Starlette(routes=[
        Route("/", lambda request: PlainTextResponse("ok")),
        Route("/big", lambda request: Response(BIG)),
        Route("/stream", stream),
    ])
    servers = Servers([Listener(app, bind("127.0.0.1", 0), "test")])
    with run_in_thread(servers):
        yield servers.listeners[0].port


def read_answers(sock: socket.socket, count: int) -> list[tuple[bytes, bytes]]:
    """`count` content-length answers, in order: (head, body) each."""
    data, answers = b"", []
    while len(answers) < count:
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, data = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        while len(data) < length:
            data += sock.recv(65536)
        answers.append((head, data[:length]))
        data = data[length:]
    assert data == b"", "more than was asked for"
    return answers


def test_small_large_and_pipelined_answers_arrive_whole_and_in_order(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /big HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = read_answers(sock, 3)
    assert [head.split(b"\r\n")[0] for head, _ in answers] == [b"HTTP/1.1 200 OK"] * 3
    assert [body for _, body in answers] == [b"ok", BIG, b"ok"]


def test_a_streamed_event_is_sent_when_written_not_with_the_next(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        data = b""
        while b"data: 0\n\n" not in data:
            data += sock.recv(65536)
        first = time.monotonic() - started
        assert b"data: 1" not in data
        while b"0\r\n\r\n" not in data:  # the chunked stream's end
            data += sock.recv(65536)
    assert first < EVENT_GAP, f"the first event took {first:.3f} s: it was held until the next"
    assert data.index(b"data: 0") < data.index(b"data: 1")
