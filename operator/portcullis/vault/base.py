"""The one small interface every credential store satisfies, and an in-memory store for tests.

A store holds sealed values; ``get`` returns a credential in plaintext, None when the user has
not connected the connection, and raises ``SealError`` when a stored value does not open (a
moved or altered value is an incident, not an absence).

Opened credentials are kept in memory (`Plaintexts`), each only as long as the sealed value it
was opened from is unchanged: every ``get`` still reads the sealed value from its source (the
file, the watch-fed copy of the Secret, the dict) and compares it with the one it opened last
time; equal, the plaintext is returned without unsealing again; any difference, a delete, or a
different tenant key drops the entry and opens afresh. So a changed credential is served new at
the next ``get``, and a deleted one is refused as soon as the store sees the deletion. Unsealing
(AES-256-GCM) once per change instead of once per call takes most of the store's cost off the
call path. The cache is bounded (`PLAINTEXT_ENTRIES`); a plaintext is dropped from it at the
latest when it is the oldest entry of a full cache. docs/security.md says what that means for
a process memory dump.

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
PLAINTEXT_ENTRIES = 10_000
"""How many opened credentials a store keeps at most (the oldest goes first)."""


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


Where = tuple[str, str, str]
"""(tenant, user, connection)."""


class Plaintexts:
    """Opened credentials, each valid only while the sealed value and the key it came from are unchanged.

    ``opened(where, key, sealed)`` answers the plaintext kept for exactly this sealed value under
    exactly this key, or None (then the caller unseals and calls ``keep``). Nothing is kept for a
    value that did not open. The bound evicts the oldest entry; the sealed values are compared
    whole, so any change of the stored bytes (a new nonce on every seal) is a miss.
    """

    def __init__(self, capacity: int = PLAINTEXT_ENTRIES) -> None:
        self._capacity = capacity
        self._entries: dict[Where, tuple[bytes, str, str]] = {}

    def opened(self, where: Where, key: bytes, sealed: str) -> str | None:
        entry = self._entries.get(where)
        if entry is None:
            return None
        if entry[1] == sealed and entry[0] == key:
            return entry[2]
        del self._entries[where]  # changed (or a new key): the old plaintext goes at once
        return None

    def keep(self, where: Where, key: bytes, sealed: str, plaintext: str) -> None:
        entries = self._entries
        entries.pop(where, None)
        while len(entries) >= self._capacity:
            del entries[next(iter(entries))]  # the oldest (dicts keep insertion order)
        entries[where] = (key, sealed, plaintext)

    def forget(self, where: Where) -> None:
        self._entries.pop(where, None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def open(self, where: Where, key: bytes, sealed: str) -> str:
        """The plaintext of `sealed`, unsealed only if it is not the value opened last time."""
        plaintext = self.opened(where, key, sealed)
        if plaintext is None:
            tenant, user, connection = where
            plaintext = unseal(key, sealed, tenant=tenant, user=user, connection=connection)
            self.keep(where, key, sealed, plaintext)
        return plaintext


class MemoryVault:
    """A process-local store for tests; it still seals, so tests exercise the real sealing."""

    def __init__(self) -> None:
        self._locks = KeyedLocks()
        self._keys: dict[str, bytes] = {}
        # tenant -> user -> connection -> sealed
        self._sealed: dict[str, dict[str, dict[str, str]]] = {}
        self._plain = Plaintexts()

    def _key(self, tenant: str) -> bytes:
        return self._keys.setdefault(tenant, new_key())

    async def get(self, tenant: str, user: str, connection: str) -> str | None:
        sealed = self._sealed.get(tenant, {}).get(user, {}).get(connection)
        if sealed is None:
            self._plain.forget((tenant, user, connection))
            return None
        return self._plain.open((tenant, user, connection), self._key(tenant), sealed)

    async def put(self, tenant: str, user: str, connection: str, secret: str) -> None:
        sealed = seal(self._key(tenant), secret, tenant=tenant, user=user, connection=connection)
        self._sealed.setdefault(tenant, {}).setdefault(user, {})[connection] = sealed

    async def delete(self, tenant: str, user: str, connection: str) -> bool:
        per_user = self._sealed.get(tenant, {}).get(user, {})
        self._plain.forget((tenant, user, connection))
        return per_user.pop(connection, None) is not None

    async def connections_of(self, tenant: str, user: str) -> list[str]:
        return sorted(self._sealed.get(tenant, {}).get(user, {}))

    def exclusive(self, tenant: str, user: str, connection: str) -> AbstractAsyncContextManager[None]:
        return self._locks.held(tenant, user, connection)
