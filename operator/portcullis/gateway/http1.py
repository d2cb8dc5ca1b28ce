"""Keep-alive HTTP/1.1 connections to upstream origins, on asyncio Protocols and httptools.

Why not aiohttp on this path: the gateway's own work per call is small, and aiohttp's
client (request and response objects, its connector, its stream reader, yarl) cost
more CPU per upstream call than the rest of the call path put together (profiled: about
30% of the gateway's CPU per call). An upstream call needs little of it: one POST with a
JSON body to one known URL, and an answer read whole or as server-sent event lines. This
module does that much, on a pool of keep-alive connections per origin (scheme, host,
port) and httptools' parser (llhttp, the one uvicorn serves with).

What it does not do goes through aiohttp, behind the same `Endpoint.request`: https
origins, URLs with credentials in them. So the caller has one code path whatever the URL.

Rules of the pool (each tested in tests/gateway/test_http1.py):

- A connection goes back to the pool only after its answer was read to the end, on a
  connection both sides keep alive. Anything else (an answer left half read, a budget
  spent, a cancelled or timed-out request, a malformed answer) closes it.
- A connection the server closed while idle is dropped the moment the loop sees it
  (`eof_received`), and skipped if taken before. A request is never sent twice: once
  written, a connection that dies before the answer's head fails the request
  (`NotAnswered`), as the server may have acted on it.
- No `Accept-Encoding` is sent, so answers come identity-encoded; a gzip or deflate one
  is still decoded, in bounded pieces (a small compressed body cannot expand in memory
  past what the reader's budget lets through).
- Body bytes the reader has not taken yet are bounded (`_HIGH_WATER`): past it the
  socket is paused, so a slow reader of a large answer holds little in memory.

Errors are `HTTPError`s in two kinds that say what the caller may conclude:
`NotAnswered` (no answer began: refused, unresolvable, closed before the head) and
`BrokenAnswer` (an answer began and was cut short or is malformed). Each carries the
`label` aiohttp's equivalent error had, so the messages built from them read as before.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import weakref
import zlib
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any, ClassVar, Final, Protocol, cast

import aiohttp
import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from portcullis import __version__

LINE_LIMIT: Final = 2 * 2**16
"""The longest line an event stream may hold: aiohttp's readline limit (twice its 64 KiB read
buffer), which the gateway held event lines to before this module (docs/limits.md)."""
_HIGH_WATER: Final = 1 << 20  # unread body bytes past which the socket is paused
_IDLE_SECONDS: Final = 60.0  # an idle pooled connection is closed after this (aiohttp's keepalive_timeout here before)
_SWEEP_SECONDS: Final = 15.0
_INFLATE_PIECE: Final = 1 << 16  # decoded bytes handed out per step of a compressed body
_DRAIN_SECONDS: Final = 1.0  # how long the rest of an answer its reader left is awaited before its connection closes
_DRAIN_BYTES: Final = 1 << 16  # and how much of it is read
_USER_AGENT: Final = f"portcullis-gateway/{__version__}"
_NO_HEADERS: Final[Mapping[str, str]] = CIMultiDictProxy(CIMultiDict())


class HTTPError(Exception):
    """An exchange with an upstream failed. `label`: aiohttp's name for the same failure."""

    label: ClassVar[str] = "ClientError"


class NotAnswered(HTTPError):
    """No answer began: the origin refused, could not be resolved, or closed before the answer's head."""

    label = "ServerDisconnectedError"


class ConnectFailed(NotAnswered):
    """Connecting failed (refused, unresolvable, unroutable): the request was never sent."""

    label = "ClientConnectorError"


class BrokenAnswer(HTTPError):
    """An answer began and was cut short (connection closed or reset), or is not valid HTTP."""

    label = "ClientPayloadError"


class MalformedAnswer(BrokenAnswer):
    """What came back does not parse as an HTTP/1.1 response."""

    label = "ClientResponseError"


class InvalidRequest(HTTPError):
    """A request header name or value holds a line break (header injection): nothing was sent."""

    label = "InvalidHeader"


class Body(Protocol):
    """An answer's body as it arrives (aiohttp's `StreamReader` is one)."""

    def iter_any(self) -> AsyncIterator[bytes]: ...

    def get_read_buffer_limits(self) -> tuple[int, int]: ...


