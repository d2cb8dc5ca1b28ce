"""Connected accounts: the connect flow, and keeping each user's access token fresh.

    authorize(U, C)   a connect link: the authorization URL (PKCE S256, RFC 8707 resource, a
                      state naming U and C plus a random id) and the redirect URI; the pending
                      flow (verifier, client) is kept in U's vault record for C
    callback(query)   the browser comes back: the state's id must be pending in the record of
                      the user and connection it names (single use, `FLOW_SECONDS`), then the
                      code is exchanged and the grant sealed in that record
    access_token      at call time: the stored access token, refreshed first when due
    rejected          the upstream refused a token (401): refresh once, unless another holder
                      already did

Every rewrite of a record (a flow started or finished, a refresh) happens while holding the
vault's `exclusive` lock for it, and re-reads the record first, so replicas take turns: one
refresh per grant however many calls or replicas find it due, and a refresh token is never
spent twice. A grant the authorization server refuses to refresh is dropped (`lost`): the user
must reconnect, and minting names the connection as missing.

The client is pre-registered (`oauth.clientId`) or registered dynamically once per connection
and redirect URI; dynamic registrations are kept in the vault under `CLIENT_RECORD_USER`, a user
id no application can use (user ids have no surrounding spaces).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from portcullis.api.config import ConnectionConfig, GatewayConfig
from portcullis.api.resources import OAuthSpec, SecretKeyReference
from portcullis.gateway import jsonwire
from portcullis.gateway.oauth.record import FLOW_SECONDS, Grant, Pending, Record, loads
from portcullis.gateway.oauth.server import AuthorizationServers, Client, Endpoints, OAuthFailure, Refused, Unreachable
from portcullis.vault.base import Vault

log = logging.getLogger("portcullis.oauth")

CLIENT_RECORD_USER = " oauth-clients"
MAX_CLIENTS = 8
CALLBACK_PATH = "/oauth/callback"

SecretResolver = Callable[[str, SecretKeyReference], Awaitable[str | None]]


class NotConnected(Exception):
    """No usable grant: never connected, or lost (`reason` says why; the user must reconnect)."""

    def __init__(self, connection: str, reason: str | None = None):
        self.connection, self.reason = connection, reason
        super().__init__(f"{connection}: " + (reason or "not connected"))


class Unavailable(Exception):
    """The authorization server (or its metadata) cannot be used right now; safe text."""

    def __init__(self, connection: str, message: str):
        self.connection = connection
        super().__init__(message)


class FlowError(Exception):
    """A connect link cannot be made; the message says what to fix."""

    def __init__(self, status: int, error: str, message: str):
        self.status, self.error = status, error
        super().__init__(message)


@dataclass(frozen=True)
class Link:
    authorization_url: str
    redirect_uri: str
    expires_at: float


@dataclass(frozen=True)
class Outcome:
    """What the callback page says; `connected` only when a grant was stored."""

    status: int
    title: str
    message: str
    connected: bool = False


@dataclass(frozen=True)
class _Stored(Client):
    redirect_uri: str = ""
    issuer: str | None = None


class OAuthConnections:
    def __init__(self, config: Callable[[], GatewayConfig], vault: Vault, secrets_of: SecretResolver | None) -> None:
        self._config = config
        self._vault = vault
        self._secrets = secrets_of
        self.servers = AuthorizationServers()

    async def close(self) -> None:
        await self.servers.close()

    # --- the connect flow --------------------------------------------------------------

    async def authorize(self, user: str, connection: str) -> Link:
        conn, spec = self._oauth(connection)
        redirect_uri = self._config().server.callback_url
        if redirect_uri is None:
            raise FlowError(
                409, "no_callback_url",
                "this server has no spec.connectedAccounts.callbackURL: set it to the URL where users' browsers reach "
                "the gateway's connect port, then ask again",
            )
        endpoints = await self._endpoints(conn, spec)
        client = await self._client(conn, spec, endpoints, redirect_uri)
        verifier = secrets.token_urlsafe(48)
        state_id = secrets.token_urlsafe(24)
        now = time.time()
        expires = now + FLOW_SECONDS
        async with self._vault.exclusive(self._tenant, user, connection):
            record = await self._read(user, connection) or Record()
            record.start(state_id, Pending(verifier, client.client_id, redirect_uri, expires), now)
            await self._write(user, connection, record)
        query = {
            "response_type": "code",
            "client_id": client.client_id,
            "redirect_uri": redirect_uri,
            "state": _state(user, connection, state_id),
            "code_challenge": _challenge(verifier),
            "code_challenge_method": "S256",
            "resource": _resource(conn, spec),
        }
        if spec.scopes:
            query["scope"] = " ".join(spec.scopes)
        separator = "&" if urllib.parse.urlsplit(endpoints.authorization).query else "?"
        return Link(endpoints.authorization + separator + urllib.parse.urlencode(query), redirect_uri, expires)

    async def callback(self, query: Mapping[str, str]) -> Outcome:
        parsed = _parse_state(query.get("state", ""))
        config = self._config()
        if parsed is None or parsed[1] not in config.connections or config.connections[parsed[1]].credential.oauth is None:
            return Outcome(400, "This link is not valid", "The connect link is damaged or was not made by this gateway. Ask for a new one.")
        user, connection, state_id = parsed
        async with self._vault.exclusive(self._tenant, user, connection):
            record = await self._read(user, connection) or Record()
            if state_id in record.used:
                return Outcome(400, "This link was already used", f"Each connect link works once. Ask for a new link to connect {connection}.")
            pending = record.consume(state_id)
            if pending is None:
                return Outcome(
                    400, "This link is not valid",
                    "This connect link was not made for this user and connection (or was forged). Ask for a new one.",
                )
            await self._write(user, connection, record)  # consumed, whatever happens next
            if pending.expires_at <= time.time():
                return Outcome(400, "This link has expired", f"Connect links are valid for {FLOW_SECONDS // 60} minutes. Ask for a new one.")
            error = query.get("error")
            if error == "access_denied":
                log.info("connect %s for a user: consent denied", connection)
                return Outcome(403, f"{connection} was not connected", "You declined at the authorization server; nothing was stored.")
            if error:
                return Outcome(400, f"{connection} was not connected", f"The authorization server answered {error[:80]!r}.")
            code = query.get("code")
            if not code:
                return Outcome(400, f"{connection} was not connected", "The authorization server sent no code back.")
            conn, spec = self._oauth(connection)
            try:
                endpoints = await self._endpoints(conn, spec)
                client = await self._client_by_id(conn, spec, endpoints, pending.client_id)
                grant = await self.servers.exchange(
                    endpoints, client, code=code, verifier=pending.verifier, redirect_uri=pending.redirect_uri, resource=_resource(conn, spec)
                )
            except Refused as exc:
                return Outcome(400, f"{connection} was not connected", f"The authorization server refused: {exc}. Ask for a new link.")
            except (OAuthFailure, Unavailable) as exc:
                return Outcome(502, f"{connection} was not connected", f"The authorization server could not be used: {exc}. Try again later.")
            record.grant, record.lost = grant, None
            await self._write(user, connection, record)
        log.info("connect %s: a user connected (scopes %r)", connection, grant.scope)
        return Outcome(200, f"Connected {connection}", f"{connection} is connected. You can close this window.", connected=True)

    # --- at call time --------------------------------------------------------------------

    async def access_token(self, user: str, connection: str) -> str:
        record = await self._read(user, connection)
        grant = record.grant if record else None
        if grant is None:
            raise NotConnected(connection, record.lost if record else None)
        if not grant.due():
            return grant.access_token
        return await self._refresh(user, connection, grant.access_token, force=False)

    async def rejected(self, user: str, connection: str, token: str) -> str:
        """The upstream refused `token`: a token to retry with (refreshed, or another holder's newer one)."""
        return await self._refresh(user, connection, token, force=True)

    async def lose(self, user: str, connection: str, reason: str) -> None:
        async with self._vault.exclusive(self._tenant, user, connection):
            record = await self._read(user, connection)
            if record is not None and record.grant is not None:
                record.lose(reason)
                await self._write(user, connection, record)

    async def _refresh(self, user: str, connection: str, seen: str, *, force: bool) -> str:
        async with self._vault.exclusive(self._tenant, user, connection):
            record = await self._read(user, connection)
            grant = record.grant if record else None
            if record is None or grant is None:
                raise NotConnected(connection, record.lost if record else None)
            if grant.access_token != seen and not grant.due():
                return grant.access_token  # refreshed by another holder while this one waited
            if not force and not grant.due():
                return grant.access_token
            if grant.refresh_token is None:
                if force or grant.expired():
                    record.lose("the access token expired and the server issued no refresh token")
                    await self._write(user, connection, record)
                    raise NotConnected(connection, record.lost)
                return grant.access_token
            conn, spec = self._oauth(connection)
            try:
                endpoints = await self._endpoints(conn, spec)
                client = await self._client_by_id(conn, spec, endpoints, grant.client_id)
                fresh = await self.servers.refresh(endpoints, client, grant, _resource(conn, spec))
            except Refused as exc:
                log.warning("refresh of a %s grant refused (%s): the user must reconnect", connection, exc.error)
                record.lose(f"the authorization server refused to refresh it ({exc.error})")
                await self._write(user, connection, record)
                raise NotConnected(connection, record.lost) from None
            except (OAuthFailure, Unavailable) as exc:
                if not force and not grant.expired():
                    log.warning("refresh of a %s grant failed (%s); using the current token", connection, exc)
                    return grant.access_token
                raise Unavailable(connection, f"cannot refresh the {connection} token right now ({exc})") from None
            record.grant = fresh
            await self._write(user, connection, record)
            return fresh.access_token

    # --- what a user has ------------------------------------------------------------------

    async def describe(self, user: str, connection: str) -> dict[str, Any]:
        """Connected or not, the scopes, when obtained and refreshed; never a token."""
        record = await self._read(user, connection)
        grant = record.grant if record else None
        return {
            "connected": grant is not None,
            "scopes": grant.scope.split() if grant else [],
            "connectedAt": _iso(grant.obtained_at) if grant else None,
            "refreshedAt": _iso(grant.refreshed_at) if grant and grant.refreshed_at else None,
            "expiresAt": _iso(grant.expires_at) if grant and grant.expires_at else None,
            "reconnect": record.lost if record and grant is None else None,
        }

    async def connected(self, user: str, connection: str) -> bool:
        record = await self._read(user, connection)
        return record is not None and record.grant is not None

    # --- helpers ---------------------------------------------------------------------------

    @property
    def _tenant(self) -> str:
        return self._config().tenant

    def _oauth(self, connection: str) -> tuple[ConnectionConfig, OAuthSpec]:
        conn = self._config().connections[connection]
        if conn.credential.oauth is None:
            raise FlowError(404, "not_oauth", f"connection {connection!r} does not use OAuth (credential.source is {conn.credential.source})")
        return conn, conn.credential.oauth

    async def _endpoints(self, conn: ConnectionConfig, spec: OAuthSpec) -> Endpoints:
        try:
            return await self.servers.endpoints(spec, _resource(conn, spec), conn.url)
        except OAuthFailure as exc:
            raise Unavailable(conn.name, str(exc)) from None

    async def _read(self, user: str, connection: str) -> Record | None:
        text = await self._vault.get(self._tenant, user, connection)
        if text is None:
            return None
        record = loads(text)
        if record is None:
            return Record(lost="the stored credential is not an OAuth grant (stored as a static secret?)")
        return record

    async def _write(self, user: str, connection: str, record: Record) -> None:
        await self._vault.put(self._tenant, user, connection, record.dumps())

    async def _client(self, conn: ConnectionConfig, spec: OAuthSpec, endpoints: Endpoints, redirect_uri: str) -> Client:
        if spec.client_id is not None:
            return await self._preregistered(conn, spec, endpoints)
        found = next((c for c in await self._registered(conn.name) if c.redirect_uri == redirect_uri and c.issuer == endpoints.issuer), None)
        if found is not None:
            return found
        async with self._vault.exclusive(self._tenant, CLIENT_RECORD_USER, conn.name):
            clients = await self._registered(conn.name)  # another replica may have registered meanwhile
            found = next((c for c in clients if c.redirect_uri == redirect_uri and c.issuer == endpoints.issuer), None)
            if found is not None:
                return found
            try:
                client = await self.servers.register(endpoints, redirect_uri, f"Portcullis ({self._config().server.name})")
            except OAuthFailure as exc:
                raise Unavailable(conn.name, str(exc)) from None
            stored = _Stored(client.client_id, client.client_secret, client.auth_method, redirect_uri, endpoints.issuer)
            kept = [asdict(c) for c in [*clients, stored][-MAX_CLIENTS:]]
            await self._vault.put(self._tenant, CLIENT_RECORD_USER, conn.name, json.dumps({"clients": kept}))
            log.info("connect %s: registered OAuth client %s with %s", conn.name, client.client_id, endpoints.registration)
            return stored

    async def _client_by_id(self, conn: ConnectionConfig, spec: OAuthSpec, endpoints: Endpoints, client_id: str) -> Client:
        if spec.client_id is not None:
            return await self._preregistered(conn, spec, endpoints)
        for client in await self._registered(conn.name):
            if client.client_id == client_id:
                return client
        raise Unavailable(conn.name, "the OAuth client that obtained this grant is no longer registered; reconnect")

    async def _registered(self, connection: str) -> list[_Stored]:
        text = await self._vault.get(self._tenant, CLIENT_RECORD_USER, connection)
        try:
            return [_Stored(**c) for c in json.loads(text)["clients"]] if text else []
        except (ValueError, KeyError, TypeError):
            return []  # unreadable: register again

    async def _preregistered(self, conn: ConnectionConfig, spec: OAuthSpec, endpoints: Endpoints) -> Client:
        assert spec.client_id is not None
        if spec.client_secret_ref is None:
            return Client(spec.client_id, None, "none")
        secret = await self._secrets(self._config().server.namespace, spec.client_secret_ref) if self._secrets else None
        if secret is None:
            ref = spec.client_secret_ref
            raise Unavailable(conn.name, f"the client secret (Secret {ref.name}, key {ref.key}) cannot be read")
        method = "client_secret_post" if endpoints.auth_methods == ("client_secret_post",) else "client_secret_basic"
        return Client(spec.client_id, secret, method)


def _resource(conn: ConnectionConfig, spec: OAuthSpec) -> str:
    return spec.resource or conn.url


def _challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _state(user: str, connection: str, state_id: str) -> str:
    named = base64.urlsafe_b64encode(json.dumps([user, connection]).encode()).rstrip(b"=").decode("ascii")
    return f"{named}.{state_id}"


def _parse_state(state: str) -> tuple[str, str, str] | None:
    named, _, state_id = state.partition(".")
    if not named or not state_id or len(state) > 2048:
        return None
    try:
        user, connection = jsonwire.loads(base64.urlsafe_b64decode(named + "=" * (-len(named) % 4)))
    except (ValueError, binascii.Error, TypeError):
        return None
    if not isinstance(user, str) or not isinstance(connection, str) or not user or user != user.strip():
        return None
    return user, connection, state_id


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


__all__ = ["CALLBACK_PATH", "FlowError", "Grant", "Link", "NotConnected", "OAuthConnections", "Outcome", "Unavailable", "Unreachable"]
