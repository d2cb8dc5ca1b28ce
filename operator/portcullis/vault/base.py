"""The one small interface every credential store satisfies, and an in-memory store for tests.

A store holds sealed values only; it unseals at call time on every ``get`` so a credential's
plaintext lives no longer than the call that uses it. ``get`` returns None when the user has
not connected the connection, and raises ``SealError`` when a stored value does not open (a
moved or altered value is an incident, not an absence).

``exclusive`` is the one coordination a store offers: while it is held for (tenant, user,
connection), no other holder in any process or replica sharing the store gets it. OAuth grants
need it: refresh tokens rotate, so two replicas refreshing one grant at once would spend the
same refresh token twice, and the authorization server refuses the second (or revokes both).
A holder that dies keeps it at most ``LOCK_HOLD_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from portcullis.vault.sealing import new_key, seal, unseal


class Vault(Protocol):
    """Per-(tenant, user, connection) credentials."""

    async def get(self, tenant: str, user: str, connection: str) -> str | None:
        """The credential in plaintext, or None when the user has not connected it."""
        ...

    async def put(self, tenant: str, user: str, connection: str, secret: str) -> None:
        """Store (or replace) a credential."""
        ...

    async def delete(self, tenant: str, user: str, connection: str) -> bool:
        """Remove a credential; False when there was none."""
        ...

    async def connections_of(self, tenant: str, user: str) -> list[str]:
        """The connections this user has a credential for, sorted."""
        ...

    def exclusive(self, tenant: str, user: str, connection: str) -> AbstractAsyncContextManager[None]:
        """Hold the one right to rewrite this credential; waits up to ``LOCK_WAIT_SECONDS``, else ``LockTimeout``."""
        ...


LOCK_WAIT_SECONDS = 15.0
"""How long `exclusive` waits for another holder (a refresh is one token request)."""
LOCK_HOLD_SECONDS = 30.0
"""How long a holder that never lets go (a killed replica) keeps the lock."""
LOCK_POLL_SECONDS = 0.05


class LockTimeout(Exception):
    """Another holder kept a credential's lock longer than `LOCK_WAIT_SECONDS`."""


@dataclass
class _Waiters:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    count: int = 0


class KeyedLocks:
    """One asyncio lock per key, for holders in this process; an entry lives while someone holds or waits."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, ...], _Waiters] = {}

    @contextlib.asynccontextmanager
    async def held(self, *key: str) -> AsyncIterator[None]:
        entry = self._locks.setdefault(key, _Waiters())
        entry.count += 1
        try:
            try:
                async with asyncio.timeout(LOCK_WAIT_SECONDS):
                    await entry.lock.acquire()
            except TimeoutError:
                raise LockTimeout(f"the credential for {key[-1]!r} is being rewritten elsewhere; try again") from None
            try:
                yield
            finally:
                entry.lock.release()
        finally:
            entry.count -= 1
            if entry.count == 0:
                del self._locks[key]


class MemoryVault:
    """A process-local store for tests; it still seals, so tests exercise the real sealing."""

    def __init__(self) -> None:
        self._locks = KeyedLocks()
        self._keys: dict[str, bytes] = {}
        # tenant -> user -> connection -> sealed
        self._sealed: dict[str, dict[str, dict[str, str]]] = {}

    def _key(self, tenant: str) -> bytes:
        return self._keys.setdefault(tenant, new_key())

    async def get(self, tenant: str, user: str, connection: str) -> str | None:
        sealed = self._sealed.get(tenant, {}).get(user, {}).get(connection)
        if sealed is None:
            return None
        return unseal(self._key(tenant), sealed, tenant=tenant, user=user, connection=connection)

    async def put(self, tenant: str, user: str, connection: str, secret: str) -> None:
        sealed = seal(self._key(tenant), secret, tenant=tenant, user=user, connection=connection)
        self._sealed.setdefault(tenant, {}).setdefault(user, {})[connection] = sealed

    async def delete(self, tenant: str, user: str, connection: str) -> bool:
        per_user = self._sealed.get(tenant, {}).get(user, {})
        return per_user.pop(connection, None) is not None

    async def connections_of(self, tenant: str, user: str) -> list[str]:
        return sorted(self._sealed.get(tenant, {}).get(user, {}))

    def exclusive(self, tenant: str, user: str, connection: str) -> AbstractAsyncContextManager[None]:
        return self._locks.held(tenant, user, connection)