class Response(Protocol):
    """What the caller reads of an answer (aiohttp's `ClientResponse` is one)."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def content(self) -> Body: ...

    def close(self) -> None: ...


class Exchange(Protocol):
    """One request: entering sends it and waits for the answer's head; leaving releases the connection."""

    async def __aenter__(self) -> Response: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None: ...


class Endpoint(Protocol):
    """One upstream URL."""

    def request(self, method: str, body: bytes, headers: Mapping[str, str], connect_timeout: float) -> Exchange: ...


class Client:
    """One gateway's upstream HTTP: a pool per plain-http origin, and its aiohttp session for the rest.

    Found from the session (`of`), so whoever holds the gateway's session reaches the same pools.
    """

    _by_session: ClassVar[weakref.WeakKeyDictionary[aiohttp.ClientSession, Client]] = weakref.WeakKeyDictionary()

    def __init__(self, session: aiohttp.ClientSession):
        self._session = session
        self._pools: dict[tuple[str, int], Pool] = {}

    @classmethod
    def of(cls, session: aiohttp.ClientSession) -> Client:
        client = cls._by_session.get(session)
        if client is None:
            client = cls._by_session[session] = cls(session)
        return client

    def endpoint(self, url: str) -> Endpoint:
        parsed = URL(url)
        if parsed.scheme != "http" or parsed.raw_user or parsed.raw_password or not parsed.raw_host:
            return SessionEndpoint(self._session, url)
        port = parsed.port or 80
        key = (parsed.raw_host, port)
        pool = self._pools.get(key)
        if pool is None or pool.closed:
            pool = self._pools[key] = Pool(parsed.raw_host, port)
        return PooledEndpoint(pool, parsed)

    async def close(self) -> None:
        """Close every idle connection; those in use close when their request ends."""
        self._by_session.pop(self._session, None)
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


class SessionEndpoint:
    """A URL this module does not speak to itself (https, credentials in the URL): aiohttp's session does."""

    def __init__(self, session: aiohttp.ClientSession, url: str):
        self._session = session
        self._url = url
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def request(self, method: str, body: bytes, headers: Mapping[str, str], connect_timeout: float) -> Exchange:
        timeout = self._timeouts.get(connect_timeout)
        if timeout is None:
            # aiohttp bounds connecting only; the rest is the caller's (an idle clock aiohttp lacks).
            timeout = self._timeouts[connect_timeout] = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout)
        return self._session.request(method, self._url, data=body, headers=headers, timeout=timeout)


class PooledEndpoint:
    """A plain-http URL, spoken to over its origin's `Pool`."""

    def __init__(self, pool: Pool, url: URL):
        self._pool = pool
        self._target = url.raw_path_qs or "/"
        host = url.raw_host or ""
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        self._host = host if url.port in (None, 80) else f"{host}:{url.port}"
        self._heads: dict[str, str] = {}

    def request(self, method: str, body: bytes, headers: Mapping[str, str], connect_timeout: float) -> Exchange:
        start = self._heads.get(method)
        if start is None:
            start = self._heads[method] = f"{method} {self._target} HTTP/1.1\r\nhost: {self._host}\r\nuser-agent: {_USER_AGENT}\r\n"
        fields = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        if fields.count("\n") != len(headers) or fields.count("\r") != len(headers):
            raise InvalidRequest("a request header holds a line break")
        head = f"{start}{fields}content-length: {len(body)}\r\n\r\n".encode()
        return _PooledExchange(self._pool, head, body, connect_timeout)


