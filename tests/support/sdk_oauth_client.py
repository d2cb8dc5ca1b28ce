"""The MCP Python SDK's own OAuth client (`mcp.client.auth.OAuthClientProvider`), signed in headlessly.

`sdk_oauth_client(url, provider, login="ada")` connects an `mcp.Client` over Streamable HTTP
with an httpx2 client whose `auth` is an `OAuthClientProvider`: on the server's 401 the SDK
discovers the RFC 9728 metadata and the authorization server's, registers a public client
(RFC 7591, `token_endpoint_auth_method: none`), and asks its `redirect_handler` to send the user
to the authorization URL (PKCE S256, `resource` = the server's URL). That handler is the user
here: `Provider.consent()` as `login` (plain HTTP, in a worker thread since it is synchronous),
and the redirect it ends on is kept; the `callback_handler` then hands the SDK the `code`,
`state` and `iss` (RFC 9207) of that redirect, so nothing needs to listen on the redirect URI.
Tokens and the registration live in a `MemoryTokenStorage` for the session's lifetime.

The SDK client's `mode` is passed through: "auto" (the default) probes `server/discover` and
speaks 2026-07-28 where the server does, "legacy" runs the initialize handshake (2025-11-25).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import anyio.to_thread
from mcp import Client
from mcp.client.auth import AuthorizationCodeResult, OAuthClientProvider, OAuthFlowError
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthClientMetadata, OAuthToken
from pydantic import AnyUrl

from tests.support.oauth_provider import Provider

# Never called: the user's redirect is caught at the provider (`consent` does not follow it).
REDIRECT_URI = "http://127.0.0.1:1/oauth/callback"


@dataclass
class MemoryTokenStorage:
    """The SDK's `TokenStorage`, in memory: what a desktop client would keep on disk."""

    tokens: OAuthToken | None = None
    client_info: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


@dataclass
class HeadlessUser:
    """The SDK's redirect and callback handlers: a user who signs in as `login` and consents
    (or, with `refuse`, denies), every time they are sent to the provider."""

    provider: Provider
    login: str
    refuse: bool = False
    authorization_urls: list[str] = field(default_factory=list)
    """Each authorization URL the SDK sent the user to, in order."""
    redirects: list[str] = field(default_factory=list)
    """Where the provider sent the user back each time (redirect_uri with code or error)."""

    async def redirect_handler(self, authorization_url: str) -> None:
        self.authorization_urls.append(authorization_url)
        sign_in = self.provider.deny if self.refuse else self.provider.consent
        self.redirects.append(await anyio.to_thread.run_sync(lambda: sign_in(authorization_url, login=self.login)))

    async def callback_handler(self) -> AuthorizationCodeResult:
        if not self.redirects:
            raise OAuthFlowError("the user was never sent to the authorization server")
        params = {key: values[0] for key, values in parse_qs(urlsplit(self.redirects[-1]).query).items()}
        if "code" not in params:
            raise OAuthFlowError(f"the authorization was refused: {params.get('error')}: {params.get('error_description')}")
        return AuthorizationCodeResult(code=params["code"], state=params.get("state"), iss=params.get("iss"))


@dataclass
class SdkOAuthSession:
    """A connected SDK client and what its sign-in left."""

    client: Client
    storage: MemoryTokenStorage
    user: HeadlessUser
    auth: OAuthClientProvider


@asynccontextmanager
async def sdk_oauth_client(
    url: str,
    provider: Provider,
    login: str = "ada",
    *,
    mode: str = "auto",
    refuse: bool = False,
    storage: MemoryTokenStorage | None = None,
    client_name: str = "portcullis tests (MCP Python SDK)",
) -> AsyncIterator[SdkOAuthSession]:
    """`mcp.Client` connected to `url` with OAuth, signed in as `login` at `provider`.

    Pass a `storage` from an earlier session to start with its registration and tokens (no new
    sign-in while they are good). Bound the whole block with `anyio.fail_after` in tests.
    """
    user = HeadlessUser(provider, login, refuse)
    storage = storage if storage is not None else MemoryTokenStorage()
    auth = OAuthClientProvider(
        server_url=url,
        client_metadata=OAuthClientMetadata(
            redirect_uris=[AnyUrl(REDIRECT_URI)],
            token_endpoint_auth_method="none",
            grant_types=["authorization_code", "refresh_token"],
            response_types=["code"],
            client_name=client_name,
        ),
        storage=storage,
        redirect_handler=user.redirect_handler,
        callback_handler=user.callback_handler,
    )
    async with create_mcp_http_client(auth=auth) as http:
        async with Client(streamable_http_client(url, http_client=http), mode=mode) as client:
            yield SdkOAuthSession(client, storage, user, auth)
