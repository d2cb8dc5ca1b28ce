"""The HTTP side of OAuth: finding an upstream's authorization server, and its token requests.

Discovery follows the MCP authorization spec. Unless the connection names its endpoints:

1. the upstream's RFC 9728 protected-resource metadata (path-inserted well-known URL, then the
   root one) names the authorization server, unless `oauth.issuer` does;
2. the server's RFC 8414 metadata (then OpenID Connect discovery) names its endpoints. The
   metadata's `issuer` must be the one asked for, and it must offer PKCE with S256 (the MCP
   spec: a client refuses a server that does not say so).

Token requests are RFC 6749 form posts with the RFC 8707 `resource`, client authentication as
the client was registered (`none`, `client_secret_basic` or `client_secret_post`), and dynamic
registration is RFC 7591. Answers are parsed into what the caller needs; error answers become
`Refused` (the server said no: `invalid_grant` and friends) or `Unreachable` (no usable answer:
try later). No message carries a token, a code or a client secret.
"""

from __future__ import annotations

import base64
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import aiohttp

from portcullis.api.resources import OAuthSpec
from portcullis.gateway import jsonwire
from portcullis.gateway.oauth.record import Grant

TIMEOUT = aiohttp.ClientTimeout(total=10)
MAX_ANSWER_BYTES = 256 * 1024
DISCOVERY_SECONDS = 3600.0
"""How long discovered metadata is reused before it is fetched again."""


class OAuthFailure(Exception):
    """Safe to show: names the step and the server's error code, never a token."""


class Refused(OAuthFailure):
    """The authorization server answered with an OAuth error (RFC 6749 5.2)."""

    def __init__(self, step: str, error: str, description: str | None = None):
        self.error = error
        super().__init__(f"{step} refused: {error}" + (f" ({description[:200]})" if description else ""))


class Unreachable(OAuthFailure):
    """No usable answer (transport failure, 5xx, not JSON): worth trying again later."""


@dataclass(frozen=True)
class Endpoints:
    issuer: str | None
    authorization: str
    token: str
    registration: str | None = None
    auth_methods: tuple[str, ...] = ("client_secret_basic",)
    """token_endpoint_auth_methods_supported (RFC 8414's default when absent)."""


@dataclass(frozen=True)
class Client:
    client_id: str
    client_secret: str | None
    auth_method: str
    """none, client_secret_basic or client_secret_post."""


