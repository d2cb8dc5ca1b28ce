"""A deadline for a request's headers, on both ports.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`), but nothing bounds how
long a client may take to send a request's headers: a connection that sends a request line
and stops, or nothing at all, is held until the client goes away. A few hundred of those
(slowloris) hold file descriptors and memory for as long as the attacker likes.

`with_header_deadline(protocol_class, seconds)` returns uvicorn's HTTP protocol with a deadline
per connection: set when the connection opens and when each request begins, cleared when that
request's headers are complete. If it passes first, the connection is closed. Bodies are
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
        # When the head being read must be complete (None: none is being read), and the one timer
        # that checks it. The timer is moved lazily: a request beginning only sets `_head_by`, and
        # a timer firing early re-arms itself for it. On a busy keep-alive connection that is one
        # timer per `seconds`, not a timer made and cancelled per request.
        _head_by: float | None = None
        _deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._head_by = self.loop.time() + seconds
            if self._deadline is None:
                self._deadline = self.loop.call_at(self._head_by, self._check)

        def _check(self) -> None:
            self._deadline = None
            head_by = self._head_by
            if head_by is None:  # the head arrived; the next request arms again
                return
            if head_by > self.loop.time():  # a later request began since the timer was armed
                self._deadline = self.loop.call_at(head_by, self._check)
                return
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
            self._head_by = None
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_by = None
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            super().connection_lost(exc)

    HeaderDeadlineProtocol.__name__ = f"HeaderDeadline{protocol_class.__name__}"
    return HeaderDeadlineProtocol