class Pool:
    """The idle keep-alive connections to one origin, most recently used first."""

    def __init__(self, host: str, port: int):
        self.host = host
        self.port = port
        self.closed = False
        self._idle: list[_Connection] = []
        self._sweep: asyncio.TimerHandle | None = None
        self._draining: set[asyncio.Task[None]] = set()

    @property
    def idle(self) -> int:
        """How many connections wait in the pool (for tests and metrics)."""
        return len(self._idle)

    def take(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            connection.pooled = False
            if not connection.closed:
                return connection
        return None

    async def connect(self, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, connection = await loop.create_connection(lambda: _Connection(self, loop), self.host, self.port)
        except TimeoutError:
            raise
        except OSError as exc:  # refused, unreachable, unresolvable (gaierror)
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        return connection

    def put(self, connection: _Connection) -> None:
        if self.closed or connection.closed:
            connection.close()
            return
        loop = connection.loop
        connection.idle_since = loop.time()
        connection.pooled = True
        self._idle.append(connection)
        if self._sweep is None:
            self._sweep = loop.call_later(_SWEEP_SECONDS, self._expire)

    def drain(self, connection: _Connection, response: _Response) -> None:
        """Keep `connection` if the rest of the answer its reader left comes soon: a server that streams its
        answer as events (the session protocol's SSE) ends the stream just after the message the reader
        wanted. Closing instead would cost both sides a new connection for every such call."""
        task = asyncio.get_running_loop().create_task(self._drained(connection, response))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def _drained(self, connection: _Connection, response: _Response) -> None:
        read = 0
        try:
            async with asyncio.timeout(_DRAIN_SECONDS):
                async for chunk in response.iter_any():
                    read += len(chunk)
                    if read > _DRAIN_BYTES:
                        break
        except (TimeoutError, HTTPError):
            pass
        except asyncio.CancelledError:  # the pool closes
            connection.close()
            raise
        if response.done and connection.keep_alive and not connection.closed:
            connection.response = None
            self.put(connection)
        else:
            connection.close()

    def forget(self, connection: _Connection) -> None:
        """A pooled connection closed (by the server, or expired)."""
        if connection.pooled:
            connection.pooled = False
            self._idle.remove(connection)

    def close(self) -> None:
        self.closed = True
        for task in self._draining:
            task.cancel()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.pooled = False
            connection.close()

    def _expire(self) -> None:
        self._sweep = None
        now = asyncio.get_running_loop().time()
        for connection in [c for c in self._idle if now - c.idle_since >= _IDLE_SECONDS]:
            self.forget(connection)
            connection.close()
        if self._idle and not self.closed:
            self._sweep = asyncio.get_running_loop().call_later(_SWEEP_SECONDS, self._expire)


class _PooledExchange:
    __slots__ = ("_body", "_connection", "_head", "_pool", "_response", "_timeout")

    def __init__(self, pool: Pool, head: bytes, body: bytes, timeout: float):
        self._pool = pool
        self._head = head
        self._body = body
        self._timeout = timeout
        self._connection: _Connection | None = None
        self._response: _Response | None = None

    async def __aenter__(self) -> _Response:
        connection = self._pool.take() or await self._pool.connect(self._timeout)
        self._connection = connection
        try:
            self._response = response = connection.send(self._head, self._body)
            await response.head()
        except BaseException:
            connection.close()  # cancelled, timed out or failed before the head: never reused
            raise
        return response

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        connection, response = self._connection, self._response
        assert connection is not None and response is not None
        if exc_type is None and connection.keep_alive and not connection.closed:
            if response.done:
                connection.response = None
                self._pool.put(connection)
            else:
                self._pool.drain(connection, response)  # the reader has what it wanted; the answer may end soon
        else:
            connection.close()


class _Response:
    """One answer as its connection receives it; also its own `Body`."""

    __slots__ = (
        "_chunks", "_connection", "_decoder", "_error", "_head", "_paused", "_waiter",
        "buffered", "content_length", "done", "headers", "raw_headers", "status",
    )

    def __init__(self, connection: _Connection):
        self._connection = connection
        self._head: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._error: HTTPError | None = None
        self._paused = False
        self._decoder: Any = None
        self.buffered = 0
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.headers: Mapping[str, str] = _NO_HEADERS
        self.content_length: int | None = None
        self.done = False

    @property
    def content(self) -> _Response:
        return self

    def get_read_buffer_limits(self) -> tuple[int, int]:
        return (LINE_LIMIT // 2, LINE_LIMIT)

    def close(self) -> None:
        """Stop reading: the connection is closed, never reused."""
        self._connection.close()

    async def head(self) -> None:
        """Wait for the answer's status and headers."""
        if self.status:
            return
        if self._error is not None:
            raise self._error
        self._head = self._connection.loop.create_future()
        try:
            await self._head
        finally:
            self._head = None

    def arrived(self) -> bytes | None:
        """The whole body if all of it is here already (and not compressed), else None: a small
        answer usually comes in the segment its head came in, and needs no `iter_any` (an async
        generator, which the loop registers and forgets again for every answer)."""
        if not self.done or self._decoder is not None or self._error is not None:
            return None
        chunks = self._chunks
        body = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self._paused:  # a body over the high-water mark in one read: the connection goes back reading
            self._paused = False
            self._connection.resume()
        return body

    async def iter_any(self) -> AsyncIterator[bytes]:
        """The body as it arrives, each piece as soon as it is there."""
        while True:
            if self._chunks:
                if len(self._chunks) == 1:
                    chunk = self._chunks.popleft()
                else:
                    chunk = b"".join(self._chunks)
                    self._chunks.clear()
                self.buffered = 0
                if self._paused:
                    self._paused = False
                    self._connection.resume()
                if self._decoder is None:
                    yield chunk
                else:
                    while chunk:
                        try:
                            piece = self._decoder.decompress(chunk, _INFLATE_PIECE)
                        except zlib.error:
                            raise BrokenAnswer("the answer's compressed body does not decode") from None
                        chunk = self._decoder.unconsumed_tail
                        if piece:
                            yield piece
                continue
            if self.done:
                return
            if self._error is not None:
                raise self._error
            self._waiter = self._connection.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    # --- fed by the connection -------------------------------------------------------

    def headers_complete(self, status: int) -> None:
        self.status = status
        self.headers = headers = CIMultiDict([(n.decode("latin-1"), v.decode("latin-1")) for n, v in self.raw_headers])
        length = headers.get("content-length")
        if length is not None and length.isdigit():
            self.content_length = int(length)
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("gzip", "deflate", "x-gzip"):
            self._decoder = zlib.decompressobj(wbits=47)  # gzip or zlib framing, told apart by the header
        elif encoding != "identity":
            self.fail(BrokenAnswer(f"the answer is {encoding}-encoded, which the gateway does not decode"))
            return
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def body(self, data: bytes) -> None:
        self._chunks.append(data)
        self.buffered += len(data)
        if self.buffered > _HIGH_WATER and not self._paused:
            self._paused = True
            self._connection.pause()
        self._wake()

    def complete(self) -> None:
        self.done = True
        self._wake()

    def fail(self, error: HTTPError) -> None:
        if self.done or self._error is not None:
            return
        self._error = error
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def arrived(content: Body) -> bytes | None:
    """The whole body of one of the pool's answers when all of it has arrived; None when it has
    not, or `content` is aiohttp's (https and streams), which is then read with `iter_any`."""
    return content.arrived() if type(content) is _Response else None


class _Connection(asyncio.Protocol):
    """One keep-alive connection: carries one request at a time, parsing its answer as it arrives."""

    def __init__(self, pool: Pool, loop: asyncio.AbstractEventLoop):
        self._pool = pool
        self.loop = loop  # the one it was opened on: asked once, not per call (CPython 3.11 asks the kernel for the pid each time)
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._interim = False  # the message being parsed is a 1xx (100 Continue and the like): skipped
        self._until_close = False  # the answer's body ends when the connection does (no length, not chunked)
        self.response: _Response | None = None
        self.closed = False
        self.keep_alive = False
        self.pooled = False
        self.idle_since = 0.0

    # --- used by the exchange ---------------------------------------------------------

    def send(self, head: bytes, body: bytes) -> _Response:
        assert self._transport is not None and self.response is None
        self.response = response = _Response(self)
        self.keep_alive = False
        if len(body) < 16384:
            self._transport.write(head + body)
        else:
            self._transport.writelines((head, body))
        return response

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._pool.forget(self)
            if self._transport is not None:
                self._transport.close()
            if self.response is not None:
                self.response.fail(BrokenAnswer("the connection was closed before the answer ended"))

    def pause(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.pause_reading()

    def resume(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.resume_reading()

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # nothing was asked: a server talking out of turn is not kept
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self.response.fail(MalformedAnswer(f"the answer is not valid HTTP/1.1 ({type(exc).__name__})"))
            self.close()

    def eof_received(self) -> bool:
        response = self.response
        if response is not None and response.status and self._until_close and not response.done:
            response.complete()  # the answer's body ends with the connection
        self._lost(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)

    def _lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        response = self.response
        if response is not None and not response.done:
            if response.status:
                response.fail(BrokenAnswer(f"the answer was cut short ({type(exc).__name__ if exc else 'connection closed'})"))
            else:
                response.fail(NotAnswered(f"the connection closed before an answer ({type(exc).__name__ if exc else 'EOF'})"))

    # --- httptools callbacks ----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            self.response.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # 101 (an upgrade nobody asked for) fails in feed_data
            self._interim = True
            response.raw_headers.clear()
            return
        self.keep_alive = self._parser.should_keep_alive()
        names = {name.lower() for name, _ in response.raw_headers}
        self._until_close = (
            b"content-length" not in names and b"transfer-encoding" not in names and status not in (204, 304)
        )
        response.headers_complete(status)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response.body(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self.response is not None:
            self.response.complete()