class AuthorizationServers:
    """One HTTP session for every OAuth request of a gateway, and the discovery cache."""

    def __init__(self) -> None:
        self._http: aiohttp.ClientSession | None = None
        self._found: dict[tuple[str, str], tuple[float, Endpoints]] = {}

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=TIMEOUT, headers={"accept": "application/json"})
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    # --- discovery ------------------------------------------------------------------

    async def endpoints(self, spec: OAuthSpec, resource: str, upstream_url: str) -> Endpoints:
        if spec.authorization_endpoint is not None and spec.token_endpoint is not None:
            return Endpoints(spec.issuer, spec.authorization_endpoint, spec.token_endpoint)
        cache_key = (spec.issuer or "", upstream_url)
        cached = self._found.get(cache_key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        issuer = spec.issuer or await self._issuer_of(upstream_url, resource)
        found = await self._server_metadata(issuer)
        self._found[cache_key] = (time.monotonic() + DISCOVERY_SECONDS, found)
        return found

    async def _issuer_of(self, upstream_url: str, resource: str) -> str:
        """RFC 9728: the first authorization server the upstream's metadata names."""
        for url in well_known(upstream_url, "oauth-protected-resource"):
            metadata = await self._metadata(url)
            if metadata is None:
                continue
            named = metadata.get("resource")
            if isinstance(named, str) and named.rstrip("/") != resource.rstrip("/"):
                raise OAuthFailure(f"the upstream's protected-resource metadata is for {named!r}, not {resource!r}")
            servers = metadata.get("authorization_servers")
            if isinstance(servers, list) and servers and isinstance(servers[0], str):
                return servers[0]
            raise OAuthFailure("the upstream's protected-resource metadata names no authorization server; set oauth.issuer")
        raise OAuthFailure(
            f"no protected-resource metadata (RFC 9728) at {well_known(upstream_url, 'oauth-protected-resource')[0]}; "
            "set oauth.issuer or the endpoints on the MCPConnection"
        )

    async def _server_metadata(self, issuer: str) -> Endpoints:
        for url in [*well_known(issuer, "oauth-authorization-server"), *well_known(issuer, "openid-configuration", oidc=True)]:
            metadata = await self._metadata(url)
            if metadata is None:
                continue
            if str(metadata.get("issuer", "")).rstrip("/") != issuer.rstrip("/"):
                raise OAuthFailure(f"the metadata at {url} is for issuer {metadata.get('issuer')!r}, not {issuer!r}")
            if "S256" not in (metadata.get("code_challenge_methods_supported") or []):
                raise OAuthFailure(f"the authorization server {issuer} does not offer PKCE with S256; it cannot be used")
            authorization, token = metadata.get("authorization_endpoint"), metadata.get("token_endpoint")
            if not isinstance(authorization, str) or not isinstance(token, str):
                raise OAuthFailure(f"the metadata at {url} names no authorization or token endpoint")
            registration = metadata.get("registration_endpoint")
            methods = metadata.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
            return Endpoints(
                issuer, authorization, token, registration if isinstance(registration, str) else None, tuple(map(str, methods))
            )
        raise OAuthFailure(f"no authorization server metadata (RFC 8414 or OpenID Connect) for issuer {issuer}")

    async def _metadata(self, url: str) -> dict[str, Any] | None:
        """A metadata document, or None where there is none (404 and other client errors)."""
        try:
            async with self._session().get(url) as response:
                if 400 <= response.status < 500:
                    return None
                body = await _json(response, f"metadata at {url}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unreachable(f"cannot read {url} ({type(exc).__name__})") from None
        return body

    # --- registration and tokens ----------------------------------------------------------

    async def register(self, endpoints: Endpoints, redirect_uri: str, name: str) -> Client:
        """RFC 7591: a client of our own, public when the server allows it."""
        if endpoints.registration is None:
            raise OAuthFailure("the authorization server offers no dynamic client registration; set oauth.clientId")
        method = "none" if "none" in endpoints.auth_methods else next(
            (m for m in ("client_secret_basic", "client_secret_post") if m in endpoints.auth_methods), "client_secret_basic"
        )
        body = {
            "client_name": name,
            "redirect_uris": [redirect_uri],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": method,
        }
        try:
            async with self._session().post(endpoints.registration, json=body) as response:
                answer = await _json(response, "client registration")
                if response.status >= 400:
                    raise Refused("client registration", str(answer.get("error", f"HTTP {response.status}")), answer.get("error_description"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unreachable(f"client registration failed ({type(exc).__name__})") from None
        client_id = answer.get("client_id")
        if not isinstance(client_id, str) or not client_id:
            raise Unreachable("client registration answered no client_id")
        secret = answer.get("client_secret")
        return Client(client_id, secret if isinstance(secret, str) else None, str(answer.get("token_endpoint_auth_method", method)))

    async def exchange(self, endpoints: Endpoints, client: Client, *, code: str, verifier: str, redirect_uri: str, resource: str) -> Grant:
        form = {"grant_type": "authorization_code", "code": code, "code_verifier": verifier, "redirect_uri": redirect_uri, "resource": resource}
        return await self._token("code exchange", endpoints, client, form, None)

    async def refresh(self, endpoints: Endpoints, client: Client, grant: Grant, resource: str) -> Grant:
        assert grant.refresh_token is not None
        form = {"grant_type": "refresh_token", "refresh_token": grant.refresh_token, "resource": resource}
        return await self._token("refresh", endpoints, client, form, grant)

    async def _token(self, step: str, endpoints: Endpoints, client: Client, form: dict[str, str], old: Grant | None) -> Grant:
        headers: dict[str, str] = {}
        form = dict(form)
        if client.auth_method == "client_secret_basic" and client.client_secret is not None:
            headers["authorization"] = basic_auth(client.client_id, client.client_secret)
        else:
            form["client_id"] = client.client_id
            if client.auth_method == "client_secret_post" and client.client_secret is not None:
                form["client_secret"] = client.client_secret
        now = time.time()
        try:
            async with self._session().post(endpoints.token, data=form, headers=headers) as response:
                answer = await _json(response, step)
                if response.status >= 500:
                    raise Unreachable(f"{step}: HTTP {response.status} from the authorization server")
                if response.status >= 400 or "error" in answer:
                    raise Refused(step, str(answer.get("error", f"HTTP {response.status}")), answer.get("error_description"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unreachable(f"{step} failed ({type(exc).__name__})") from None
        access = answer.get("access_token")
        if not isinstance(access, str) or not access:
            raise Unreachable(f"{step}: the answer has no access_token")
        expires_in = answer.get("expires_in")
        refresh = answer.get("refresh_token")
        return Grant(
            access_token=access,
            # A server that does not rotate keeps the refresh token it issued (RFC 6749 6).
            refresh_token=refresh if isinstance(refresh, str) else (old.refresh_token if old else None),
            expires_at=now + float(expires_in) if isinstance(expires_in, (int, float)) and expires_in > 0 else None,
            scope=str(answer.get("scope") or (old.scope if old else "")),
            client_id=client.client_id,
            obtained_at=old.obtained_at if old else now,
            refreshed_at=now if old else None,
        )


def basic_auth(client_id: str, secret: str) -> str:
    """The Authorization header of `client_secret_basic` (RFC 6749 2.3.1: each part form-encoded first)."""
    pair = f"{urllib.parse.quote(client_id, safe='')}:{urllib.parse.quote(secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")


async def _json(response: aiohttp.ClientResponse, what: str) -> dict[str, Any]:
    raw = await response.content.read(MAX_ANSWER_BYTES + 1)
    if len(raw) > MAX_ANSWER_BYTES:
        raise Unreachable(f"{what}: the answer is larger than {MAX_ANSWER_BYTES} bytes")
    try:
        body = jsonwire.loads(raw)
    except ValueError:
        raise Unreachable(f"{what}: HTTP {response.status}, not JSON") from None
    if not isinstance(body, dict):
        raise Unreachable(f"{what}: HTTP {response.status}, not a JSON object")
    return body


def well_known(url: str, name: str, *, oidc: bool = False) -> list[str]:
    """RFC 8615 well-known URLs for `url`: path-inserted first (RFC 8414 3.1, RFC 9728 3.1), then
    appended (OpenID Connect Discovery 4), then at the root."""
    parts = urllib.parse.urlsplit(url)
    base = f"{parts.scheme}://{parts.netloc}"
    path = parts.path.rstrip("/")
    urls = [f"{base}/.well-known/{name}{path}"] if path else []
    if oidc and path:
        urls.append(f"{base}{path}/.well-known/{name}")
    urls.append(f"{base}/.well-known/{name}")
    return list(dict.fromkeys(urls))
