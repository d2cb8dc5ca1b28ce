"""OpenID Connect access tokens: people sign in with the company's provider, not a minted token.

The gateway is an OAuth resource server here (the MCP authorization spec). Its RFC 9728
metadata names the issuer (endpoint.py). A client (Claude Desktop through mcp-remote, the
Inspector, the MCP SDK's OAuth client) gets an access token there for this server's URL and
presents it as a bearer token. `OIDCVerifier.verify` accepts a JWT access token when all of
these hold:

- it is signed (RS/PS/ES/EdDSA, never `none` or HMAC) by a key of the issuer's JWKS;
- `iss` is the configured issuer and `aud` names this server (RFC 8707: a token for another
  resource is refused);
- `exp`, and `nbf`/`iat` when present, are within `clockSkewSeconds`;
- the user claim names a usable user id;
- the required scopes are granted (`scope` or `scp`), and the required group is in the
  groups claim. Otherwise the answer is 403, with `insufficient_scope` for missing scopes.

With `introspection` configured, an opaque (non-JWT) token is checked at the provider's RFC 7662
endpoint instead: it must be `active`, for this audience and issuer, unexpired, with the same
scope, group and user checks. An answer is cached for `INTROSPECTION_CACHE_SECONDS` at most
(never past the token's `exp`), so a token revoked at the provider stops working within that.

The JWKS comes from the issuer's discovery document, found once and cached. It is fetched
again when a token names a `kid` the cached set lacks (the provider rotated its keys), at most
once per `REFETCH_SECONDS`, so a flood of tokens with made-up kids cannot make the gateway
hammer the provider. It is never fetched per request.

A verified token becomes the same `SessionClaims` a session token gives: the same allowlist,
vault user, audit and revocation (by user: tokens issued before the revocation are refused).
Its `jti` starts with `oidc-` (then the token's own jti, or a digest of the token when it has
none or one with other characters), so the audit log says which authentication was used, and
`POST /v1/revocations {"jti": ...}` revokes that one token. It carries no `tools` scope.
The token itself is never passed upstream and never logged.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import jwt

from portcullis.api.config import GatewayConfig, OIDCConfig
from portcullis.api.resources import SecretKeyReference
from portcullis.gateway import jsonwire
from portcullis.gateway.identity.tokens import SessionClaims, TokenError, jwt_refusals, unverified_header
from portcullis.gateway.oauth.server import basic_auth, well_known

ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
REFETCH_SECONDS = 10.0
JWKS_MAX_AGE_SECONDS = 3600.0
TIMEOUT = aiohttp.ClientTimeout(total=10)
MAX_DOCUMENT_BYTES = 512 * 1024
_VERIFIED_CACHE_SIZE = 10_000
JTI_PREFIX = "oidc-"
_SAFE_JTI = re.compile(r"[A-Za-z0-9_-]{1,190}")
INTROSPECTION_CACHE_SECONDS = 30.0

SecretResolver = Callable[[str, SecretKeyReference], Awaitable[str | None]]


class Forbidden(Exception):
    """An authentic token that may not use this server (403). `scope`: the scopes it lacks, if that is why."""

    def __init__(self, reason: str, scope: str | None = None):
        super().__init__(reason)
        self.reason, self.scope = reason, scope


class ProviderUnavailable(Exception):
    """The issuer's discovery document or JWKS cannot be read right now (503, try again)."""


