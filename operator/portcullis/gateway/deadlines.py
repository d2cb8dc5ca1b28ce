"""A deadline for a request's headers, on both ports.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`), but nothing bounds how
long a client may take to send a request's headers: a connection that sends a request line
and stops, or nothing at all, is held until the client goes away. A few hundred of those
(slowloris) hold file descriptors and memory for as long as the attacker likes.

`with_header_deadline(protocol_class, seconds)` returns uvicorn's HTTP protocol with one
timer per connection: armed when the connection opens and when each request begins, cancelled
when that request's headers are complete. If it fires, the connection is closed. Bodies are
bounded separately (the endpoint's body limit), and a request whose headers arrived is the
app's to time.
"""

from __future__ import annotations

import asyncio
from typing import Any

HEADER_READ_TIMEOUT = 10.0
"""Seconds a client has to send a complete request head after connecting or after its last answer."""


def with_header_deadline(protocol_class: type[asyncio.Protocol], seconds: float) -> type[asyncio.Protocol]:
    base: Any = protocol_class

    class HeaderDeadlineProtocol(base):  # type: ignore[misc]
        _deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.close()

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    HeaderDeadlineProtocol.__name__ = f"HeaderDeadline{protocol_class.__name__}"
    return HeaderDeadlineProtocol

