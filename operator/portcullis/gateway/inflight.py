"""Session-era calls in flight on this replica, so that a client's `notifications/cancelled` can stop one.

How a client cancels depends on its era. On 2026-07-28 it closes the call's
response stream; the disconnect cancels the call's handling here, which closes
the upstream request in turn (nothing to track). A 2025-11-25 client instead
sends `notifications/cancelled` naming the request id, as a separate POST, and
keeps the stream open. The gateway issues no session ids, so that notice is
matched by the session token that sent it and the request id it names: the
token is bound to one user and usually one agent run, and the id is unique
within a client session. When two calls in flight share both (one token used
by two client sessions at once), the notice is ambiguous and cancels neither.

The notice reaches this replica only if the load balancer sent it here; on
another replica it finds nothing and is dropped, as the protocol allows for a
request that is unknown or already finished. The upstream hears of a
cancellation the way its own era says (`upstream.py`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import anyio

log = logging.getLogger("portcullis.gateway")


class InFlight:
    def __init__(self) -> None:
        self._calls: dict[tuple[str, str], list[anyio.CancelScope]] = {}

    @contextlib.contextmanager
    def track(self, jti: str, request_id: str | int | None) -> Iterator[anyio.CancelScope]:
        """Run the block in a cancel scope that `cancel(jti, request_id)` can cancel."""
        scope = anyio.CancelScope()
        if request_id is None:
            with scope:
                yield scope
            return
        key = (jti, _key(request_id))
        self._calls.setdefault(key, []).append(scope)
        try:
            with scope:
                yield scope
        finally:
            scopes = self._calls[key]
            scopes.remove(scope)
            if not scopes:
                del self._calls[key]

    def cancel(self, jti: str, request_id: str | int) -> bool:
        """Cancel the call the notice names; False when there is none here, or more than one."""
        scopes = self._calls.get((jti, _key(request_id)), [])
        if len(scopes) > 1:
            log.info("a notifications/cancelled names request %r, which two calls of one token share: cancelling neither", request_id)
        if len(scopes) != 1:
            return False
        scopes[0].cancel()
        return True

    def __len__(self) -> int:
        return sum(len(scopes) for scopes in self._calls.values())


def _key(request_id: str | int) -> str:
    # JSON-RPC ids 1 and "1" are different ids.
    return f"{type(request_id).__name__}:{request_id}"
