"""The upstream wire (gateway/http1.py) against scripted servers on loopback.

Each server here is a plain asyncio server in the test's own loop that says exactly the
bytes a test needs (a keep-alive answer, a chunked one, an answer cut short, a connection
closed while idle), and counts the connections it accepted, so reuse is seen from the
server's side.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import anyio
import pytest
from aiohttp.http_exceptions import LineTooLong

from portcullis.api.config import ConnectionConfig
from portcullis.gateway import http1
from portcullis.gateway.upstream import ResultTooLarge, _Budget, _read_body, _sse_lines

pytestmark = pytest.mark.anyio

Conversation = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}"


@dataclass
class Server:
    url: str
    accepted: int = 0
    ended: list[asyncio.Event] = field(default_factory=list)
    """One per connection: set when the gateway's side closed it (the server read EOF)."""


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request's head and body (by its content-length); None when the client closed."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    return head + await reader.readexactly(length)


async def answer_each(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: bytes = OK) -> None:
    """Keep-alive: every request gets `answer`, until the client closes."""
    while await read_request(reader) is not None:
        writer.write(answer)
        await writer.drain()


async def until_closed(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


@contextlib.asynccontextmanager
async def serve(conversation: Conversation) -> AsyncIterator[Server]:
    server = Server("")

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.accepted += 1
        ended = asyncio.Event()
        server.ended.append(ended)
        try:
            await conversation(reader, writer)
            await until_closed(reader)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            ended.set()
            writer.close()

    listener = await asyncio.start_server(accepted, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    server.url = f"http://127.0.0.1:{port}/mcp?x=1"
    try:
        yield server
    finally:
        listener.close()
        for transport_end in server.ended:
            transport_end.set()


@contextlib.asynccontextmanager
async def client() -> AsyncIterator[http1.Client]:
    async with aiohttp.ClientSession() as session:
        wire = http1.Client.of(session)
        try:
            yield wire
        finally:
            await wire.close()


async def post(endpoint: http1.Endpoint, body: bytes = b"{}") -> tuple[int, bytes]:
    async with endpoint.request("POST", body, {"content-type": "application/json"}, 5) as response:
        return response.status, b"".join([chunk async for chunk in response.content.iter_any()])


def pool_of(wire: http1.Client, server: Server) -> http1.Pool:
    endpoint = wire.endpoint(server.url)
    assert isinstance(endpoint, http1.PooledEndpoint)
    return endpoint._pool


async def test_a_connection_is_reused_once_its_answer_was_read_to_the_end() -> None:
    seen: list[bytes] = []

    async def conversation(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await read_request(reader)) is not None:
            seen.append(request)
            writer.write(OK)

    async with serve(conversation) as server, client() as wire:
        with anyio.fail_after(10):
            endpoint = wire.endpoint(server.url)
            for _ in range(3):
                assert await post(endpoint, b'{"a":1}') == (200, b'{"ok":true}')
        assert server.accepted == 1 and pool_of(wire, server).idle == 1
    port = server.url.split(":")[2].split("/")[0]
    assert seen[0].startswith(b"POST /mcp?x=1 HTTP/1.1\r\nhost: 127.0.0.1:" + port.encode() + b"\r\n")
    assert b"content-length: 7\r\n\r\n{\"a\":1}" in seen[0] and b"accept-encoding" not in seen[0].lower()


async def test_a_chunked_answer_is_read_whole_and_its_connection_reused() -> None:
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"

    async def conversation(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answer_each(reader, writer, chunked)

    async with serve(conversation) as server, client() as wire:
        with anyio.fail_after(10):
            endpoint = wire.endpoint(server.url)
            assert await post(endpoint) == (200, b"hello world")
            assert await post(endpoint) == (200, b"hello world")
        assert server.accepted == 1


async def test_event_lines_arrive_while_the_answer_is_still_open() -> None:
    first_seen = asyncio.Event()

    async def conversation(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(b"10\r\ndata: {\"n\": 1}\n\n\r\n")
        await first_seen.wait()  # the second event only once the first was read: nothing waits for the end
        writer.write(b"10\r\ndata: {\"n\": 2}\n\n\r\n0\r\n\r\n")

    config = ConnectionConfig(name="up", url="http://127.0.0.1:1/mcp")
    async with serve(conversation) as server, client() as wire:
        lines: list[bytes] = []
        with anyio.fail_after(10):
            async with wire.endpoint(server.url).request("POST", b"{}", {}, 5) as response:
                assert response.headers["Content-Type"] == "text/event-stream"  # looked up case-insensitively
                async for line in _sse_lines(response, _Budget(response, config)):
                    lines.append(line)
                    if line == b'data: {"n": 1}':
                        first_seen.set()
        assert lines == [b'data: {"n": 1}', b"", b'data: {"n": 2}', b""]
        assert pool_of(wire, server).idle == 1


async def test_an_event_line_longer_than_the_line_limit_is_refused() -> None:
    async def conversation(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
        writer.write(b"data: " + b"x" * (http1.LINE_LIMIT + 10) + b"\n\n")
        writer.close()

    config = ConnectionConfig(name="up", url="http://127.0.0.1:1/mcp", max_result_bytes=10 * http1.LINE_LIMIT)
    async with serve(conversation) as server, client() as wire:
        with anyio.fail_after(10), pytest.raises(LineTooLong):
            async with wire.endpoint(server.url).request("POST", b"{}", {}, 5) as response:
                async for _ in _sse_lines(response, _Budget(response, config)):
                    pass


async def test_an_answer_over_the_result_limit_closes_its_connection() -> None:
    big = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + b"400\r\n" + b"x" * 1024 + b"\r\n" + b"0\r\n\r\n"

    async def conversation(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answer_each(reader, writer, big)

    config = ConnectionConfig(name="up", url="http://127.0.0.1:1/mcp", max_result_bytes=1000)
    async with serve(conversation) as server, client() as wire:
        endpoint = wire.endpoint(server.url)
        with anyio.fail_after(10):
            with pytest.raises(ResultTooLarge, match="answered more than 1000 bytes"):
                async with endpoint.request("POST", b"{}", {}, 5) as response:
                    await _read_body(response, _Budget(response, config))
            await server.ended[0].wait()  # the rest was never read: the connection is gone
            assert pool_of(wire, server).idle == 0
            assert (await post(endpoint))[0] == 200
        assert server.accepted == 2


async def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_read() -> None:
    async def conversation(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n")  # and no body: it is never waited for

    config = ConnectionConfig(name="up", url="http://127.0.0.1:1/mcp", max_result_bytes=1000)
    async with serve(conversation) as server, client() as wire:
        with anyio.fail_after(10), pytest.raises(ResultTooLarge):
            async with wire.endpoint(server.url).request("POST", b"{}", {}, 5) as response:
                await _read_body(response, _Budget(response, config))


async def test_a_connection_the_server_closed_while_idle_is_not_used_again() -> None:
    async def conversation(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)  # keep-alive, as far as the headers go
        await writer.drain()
        writer.close()  # then the server's idle timeout, at once

    async with serve(conversation) as server, client() as wire:
        endpoint = wire.endpoint(server.url)
        pool = pool_of(wire, server)
        with anyio.fail_after(10):
            assert await post(endpoint) == (200, b'{"ok":true}')
            while pool.idle:  # dropped as soon as the loop sees the server's FIN
                await asyncio.sleep(0.01)
            assert await post(endpoint) == (200, b'{"ok":true}')
        assert server.accepted == 2


async def test_an_answer_cut_short_is_a_broken_answer_and_its_connection_dropped() -> None:
    async def conversation(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"partial\":")
        await writer.drain()
        writer.transport.abort()

    async with serve(conversation) as server, client() as wire:
        with anyio.fail_after(10), pytest.raises(http1.BrokenAnswer) as caught:
            await post(wire.endpoint(server.url))
        assert caught.value.label == "ClientPayloadError" and not isinstance(caught.value, http1.NotAnswered)
        assert pool_of(wire, server).idle == 0


async def test_a_chunked_answer_cut_short_is_a_broken_answer() -> None:
    async def conversation(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        writer.close()

    async with serve(conversation) as server, client() as wire:
        with anyio.fail_after(10), pytest.raises(http1.BrokenAnswer):
            await post(wire.endpoint(server.url))


async def test_a_connection_closed_before_the_answer_is_not_answered() -> None:
    async def conversation(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.close()

    async with serve(conversation) as server, client() as wire:
        with anyio.fail_after(10), pytest.raises(http1.NotAnswered) as caught:
            await post(wire.endpoint(server.url))
        assert caught.value.label == "ServerDisconnectedError"


async def test_a_refused_connection_is_connect_failed() -> None:
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    async with client() as wire:
        with anyio.fail_after(10), pytest.raises(http1.ConnectFailed) as caught:
            await post(wire.endpoint(f"http://127.0.0.1:{port}/mcp"))
        assert caught.value.label == "ClientConnectorError" and isinstance(caught.value, http1.NotAnswered)


async def test_cancelling_a_request_closes_its_connection() -> None:
    async def conversation(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)  # and never answers

    async with serve(conversation) as server, client() as wire:
        endpoint = wire.endpoint(server.url)
        with anyio.fail_after(10):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await post(endpoint)
            await server.ended[0].wait()  # the server saw the connection end
        assert pool_of(wire, server).idle == 0


async def test_cancelling_while_the_body_is_read_closes_the_connection() -> None:
    async def conversation(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(b"10\r\ndata: {\"n\": 1}\n\n\r\n")  # then nothing more

    async with serve(conversation) as server, client() as wire:
        with anyio.fail_after(10):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await post(wire.endpoint(server.url))
            await server.ended[0].wait()
        assert pool_of(wire, server).idle == 0


async def test_a_half_read_answer_does_not_give_its_connection_back() -> None:
    async def conversation(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()  # the rest never comes; the client stops reading

    async with serve(conversation) as server, client() as wire:
        endpoint = wire.endpoint(server.url)
        with anyio.fail_after(10):
            async with endpoint.request("POST", b"{}", {}, 5) as response:
                async for chunk in response.content.iter_any():
                    assert chunk == b"hello"
                    break
            await server.ended[0].wait()
        assert pool_of(wire, server).idle == 0


async def test_an_event_stream_that_ends_just_after_the_event_read_gives_its_connection_back() -> None:
    """The session protocol answers a POST with events and ends the stream after the answer: its reader
    stops at the answer, and the end, arriving a moment later, still leaves the connection reusable."""
    event = b"event: message\ndata: {}\n\n"

    async def conversation(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                         + f"{len(event):x}\r\n".encode() + event + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)  # the reader has its event and has left by now
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    async with serve(conversation) as server, client() as wire:
        endpoint = wire.endpoint(server.url)
        with anyio.fail_after(10):
            for _ in range(3):
                async with endpoint.request("POST", b"{}", {}, 5) as response:
                    async for chunk in response.content.iter_any():
                        assert chunk == event
                        break
                while pool_of(wire, server).idle == 0:
                    await asyncio.sleep(0.01)  # given back by the drain, once the end arrived
    assert server.accepted == 1


async def test_an_answer_ending_with_its_connection_is_read_to_that_end() -> None:
    async def conversation(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"until\":\"close\"}")
        await writer.drain()
        writer.close()

    async with serve(conversation) as server, client() as wire:
        with anyio.fail_after(10):
            assert await post(wire.endpoint(server.url)) == (200, b'{"until":"close"}')
        assert pool_of(wire, server).idle == 0


async def test_an_interim_answer_is_skipped() -> None:
    head_seen = asyncio.Event()

    async def conversation(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        await head_seen.wait()
        writer.write(b"5\r\nfinal\r\n0\r\n\r\n")

    async with serve(conversation) as server, client() as wire:
        with anyio.fail_after(10):
            async with wire.endpoint(server.url).request("POST", b"{}", {}, 5) as response:
                assert response.status == 200
                head_seen.set()
                assert b"".join([chunk async for chunk in response.content.iter_any()]) == b"final"
        assert pool_of(wire, server).idle == 1


async def test_a_gzip_answer_is_decoded() -> None:
    packed = gzip.compress(b'{"packed":true}')
    answer = b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: " + str(len(packed)).encode() + b"\r\n\r\n" + packed

    async def conversation(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answer_each(reader, writer, answer)

    async with serve(conversation) as server, client() as wire:
        with anyio.fail_after(10):
            assert await post(wire.endpoint(server.url)) == (200, b'{"packed":true}')
            assert await post(wire.endpoint(server.url)) == (200, b'{"packed":true}')
        assert server.accepted == 1


async def test_an_answer_already_here_is_taken_whole_and_one_still_arriving_is_not() -> None:
    """`arrived`, which `_read_body` tries before `iter_any`: all of a body, once, or None."""
    packed = gzip.compress(b'{"packed":true}')
    zipped = b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: " + str(len(packed)).encode() + b"\r\n\r\n" + packed
    rest = asyncio.Event()

    async def conversation(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await read_request(reader)
        writer.write(OK[:-4])  # the head and part of the body
        await rest.wait()
        writer.write(OK[-4:])
        await read_request(reader)
        writer.write(zipped)

    async with serve(conversation) as server, client() as wire:
        with anyio.fail_after(10):
            endpoint = wire.endpoint(server.url)
            async with endpoint.request("POST", b"{}", {}, 5) as response:
                while not response.done:  # wait for the whole answer
                    await asyncio.sleep(0.001)
                assert http1.arrived(response.content) == b'{"ok":true}'
                assert b"".join([chunk async for chunk in response.content.iter_any()]) == b""
            async with endpoint.request("POST", b"{}", {}, 5) as response:
                await asyncio.sleep(0.05)
                assert http1.arrived(response.content) is None
                rest.set()
                assert b"".join([chunk async for chunk in response.content.iter_any()]) == b'{"ok":true}'
            async with endpoint.request("POST", b"{}", {}, 5) as response:
                while not response.done:
                    await asyncio.sleep(0.001)
                assert http1.arrived(response.content) is None  # compressed: iter_any decodes it
                assert b"".join([chunk async for chunk in response.content.iter_any()]) == b'{"packed":true}'
        assert server.accepted == 1


async def test_a_body_past_the_high_water_mark_taken_whole_leaves_its_connection_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http1, "_HIGH_WATER", 4)  # any answer's first read pauses the socket

    async with serve(answer_each) as server, client() as wire:
        with anyio.fail_after(10):
            endpoint = wire.endpoint(server.url)
            for _ in range(3):
                async with endpoint.request("POST", b"{}", {}, 5) as response:
                    while not response.done:
                        await asyncio.sleep(0.001)
                    assert http1.arrived(response.content) == b'{"ok":true}'
        assert server.accepted == 1


async def test_a_header_holding_a_line_break_is_never_sent() -> None:
    async with serve(answer_each) as server, client() as wire:
        with pytest.raises(http1.InvalidRequest):
            wire.endpoint(server.url).request("POST", b"{}", {"authorization": "Bearer x\r\nx-admin: yes"}, 5)
        assert server.accepted == 0


async def test_https_and_urls_with_credentials_go_through_the_session() -> None:
    async with client() as wire:
        assert isinstance(wire.endpoint("https://example.invalid/mcp"), http1.SessionEndpoint)
        assert isinstance(wire.endpoint("http://user:pw@127.0.0.1:1/mcp"), http1.SessionEndpoint)
        assert isinstance(wire.endpoint("http://127.0.0.1:1/mcp"), http1.PooledEndpoint)


async def test_closing_the_client_closes_its_idle_connections() -> None:
    async with serve(answer_each) as server, client() as wire:
        with anyio.fail_after(10):
            assert (await post(wire.endpoint(server.url)))[0] == 200
            await wire.close()
            await server.ended[0].wait()


async def test_an_answer_that_is_not_http_is_malformed_not_unanswered() -> None:
    async def conversation(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")

    async with serve(conversation) as server, client() as wire:
        with anyio.fail_after(10), pytest.raises(http1.MalformedAnswer) as caught:
            await post(wire.endpoint(server.url))
        assert caught.value.label == "ClientResponseError"
        await server.ended[0].wait()
