"""The resolve step: the header a user's call to one connection carries, read at call time.

    source: none    no header
    source: shared  one Secret for every user (`secretRef`)
    source: user    the user's own sealed credential from the tenant's vault
    source: oauth   the user's own OAuth access token from the tenant's vault, refreshed
                    when due (oauth/flow.py); an upstream 401 gets one refresh (`rejected`)

Failures are named, so the call path can answer each one clearly and audit it: a user who
has not connected (`MissingCredential`; `Reconnect` when an OAuth grant was lost), a sealed
value that does not open (`UnreadableCredential`: it was moved, altered, or the tenant key
changed; the user must store it again), a vault that cannot be read right now
(`VaultUnavailable`) and an authorization server that cannot refresh right now
(`AuthorizationUnavailable`). No message carries a credential or a sealed value.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from portcullis.api.config import GatewayConfig
from portcullis.api.resources import SecretKeyReference
from portcullis.gateway.oauth.flow import NotConnected, OAuthConnections, Unavailable
from portcullis.vault.base import LockTimeout, Vault
from portcullis.vault.sealing import SealError

log = logging.getLogger("portcullis.gateway")

T = TypeVar("T")

SecretResolver = Callable[[str, SecretKeyReference], Awaitable[str | None]]
"""(namespace, secretRef) -> the shared credential, for connections with `source: shared`."""


class CredentialError(Exception):
    def __init__(self, connection: str, message: str):
        super().__init__(message)
        self.connection = connection


class MissingCredential(CredentialError):
    def __init__(self, connection: str):
        super().__init__(connection, f"no credential for connection {connection!r}")


class Reconnect(MissingCredential):
    """The user's OAuth grant was lost (refused at refresh, or by the upstream): connect again."""

    def __init__(self, connection: str, reason: str):
        CredentialError.__init__(self, connection, f"the {connection!r} grant can no longer be used ({reason})")
        self.reason = reason


class UnreadableCredential(CredentialError):
    def __init__(self, connection: str):
        super().__init__(connection, f"the stored credential for connection {connection!r} does not open")


class VaultUnavailable(CredentialError):
    def __init__(self, connection: str, cause: str):
        super().__init__(connection, f"the credential store could not be read ({cause})")


class AuthorizationUnavailable(CredentialError):
    """An OAuth token is due and the authorization server cannot refresh it right now."""


class Credentials:
    def __init__(self, config: Callable[[], GatewayConfig], vault: Vault, secrets: SecretResolver | None = None):
        self._config = config
        self.vault = vault
        self._secrets = secrets
        self.oauth = OAuthConnections(config, vault, secrets)

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
        if spec.source == "oauth":
            return {spec.header: spec.header_value(await self._oauth(self.oauth.access_token(user, connection), connection))}
        secret = await self._user_secret(config.tenant, user, connection)
        if secret is None:
            raise MissingCredential(connection)
        return {spec.header: spec.header_value(secret)}

    async def rejected(self, user: str, connection: str, sent: Mapping[str, str] | None) -> dict[str, str] | None:
        """The upstream answered 401 to `sent`: headers worth one retry, or None (nothing to renew).

        Only an OAuth grant can be renewed; a refresh refused by the authorization server
        raises `Reconnect`."""
        spec = self._config().connections[connection].credential
        if spec.source != "oauth" or not sent or spec.header not in sent:
            return None
        token = sent[spec.header].removeprefix(f"{spec.scheme} " if spec.scheme else "")
        return {spec.header: spec.header_value(await self._oauth(self.oauth.rejected(user, connection, token), connection))}

    async def refused_after_refresh(self, user: str, connection: str) -> Reconnect:
        """The upstream refused a freshly refreshed token too: drop the grant, so the user reconnects."""
        reason = "the upstream refused it even after a refresh"
        await self._oauth(self.oauth.lose(user, connection, reason), connection)
        return Reconnect(connection, reason)

    async def _oauth(self, step: Awaitable[T], connection: str) -> T:
        """Run one OAuth step, its failures named as the call path names credential failures."""
        try:
            return await step
        except NotConnected as exc:
            raise (Reconnect(connection, exc.reason) if exc.reason else MissingCredential(connection)) from None
        except Unavailable as exc:
            raise AuthorizationUnavailable(connection, str(exc)) from None
        except SealError:
            raise UnreadableCredential(connection) from None
        except LockTimeout as exc:
            raise VaultUnavailable(connection, str(exc)) from None
        except CredentialError:
            raise
        except Exception as exc:  # an API or disk failure: name its kind, never its text
            log.warning("OAuth credential for connection %s failed: %s", connection, type(exc).__name__)
            raise VaultUnavailable(connection, type(exc).__name__) from None

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
                if not await self._connected(config, user, connection):
                    missing.append(connection)
            except UnreadableCredential:
                unreadable.append(connection)
        return missing, unreadable

    async def _connected(self, config: GatewayConfig, user: str, connection: str) -> bool:
        """Has `user` a usable entry for `connection`: a static secret, or an OAuth grant not lost?"""
        if config.connections[connection].credential.source == "oauth":
            return await self._oauth(self.oauth.connected(user, connection), connection)
        return await self._user_secret(config.tenant, user, connection) is not None

    async def describe(self, user: str) -> list[dict[str, Any]]:
        """Per connection this server needs of `user`: connected or not, how, and (OAuth) scopes and
        refresh times. Never a credential."""
        config = self._config()
        described = []
        for connection in config.user_connections():
            source = config.connections[connection].credential.source
            entry: dict[str, Any] = {"connection": connection, "source": source}
            try:
                if source == "oauth":
                    entry.update(await self._oauth(self.oauth.describe(user, connection), connection))
                else:
                    entry["connected"] = await self._connected(config, user, connection)
            except UnreadableCredential:
                entry.update(connected=False, unreadable=True)
            described.append(entry)
        return described
