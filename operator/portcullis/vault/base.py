"""The one small interface every credential store satisfies, and an in-memory store for tests.

A store holds sealed values only; it unseals at call time on every ``get`` so a credential's
plaintext lives no longer than the call that uses it. ``get`` returns None when the user has
not connected the connection, and raises ``SealError`` when a stored value does not open (a
moved or altered value is an incident, not an absence).
"""

from __future__ import annotations

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


class MemoryVault:
    """A process-local store for tests; it still seals, so tests exercise the real sealing."""

    def __init__(self) -> None:
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
