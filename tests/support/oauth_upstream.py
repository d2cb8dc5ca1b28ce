"""An upstream MCP server that requires OAuth: the resource server of the "connected accounts" tests.

Built with the MCP Python SDK's `MCPServer` the way its users protect a server: a
`TokenVerifier` plus `AuthSettings(issuer_url=..., resource_server_url=...)`. With those the
SDK itself

- publishes RFC 9728 protected-resource metadata at
  `http://127.0.0.1:PORT/.well-known/oauth-protected-resource/mcp` (the well-known prefix
  inserted before the resource's path, RFC 9728 §3.1), naming the provider in
  `authorization_servers`;
- answers a request without a valid token 401, `WWW-Authenticate: Bearer error="invalid_token",
  error_description="Authentication required", resource_metadata="<that URL>"`, and one without a
  required scope 403 `insufficient_scope`.

The verifier (`JwtVerifier`) accepts only what oidc-provider issues for this server: an RS256
JWT access token (`typ: at+jwt`, RFC 9068) signed by a key of the provider's JWKS (PyJWT's
`PyJWKClient`), whose `iss` is the provider, whose `aud` is this server's MCP URL (the RFC 8707
resource the client asked for), and which has not expired. The SDK's own resource check
(`validate_token_resource`) is on as well.

The server runs stateless with JSON responses, like the gateway's other test upstreams, so it
answers clients of both protocol eras, and is served by tests/support/servers.py in a thread.
Its tools: `whoami` (the token's subject and scopes) and `echo`.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
import jwt
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tests.support.servers import ServerStartError, free_port, serve_asgi

MCP_PATH = "/mcp"
HTTP_TIMEOUT = 10.0
# A port from `free_port` may be taken again before uvicorn binds it: try a few.
BIND_ATTEMPTS = 3
ACCESS_TOKEN_TYPES = ("at+jwt", "application/at+jwt")


@dataclass
class Seen:
    """What the upstream saw, shared between its server thread and the test (hence the lock)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    subjects: list[str] = field(default_factory=list)
    rejected: int = 0

    def subject(self, sub: str) -> None:
        with self.lock:
            self.subjects.append(sub)

    def refused(self) -> None:
        with self.lock:
            self.rejected += 1


class JwtVerifier:
    """The SDK's `TokenVerifier`: RS256 JWT access tokens from `issuer`, for `audience` only."""

    def __init__(self, *, issuer: str, jwks_uri: str, audience: str, seen: Seen) -> None:
        self.issuer = issuer
        self.audience = audience
        self.seen = seen
        # Keys are fetched on first use and cached; an unknown `kid` fetches again (key rotation).
        self.jwks = jwt.PyJWKClient(jwks_uri, cache_keys=True, timeout=int(HTTP_TIMEOUT))

    def decode(self, token: str) -> dict[str, Any]:
        header = jwt.get_unverified_header(token)
        if header.get("typ") not in ACCESS_TOKEN_TYPES:
            # An ID token is an RS256 JWT from the same issuer too, but it is not an access token.
            raise jwt.InvalidTokenError(f"not an access token (typ {header.get('typ')!r})")
        key = self.jwks.get_signing_key(header.get("kid", ""))
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=["RS256"],
            issuer=self.issuer,
            audience=self.audience,
            options={"require": ["iss", "sub", "aud", "exp", "iat", "client_id"]},
        )
        return claims

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            # PyJWKClient fetches with blocking urllib: keep it off the server's event loop.
            claims = await anyio.to_thread.run_sync(self.decode, token)
        except (jwt.PyJWTError, ValueError):
            return None
        self.seen.subject(str(claims["sub"]))
        return AccessToken(
            token=token,
            client_id=str(claims["client_id"]),
            scopes=str(claims.get("scope", "")).split(),
            expires_at=int(claims["exp"]),
            resource=self.audience,  # `decode` checked that `aud` names this server
            subject=str(claims["sub"]),
            claims=claims,
        )


