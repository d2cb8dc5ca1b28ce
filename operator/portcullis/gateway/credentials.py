"""The resolve step: the header a user's call to one connection carries, read at call time.

    source: none    no header
    source: shared  one Secret for every user (`secretRef`)
    source: user    the user's own sealed credential from the tenant's vault

Failures are named, so the call path can answer each one clearly and audit it: a user who
has not connected (`MissingCredential`), a sealed value that does not open
(`UnreadableCredential`: it was moved, altered, or the tenant key changed; the user must
store it again), and a vault that cannot be read right now (`VaultUnavailable`). No
message carries a credential or a sealed value.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from portcullis.api.config import GatewayConfig
from portcullis.api.resources import SecretKeyReference
from portcullis.vault.base import Vault
from portcullis.vault.sealing import SealError

log = logging.getLogger("portcullis.gateway")

SecretResolver = Callable[[str, SecretKeyReference], Awaitable[str | None]]
"""(namespace, secretRef) -> the shared credential, for connections with `source: shared`."""


class CredentialError(Exception):
    def __init__(self, connection: str, message: str):
        super().__init__(message)
        self.connection = connection


class MissingCredential(CredentialError):
    def __init__(self, connection: str):
        super().__init__(connection, f"no credential for connection {connection!r}")


class UnreadableCredential(CredentialError):
    def __init__(self, connection: str):
        super().__init__(connection, f"the stored credential for connection {connection!r} does not open")


class VaultUnavailable(CredentialError):
    def __init__(self, connection: str, cause: str):
        super().__init__(connection, f"the credential store could not be read ({cause})")


class Credentials:
    def __init__(self, config: Callable[[], GatewayConfig], vault: Vault, secrets: SecretResolver | None = None):
        self._config = config
        self.vault = vault
        self._secrets = secrets

    async def headers(self, user: str, connection: str) -> dict[str, str] | None:
        """The headers for `user`'s call to `connection` (None for `source: none`)."""
        config = self._config()
        spec = config.connections[connection].credential
        if spec.source == "none":
            return None
        if spec.source == "shared":
            shared = await self.shared(connection)
            if shared is None:
                raise MissingCredential(connection)
            return shared
        secret = await self._user_secret(config.tenant, user, connection)
        if secret is None:
            raise MissingCredential(connection)
        return {spec.header: spec.header_value(secret)}

    async def headers_or_none(self, user: str, connection: str) -> dict[str, str] | None:
        """For listings, which work without a credential too: any failure reads as none."""
        try:
            return await self.headers(user, connection)
        except CredentialError:
            return None

    async def shared(self, connection: str) -> dict[str, str] | None:
        config = self._config()
        spec = config.connections[connection].credential
        if spec.secret_ref is None or self._secrets is None:
            return None
        secret = await self._secrets(config.server.namespace, spec.secret_ref)
        return None if secret is None else {spec.header: spec.header_value(secret)}

    async def _user_secret(self, tenant: str, user: str, connection: str) -> str | None:
        try:
            return await self.vault.get(tenant, user, connection)
        except SealError:
            raise UnreadableCredential(connection) from None
        except Exception as exc:  # an API or disk failure: name its kind, never its text
            log.warning("vault read for connection %s failed: %s", connection, type(exc).__name__)
            raise VaultUnavailable(connection, type(exc).__name__) from None

    async def missing(self, user: str) -> tuple[list[str], list[str]]:
        """(connections not connected, connections whose stored credential does not open) for `user`."""
        config = self._config()
        missing, unreadable = [], []
        for connection in config.user_connections():
            try:
                if await self._user_secret(config.tenant, user, connection) is None:
                    missing.append(connection)
            except UnreadableCredential:
                unreadable.append(connection)
        return missing, unreadable