class OIDCVerifier:
    def __init__(self, config: Callable[[], GatewayConfig], secrets: SecretResolver | None = None) -> None:
        self._config = config
        self._secrets = secrets
        self._metadata: dict[str, Any] | None = None
        self._introspected: dict[str, tuple[float, SessionClaims]] = {}
        self._http: aiohttp.ClientSession | None = None
        self._keys: dict[str, jwt.PyJWK] = {}
        self._keys_for: str | None = None
        """The issuer the cached keys belong to (a config change to another issuer drops them)."""
        self._fetched_at = 0.0
        self._fetch_lock = asyncio.Lock()
        self._verified: dict[str, SessionClaims] = {}

    @property
    def settings(self) -> OIDCConfig | None:
        return self._config().oidc

    def accepts(self, token: str) -> bool:
        """Is `token` meant for this verifier (a JWT whose unverified `iss` is the configured issuer)?"""
        oidc = self.settings
        if oidc is None:
            return False
        if token in self._verified:
            return True
        _, dot, rest = token.partition(".")
        body, dot2, _ = rest.partition(".")
        if not dot or not dot2:
            return oidc.introspection_client_id is not None  # opaque: only introspection can tell
        try:
            payload = jsonwire.loads(_b64decode(body))
        except ValueError:
            return False
        return isinstance(payload, dict) and payload.get("iss") == oidc.issuer

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def verify(self, token: str) -> SessionClaims:
        oidc = self.settings
        if oidc is None:
            raise TokenError("OpenID Connect is not enabled on this server")
        cached = self._verified.get(token)
        if cached is not None and cached.exp > time.time():
            return cached
        if token.count(".") != 2:
            return await self._introspect(oidc, token)
        header = unverified_header(token)
        algorithm = header.get("alg")
        if algorithm not in ALGORITHMS:
            raise TokenError("unsupported algorithm")
        kid = header.get("kid")
        key = await self._key(oidc, kid if isinstance(kid, str) else None)
        with jwt_refusals(wrong_audience="wrong audience: this token was issued for another resource"):
            payload = jwt.decode(
                token,
                key,
                algorithms=[str(algorithm)],
                audience=oidc.audience,
                issuer=oidc.issuer,
                leeway=oidc.clock_skew_seconds,
                options={"require": ["exp", "iss", "aud"]},
            )
        claims = self._claims(oidc, payload, token)
        if len(self._verified) >= _VERIFIED_CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = claims
        return claims

    def _claims(self, oidc: OIDCConfig, payload: dict[str, Any], token: str) -> SessionClaims:
        user = payload.get(oidc.user_claim)
        if not isinstance(user, str) or not user or user != user.strip() or any(ord(c) < 32 for c in user):
            raise TokenError(f"the token has no usable {oidc.user_claim!r} claim")
        granted = _scopes(payload)
        missing = [s for s in oidc.required_scopes if s not in granted]
        if missing:
            raise Forbidden(f"the token lacks the scope {' '.join(missing)}", scope=" ".join(oidc.required_scopes))
        if oidc.required_group is not None:
            groups = payload.get(oidc.groups_claim)
            if not isinstance(groups, list) or oidc.required_group not in groups:
                raise Forbidden(f"the user is not in the group {oidc.required_group!r}")
        issued = payload.get("iat")
        token_id = payload.get("jti")
        safe = isinstance(token_id, str) and _SAFE_JTI.fullmatch(token_id)
        jti = str(token_id) if safe else hashlib.sha256(token.encode()).hexdigest()[:32]
        aud = payload["aud"]
        return SessionClaims(
            iss=oidc.issuer,
            aud=oidc.audience if isinstance(aud, list) else str(aud),
            sub=user,
            tenant=self._config().tenant,
            exp=int(payload["exp"]),
            # No iat: treated as issued at the epoch, so any revocation of the user covers it.
            iat=float(issued) if isinstance(issued, (int, float)) else 0.0,
            jti=JTI_PREFIX + jti,
        )

    # --- opaque tokens ---------------------------------------------------------------------

    async def _introspect(self, oidc: OIDCConfig, token: str) -> SessionClaims:
        if oidc.introspection_client_id is None or oidc.introspection_secret is None:
            raise TokenError("malformed")
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.time()
        cached = self._introspected.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        metadata = await self._discovery(oidc)
        endpoint = metadata.get("introspection_endpoint")
        if not isinstance(endpoint, str):
            raise ProviderUnavailable(f"issuer {oidc.issuer} has no introspection_endpoint")
        ref = oidc.introspection_secret
        secret = await self._secrets(self._config().server.namespace, ref) if self._secrets else None
        if secret is None:
            raise ProviderUnavailable(f"the introspection client's secret (Secret {ref.name}, key {ref.key}) cannot be read")
        answer = await self._post(endpoint, {"token": token, "token_type_hint": "access_token"}, oidc.introspection_client_id, secret)
        if answer.get("active") is not True:
            raise TokenError("not active (revoked, expired or unknown at the provider)")
        if "iss" in answer and answer["iss"] != oidc.issuer:
            raise TokenError("wrong issuer")
        audiences = answer.get("aud")
        audiences = [audiences] if isinstance(audiences, str) else audiences if isinstance(audiences, list) else []
        if oidc.audience not in audiences:
            raise TokenError("wrong audience: this token was issued for another resource")
        expires = answer.get("exp")
        if not isinstance(expires, (int, float)):
            raise TokenError("the introspection answer has no exp")
        if expires + oidc.clock_skew_seconds <= now:
            raise TokenError("expired")
        claims = self._claims(oidc, {**answer, "aud": oidc.audience}, token)
        if len(self._introspected) >= _VERIFIED_CACHE_SIZE:
            self._introspected.clear()
        self._introspected[digest] = (min(now + INTROSPECTION_CACHE_SECONDS, float(expires)), claims)
        return claims

    async def _post(self, url: str, form: dict[str, str], client_id: str, secret: str) -> dict[str, Any]:
        headers = {"authorization": basic_auth(client_id, secret)}
        body = await self._json(self._session().post(url, data=form, headers=headers), "introspection", missing_ok=False)
        if body is None:
            raise ProviderUnavailable("introspection answered no JSON object")
        return body

    # --- keys -----------------------------------------------------------------------------

    async def _key(self, oidc: OIDCConfig, kid: str | None) -> jwt.PyJWK:
        if self._keys_for != oidc.issuer:
            self._keys, self._metadata, self._fetched_at = {}, None, 0.0
        key = self._pick(kid)
        stale = time.monotonic() - self._fetched_at > JWKS_MAX_AGE_SECONDS
        if key is not None and not stale:
            return key
        async with self._fetch_lock:
            key = self._pick(kid)
            if (key is None or stale) and time.monotonic() - self._fetched_at >= REFETCH_SECONDS:
                await self._fetch(oidc)
                key = self._pick(kid)
        if key is None:
            raise TokenError("unknown key")
        return key

    def _pick(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is not None:
            return self._keys.get(kid)
        return next(iter(self._keys.values())) if len(self._keys) == 1 else None

    async def _discovery(self, oidc: OIDCConfig) -> dict[str, Any]:
        """The issuer's discovery document (read again with every JWKS fetch)."""
        if self._metadata is not None and self._keys_for == oidc.issuer:
            return self._metadata
        metadata = None
        for url in [*well_known(oidc.issuer, "openid-configuration", oidc=True), *well_known(oidc.issuer, "oauth-authorization-server")]:
            metadata = await self._document(url, missing_ok=True)
            if metadata is not None:
                break
        if metadata is None:
            raise ProviderUnavailable(f"no discovery document for issuer {oidc.issuer}")
        if str(metadata.get("issuer", "")).rstrip("/") != oidc.issuer.rstrip("/"):
            raise ProviderUnavailable(f"the discovery document is for issuer {metadata.get('issuer')!r}, not {oidc.issuer!r}")
        self._metadata, self._keys_for = metadata, oidc.issuer
        return metadata

    async def _fetch(self, oidc: OIDCConfig) -> None:
        self._fetched_at = time.monotonic()
        self._metadata = None
        metadata = await self._discovery(oidc)
        if not isinstance(metadata.get("jwks_uri"), str):
            raise ProviderUnavailable(f"issuer {oidc.issuer} publishes no jwks_uri")
        jwks = await self._document(metadata["jwks_uri"], missing_ok=False)
        keys: dict[str, jwt.PyJWK] = {}
        for jwk in (jwks or {}).get("keys") or []:
            if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
                continue
            try:
                parsed = jwt.PyJWK(jwk)
            except (jwt.PyJWKError, jwt.InvalidKeyError):
                continue  # a key type this gateway cannot use: others may still do
            keys[str(jwk.get("kid", ""))] = parsed
        self._keys = keys

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=TIMEOUT, headers={"accept": "application/json"})
        return self._http

    async def _document(self, url: str, *, missing_ok: bool) -> dict[str, Any] | None:
        return await self._json(self._session().get(url), url, missing_ok=missing_ok)

    async def _json(self, request: Any, what: str, *, missing_ok: bool) -> dict[str, Any] | None:
        """The JSON object a provider answered (None: a client error with `missing_ok`, or not an
        object); `ProviderUnavailable` for anything unusable. Bounded to `MAX_DOCUMENT_BYTES`."""
        try:
            async with request as response:
                if missing_ok and 400 <= response.status < 500:
                    return None
                raw = await response.content.read(MAX_DOCUMENT_BYTES + 1)
                if response.status != 200 or len(raw) > MAX_DOCUMENT_BYTES:
                    raise ProviderUnavailable(f"{what} answered HTTP {response.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderUnavailable(f"cannot read {what} ({type(exc).__name__})") from None
        try:
            body = jsonwire.loads(raw)
        except ValueError:
            raise ProviderUnavailable(f"{what} is not JSON") from None
        return body if isinstance(body, dict) else None


def _scopes(payload: dict[str, Any]) -> set[str]:
    scope = payload.get("scope")
    if isinstance(scope, str):
        return set(scope.split())
    scp = payload.get("scp")  # Entra ID and Okta use `scp`, as a string or a list
    if isinstance(scp, str):
        return set(scp.split())
    if isinstance(scp, list):
        return {s for s in scp if isinstance(s, str)}
    return set()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
