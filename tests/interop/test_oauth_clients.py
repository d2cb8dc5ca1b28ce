"""Interactive MCP clients signing in with OAuth, headless, and the issuer features the gateway's
token validation will be tested with.

The clients are real ones nobody here wrote: mcp-remote (the stdio bridge Claude Desktop users
run, npm) and the MCP Python SDK's `OAuthClientProvider`. Each discovers the server's RFC 9728
metadata, registers at the authorization server it names (oidc-provider), signs the user in with
PKCE and a resource indicator, and calls a tool with the token; the browser and the user are
played by tests/support (see mcp_remote.py and sdk_oauth_client.py). The server is the
OAuth-protected upstream of tests/support/oauth_upstream.py, which validates the provider's JWT
access tokens against its JWKS, as the gateway will.

Then the provider's side: a `groups` claim, the `mcp:tools` scope, tokens without a browser
(`token_for`, `expired_token_for`), and signing-key rotation at runtime and across a restart on
the same issuer. Tokens are checked with PyJWT against the JWKS the provider publishes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx2
import jwt
import mcp_types as types
import pytest
from mcp.client.auth import OAuthFlowError

from tests.support.clients import mcp_client
from tests.support.mcp_remote import McpRemoteError, mcp_remote_missing, mcp_remote_session
from tests.support.oauth_provider import (
    MCP_SCOPE,
    Provider,
    new_signing_key,
    oauth_provider,
    public_jwk,
    unavailable,
)
from tests.support.oauth_upstream import Upstream, oauth_upstream
from tests.support.sdk_oauth_client import sdk_oauth_client

pytestmark = pytest.mark.interop

GROUPS = {"ada": ["mcp-users"], "grace": []}
RESOURCE = "http://127.0.0.1:9/mcp"  # any loopback URL is a resource at the provider
CALL_TIMEOUT = 30.0
HTTP_TIMEOUT = 10.0
# Longer than mcp-remote's 60 s expiry margin, so it does not refresh before every request.
ACCESS_TOKEN_SECONDS = 300


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    with oauth_provider(groups=GROUPS, access_token_ttl=ACCESS_TOKEN_SECONDS) as running:
        yield running


@pytest.fixture(scope="module")
def upstream(provider: Provider) -> Iterator[Upstream]:
    with oauth_upstream(provider.issuer) as running:
        yield running


@pytest.fixture
def mcp_remote_installed() -> None:
    missing = mcp_remote_missing()
    if missing is not None:
        unavailable(missing)


def claims_of(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def verify(provider: Provider, token: str, audience: str) -> dict[str, Any]:
    """The token's claims after checking it as a resource server does: signature against the
    JWKS the provider publishes now (by kid), issuer, audience, expiry."""
    keys = {key["kid"]: key for key in provider.jwks()["keys"]}
    kid = jwt.get_unverified_header(token)["kid"]
    if kid not in keys:
        raise jwt.InvalidKeyError(f"kid {kid} is not in the provider's JWKS")
    claims: dict[str, Any] = jwt.decode(
        token, jwt.PyJWK(keys[kid]).key, algorithms=["RS256"], audience=audience, issuer=provider.issuer,
        options={"require": ["iss", "sub", "aud", "exp", "iat"]},
    )  # fmt: skip
    return claims


def text_of(result: types.CallToolResult) -> str:
    return "".join(block.text for block in result.content if isinstance(block, types.TextContent))


def query_of(url: str) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}


# --- mcp-remote ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_mcp_remote_signs_in_with_oauth_and_calls_a_tool(mcp_remote_installed: None, provider: Provider, upstream: Upstream, mode: str) -> None:
    provider.reset_events()
    seen_before = len(upstream.subjects)
    with mcp_remote_session(upstream.url, provider, "ada", mode=mode) as session:
        # The host asked for 2025-11-25 and is answered in it. Upstream, mcp-remote relays that
        # initialize in legacy mode, and speaks 2026-07-28 (server/discover) in auto mode.
        assert session.protocol_version == "2025-11-25"
        assert session.initialize_result["serverInfo"]["name"] == "oauth-upstream"
        tools = session.request("tools/list")["tools"]
        assert {tool["name"] for tool in tools} == {"whoami", "echo"}
        result = session.request("tools/call", {"name": "whoami", "arguments": {}})
        assert result["content"] == [{"type": "text", "text": "sub=ada scopes=mail.read"}]

        # One sign-in, through the browser mcp-remote launched: `open` ran its bundled xdg-open,
        # which ran $BROWSER (the stand-in is named "browser"; the PATH names are fallbacks).
        [opened] = session.opened
        assert opened.name == "browser"
        assert opened.url.startswith(provider.authorization_endpoint + "?")
        query = query_of(opened.url)
        assert (query["resource"], query["code_challenge_method"]) == (upstream.url, "S256")
        assert query["redirect_uri"].startswith("http://localhost:") and query["redirect_uri"].endswith("/oauth/callback")
        assert "mail.read" in query["scope"].split()  # from the resource metadata's scopes_supported

    assert provider.events()["authorization_code"] == {"ada": 1}
    assert set(upstream.subjects[seen_before:]) == {"ada"}


def test_mcp_remote_does_not_connect_when_consent_is_denied(mcp_remote_installed: None, provider: Provider, upstream: Upstream) -> None:
    seen_before = len(upstream.subjects)
    with pytest.raises(McpRemoteError, match="closed its stdout") as refused:
        with mcp_remote_session(upstream.url, provider, "ada", refuse=True, connect_timeout=20):
            pass  # pragma: no cover - the session must not come up
    assert "Authorization failed: access_denied" in str(refused.value)  # from mcp-remote's stderr
    assert len(upstream.subjects) == seen_before


# --- the MCP Python SDK's OAuth client -------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(("mode", "version"), [("auto", "2026-07-28"), ("legacy", "2025-11-25")])
async def test_the_sdk_oauth_client_signs_in_and_calls_a_tool(provider: Provider, upstream: Upstream, mode: str, version: str) -> None:
    provider.reset_events()
    with anyio.fail_after(CALL_TIMEOUT):
        async with sdk_oauth_client(upstream.url, provider, "ada", mode=mode) as session:
            assert session.client.protocol_version == version
            assert text_of(await session.client.call_tool("whoami", {})) == "sub=ada scopes=mail.read"

    [authorization] = session.user.authorization_urls
    query = query_of(authorization)
    assert (query["resource"], query["code_challenge_method"]) == (upstream.url, "S256")
    assert session.storage.client_info is not None and session.storage.client_info.token_endpoint_auth_method == "none"
    assert session.storage.tokens is not None
    claims = verify(provider, session.storage.tokens.access_token, upstream.url)
    assert (claims["sub"], claims["client_id"]) == ("ada", session.storage.client_info.client_id)
    assert provider.events()["authorization_code"] == {"ada": 1}


@pytest.mark.anyio
async def test_the_sdk_oauth_client_reuses_stored_tokens(provider: Provider, upstream: Upstream) -> None:
    with anyio.fail_after(CALL_TIMEOUT):
        async with sdk_oauth_client(upstream.url, provider, "grace") as first:
            await first.client.call_tool("whoami", {})
        async with sdk_oauth_client(upstream.url, provider, "grace", storage=first.storage) as second:
            assert text_of(await second.client.call_tool("whoami", {})) == "sub=grace scopes=mail.read"
    assert second.user.authorization_urls == []  # signed in once, as a desktop client would


@pytest.mark.anyio
async def test_the_sdk_oauth_client_fails_when_consent_is_denied(provider: Provider, upstream: Upstream) -> None:
    with anyio.fail_after(CALL_TIMEOUT), pytest.raises(ExceptionGroup) as refused:
        async with sdk_oauth_client(upstream.url, provider, "ada", refuse=True):
            pass  # pragma: no cover - the client must not connect
    assert refused.group_contains(OAuthFlowError, match="refused: access_denied")


# --- the issuer's claims, scopes and tokens without a browser ---------------------------------------


def test_the_groups_claim_is_in_the_access_tokens_of_the_configured_subjects(provider: Provider) -> None:
    ada = verify(provider, provider.token_for(RESOURCE, login="ada"), RESOURCE)
    grace = verify(provider, provider.token_for(RESOURCE, login="grace"), RESOURCE)
    bob = verify(provider, provider.token_for(RESOURCE, login="bob"), RESOURCE)
    assert (ada["sub"], ada["groups"]) == ("ada", ["mcp-users"])
    assert (grace["sub"], grace["groups"]) == ("grace", [])
    assert bob["sub"] == "bob" and "groups" not in bob


def test_groups_can_change_while_the_provider_runs() -> None:
    with oauth_provider(groups={"ada": ["mcp-users"]}) as provider:
        before = provider.token_for(RESOURCE, login="ada")
        assert provider.set_groups({"ada": None, "grace": ["mcp-users", "admins"]}) == {"grace": ["mcp-users", "admins"]}
        assert "groups" not in claims_of(provider.token_for(RESOURCE, login="ada"))
        assert claims_of(provider.token_for(RESOURCE, login="grace"))["groups"] == ["mcp-users", "admins"]
        assert claims_of(before)["groups"] == ["mcp-users"]  # an issued token keeps what it says


def test_the_mcp_tools_scope_lands_in_the_access_token(provider: Provider) -> None:
    tokens = provider.tokens_for(RESOURCE, login="ada", scope=f"{MCP_SCOPE} mail.read")
    claims = verify(provider, tokens["access_token"], RESOURCE)
    assert set(claims["scope"].split()) == {MCP_SCOPE, "mail.read"} and set(tokens["scope"].split()) == {MCP_SCOPE, "mail.read"}
    assert jwt.get_unverified_header(tokens["access_token"])["typ"] == "at+jwt"
    assert MCP_SCOPE in provider.metadata["scopes_supported"]  # so clients may register with it
    # Only what was asked for: no scope, no mcp:tools.
    assert claims_of(provider.token_for(RESOURCE, login="ada", scope="mail.read"))["scope"] == "mail.read"


@pytest.mark.anyio
async def test_a_token_without_a_browser_is_accepted_and_an_expired_one_refused(provider: Provider, upstream: Upstream) -> None:
    token = provider.token_for(upstream.url, login="ada", scope="mail.read")
    async with mcp_client(upstream.url, bearer=token) as client:
        assert text_of(await client.call_tool("whoami", {})) == "sub=ada scopes=mail.read"

    expired = await anyio.to_thread.run_sync(lambda: provider.expired_token_for(upstream.url, login="ada", scope="mail.read"))
    claims = claims_of(expired)
    assert claims["exp"] - claims["iat"] == 1
    with pytest.raises(jwt.ExpiredSignatureError):
        verify(provider, expired, upstream.url)
    async with httpx2.AsyncClient(timeout=HTTP_TIMEOUT, trust_env=False) as http:
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
        refused = await http.post(upstream.url, json=body, headers={"Authorization": f"Bearer {expired}"})
    assert refused.status_code == 401


# --- signing keys ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_keys_rotate_at_runtime_on_the_same_issuer() -> None:
    a, b = new_signing_key(), new_signing_key()
    with oauth_provider(keys=[a]) as provider, oauth_upstream(provider.issuer, required_scopes=()) as upstream:
        issuer = provider.issuer
        old = provider.tokens_for(upstream.url, login="ada")
        assert jwt.get_unverified_header(old["access_token"])["kid"] == a["kid"]
        assert provider.jwks()["keys"] == [public_jwk(a)]

        assert provider.rotate([b, a]) == [b["kid"], a["kid"]]
        assert provider.issuer == issuer and [key["kid"] for key in provider.jwks()["keys"]] == [b["kid"], a["kid"]]
        new = provider.token_for(upstream.url, login="ada")
        assert jwt.get_unverified_header(new)["kid"] == b["kid"]
        verify(provider, new, upstream.url)
        verify(provider, old["access_token"], upstream.url)  # A is still published
        # The upstream had cached A only: B's unknown kid makes it fetch the JWKS again.
        async with mcp_client(upstream.url, bearer=new) as client:
            assert text_of(await client.call_tool("whoami", {})) == f"sub=ada scopes={MCP_SCOPE}"

        # Storage survives a rotation: the refresh token from before it still works.
        async with httpx2.AsyncClient(timeout=HTTP_TIMEOUT, trust_env=False) as http:
            refreshed = await http.post(
                provider.token_endpoint,
                data={"grant_type": "refresh_token", "refresh_token": old["refresh_token"], "client_id": claims_of(old["access_token"])["client_id"]},
            )
        assert refreshed.status_code == 200, refreshed.text
        assert jwt.get_unverified_header(refreshed.json()["access_token"])["kid"] == b["kid"]

        provider.rotate([b])
        assert [key["kid"] for key in provider.jwks()["keys"]] == [b["kid"]]
        with pytest.raises(jwt.InvalidKeyError):
            verify(provider, old["access_token"], upstream.url)


def test_a_restart_on_the_same_port_keeps_the_issuer_and_takes_new_keys() -> None:
    a, b = new_signing_key(), new_signing_key()
    with oauth_provider(keys=[a]) as first:
        issuer, port = first.issuer, first.port
        old = first.token_for(RESOURCE)
    with oauth_provider(port=port, keys=[b, a]) as second:
        assert second.issuer == issuer
        assert [key["kid"] for key in second.jwks()["keys"]] == [b["kid"], a["kid"]]
        new = second.token_for(RESOURCE)
        assert jwt.get_unverified_header(new)["kid"] == b["kid"]
        assert verify(second, new, RESOURCE)["iss"] == issuer
        assert verify(second, old, RESOURCE)["sub"] == "ada"
    with oauth_provider(port=port, keys=[b]) as third:
        with pytest.raises(jwt.InvalidKeyError):
            verify(third, old, RESOURCE)