class CountRefusals:
    """ASGI middleware counting the responses with status 401 (the SDK's bearer check refusing)."""

    def __init__(self, app: ASGIApp, seen: Seen) -> None:
        self.app = app
        self.seen = seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 401:
                self.seen.refused()
            await send(message)

        await self.app(scope, receive, counting_send)


def build_server(*, issuer: str, jwks_uri: str, url: str, seen: Seen, required_scopes: Sequence[str]) -> MCPServer:
    verifier = JwtVerifier(issuer=issuer, jwks_uri=jwks_uri, audience=url, seen=seen)
    server = MCPServer(
        "oauth-upstream",
        log_level="WARNING",  # MCPServer configures logging; at INFO it logs every request
        instructions="An MCP server that requires OAuth, for Portcullis' connected-accounts tests.",
        token_verifier=verifier,
        # Validated from plain strings, as from configuration: the model keeps a path-less issuer
        # without a trailing slash (issuer comparison is exact, RFC 8414), an AnyHttpUrl adds one.
        auth=AuthSettings.model_validate(
            {
                "issuer_url": issuer,
                "resource_server_url": url,
                "required_scopes": list(required_scopes) or None,
                "validate_token_resource": True,
            }
        ),
    )

    @server.tool()
    def whoami() -> str:
        """The subject and scopes of the access token this call came with."""
        token = get_access_token()
        if token is None:  # the SDK refuses unauthenticated requests before they get here
            return "anonymous"
        return f"sub={token.subject} scopes={' '.join(token.scopes)}"

    @server.tool()
    def echo(message: str) -> str:
        """Echo the message back."""
        return message

    return server


@dataclass
class Upstream:
    """A running OAuth-protected upstream: its MCP URL (also the resource tokens must name)."""

    url: str
    """The MCP endpoint, `http://127.0.0.1:PORT/mcp`: the resource an access token must be issued for."""
    issuer: str
    resource_metadata_url: str
    """Where the SDK serves the RFC 9728 metadata: `http://127.0.0.1:PORT/.well-known/oauth-protected-resource/mcp`."""
    _seen: Seen = field(repr=False)

    @property
    def subjects(self) -> list[str]:
        """The subject of every request with a valid token, in order."""
        with self._seen.lock:
            return list(self._seen.subjects)

    @property
    def rejected(self) -> int:
        """How many requests were answered 401."""
        with self._seen.lock:
            return self._seen.rejected


def _jwks_uri(issuer: str) -> str:
    with urllib.request.urlopen(f"{issuer}/.well-known/oauth-authorization-server", timeout=HTTP_TIMEOUT) as response:
        return str(json.loads(response.read())["jwks_uri"])


@contextmanager
def oauth_upstream(issuer: str, *, required_scopes: Sequence[str] = ("mail.read",)) -> Iterator[Upstream]:
    """Serve the upstream on loopback, trusting tokens of the authorization server `issuer`.

    `required_scopes` are the scopes every request's token must carry (403 otherwise); the SDK
    publishes them as `scopes_supported` in the resource metadata. Pass () to require none.
    """
    jwks_uri = _jwks_uri(issuer)
    with ExitStack() as stack:
        for attempt in range(1, BIND_ATTEMPTS + 1):
            # The resource URL is part of the app's configuration (metadata, audience), so the
            # port is chosen before the app is built, and may be taken by then: try again.
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            seen = Seen()
            server = build_server(issuer=issuer, jwks_uri=jwks_uri, url=base + MCP_PATH, seen=seen, required_scopes=required_scopes)
            app = CountRefusals(server.streamable_http_app(stateless_http=True, json_response=True, host="127.0.0.1"), seen)
            try:
                stack.enter_context(serve_asgi(app, port=port))
            except ServerStartError:
                if attempt == BIND_ATTEMPTS:
                    raise
                continue
            break
        yield Upstream(
            url=base + MCP_PATH,
            issuer=issuer,
            resource_metadata_url=f"{base}/.well-known/oauth-protected-resource{MCP_PATH}",
            _seen=seen,
        )
