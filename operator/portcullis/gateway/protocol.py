"""uvicorn's HTTP protocol as both ports run it: a deadline for each request's head, one write per answer.

The deadline is `deadlines.py`'s. The write is here: uvicorn writes a response's status line and
headers, then its body, each straight to the transport, so a small JSON answer costs two `write`
system calls and leaves as two TCP segments (one of the three system calls a call's answer and
upstream request cost in all). `OneWritePerStep` wraps the connection's transport and holds what
is written until the end of the loop's current iteration (`call_soon`): a head and a body written
in one step of the app's task leave in one `write`. Nothing waits longer than that iteration,
so a stream's events (SSE) go out as soon as they are written, as before.

What is held stays small and in order: a write of `HOLD_LIMIT` bytes or more first sends what is
held, then itself, unjoined (a large body is not copied); `close()` and `write_eof()` send what is
held first; `abort()` drops it, as the transport would its own buffer. The transport's flow
control is unchanged: uvicorn's `FlowControl` watches the real transport, which sees every byte
within the iteration it was written in.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from portcullis.gateway.deadlines import HEADER_READ_TIMEOUT, with_header_deadline

HOLD_LIMIT = 64 * 1024
"""Bytes a write may be and still be held to join the next; a larger one is sent as it is."""


class OneWritePerStep:
    """A transport that joins what is written to it in one loop iteration into one write.

    The rest of `asyncio.Transport` is passed through (spelled out: a `__getattr__` fallback would
    slow every attribute lookup on the object); a method that ends or hands over the connection
    sends what is held first.
    """

    __slots__ = ("_transport", "_loop", "_held", "_held_bytes")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []
        self._held_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if len(data) >= HOLD_LIMIT:
            self.flush()
            self._transport.write(data)
            return
        held = self._held
        if not held:
            self._loop.call_soon(self.flush)
        held.append(bytes(data))
        self._held_bytes += len(data)
        if self._held_bytes >= HOLD_LIMIT:
            self.flush()

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        """Send what is held now (also run at the end of the iteration it was first held in)."""
        held = self._held
        if not held:
            return
        data = held[0] if len(held) == 1 else b"".join(held)
        held.clear()
        self._held_bytes = 0
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held.clear()
        self._held_bytes = 0
        self._transport.abort()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.flush()  # a protocol taking the connection over (an upgrade) writes after what was answered
        self._transport.set_protocol(protocol)

    def get_write_buffer_size(self) -> int:
        return self._held_bytes + self._transport.get_write_buffer_size()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()


def with_one_write_per_step(protocol_class: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    base: Any = protocol_class

    class OneWritePerStepProtocol(base):  # type: ignore[misc]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # uvicorn's FlowControl is made here from the real transport; its answers go through ours.
            super().connection_made(transport)
            self.transport = OneWritePerStep(cast(asyncio.Transport, transport), self.loop)

    OneWritePerStepProtocol.__name__ = f"OneWritePerStep{protocol_class.__name__}"
    return OneWritePerStepProtocol


def http_protocol(seconds: float = HEADER_READ_TIMEOUT) -> type[asyncio.Protocol] | str:
    """uvicorn's httptools protocol with the header deadline and one write per answer.

    Plain "auto" where httptools is missing (uvicorn's own h11 path, neither of the two)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools ships with uvicorn[standard]
        return "auto"
    return with_one_write_per_step(with_header_deadline(HttpToolsProtocol, seconds))
