"""The OAuth test harness itself: a real authorization server (oidc-provider) and an upstream MCP
server that requires its tokens, driven here by hand the way the gateway will drive them.

Each test does what an OAuth client does with plain HTTP: dynamic registration (RFC 7591), an
authorization request with PKCE S256 and a resource indicator (RFC 8707), the code exchange,
refreshes; `Provider.consent()` plays the user. The upstream is called with the MCP SDK client.
If these pass, a failing connected-accounts test points at the gateway, not at the harness.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import anyio
import httpx2
import jwt
import mcp_types as types
import pytest

from tests.support.clients import mcp_client
from tests.support.oauth_provider import Provider, oauth_provider
from tests.support.oauth_upstream import Upstream, oauth_upstream

pytestmark = pytest.mark.interop

REDIRECT_URI = "http://127.0.0.1:1/callback"  # never called: consent() stops at the redirect
SCOPE = "mail.read mail.send"
HTTP_TIMEOUT = 10.0
CALL_TIMEOUT = 15.0


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    with oauth_provider(redirect_uris=(REDIRECT_URI,)) as running:
        yield running


@pytest.fixture(scope="module")
def upstream(provider: Provider) -> Iterator[Upstream]:
    with oauth_upstream(provider.issuer) as running:
        yield running


@pytest.fixture
def http() -> Iterator[httpx2.Client]:
    with httpx2.Client(timeout=HTTP_TIMEOUT, trust_env=False) as client:
        yield client


# --- an OAuth client, by hand ------------------------------------------------------------------


@dataclass
class Authorization:
    """One authorization request: its URL and what the client keeps to finish it."""

    url: str
    state: str
    verifier: str


def authorization(provider: Provider, client_id: str, *, resource: str | None, pkce: bool = True) -> Authorization:
    state, verifier = secrets.token_urlsafe(16), secrets.token_urlsafe(48)
    params = {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT_URI, "scope": SCOPE, "state": state}
    if pkce:
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        params |= {"code_challenge": challenge, "code_challenge_method": "S256"}
    if resource is not None:
        params["resource"] = resource
    return Authorization(f"{provider.authorization_endpoint}?{urlencode(params)}", state, verifier)


def callback_params(provider: Provider, redirect: str, request: Authorization) -> dict[str, str]:
    """The parameters of the redirect to the client, after checking it is the client's, for this request."""
    parts = urlsplit(redirect)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == REDIRECT_URI
    params = {key: values[0] for key, values in parse_qs(parts.query).items()}
    assert params["state"] == request.state
    assert params["iss"] == provider.issuer  # RFC 9207
    return params


def register_public_client(http: httpx2.Client, provider: Provider) -> str:
    response = http.post(
        provider.registration_endpoint,
        json={
            "redirect_uris": [REDIRECT_URI],
            "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "client_name": "harness test",
        },
    )
    assert response.status_code == 201, response.text
    client = response.json()
    assert client["token_endpoint_auth_method"] == "none" and "client_secret" not in client
    return str(client["client_id"])


def token_request(http: httpx2.Client, provider: Provider, form: dict[str, str], *, secret: str | None = None) -> httpx2.Response:
    """POST to the token endpoint: a public client names itself in the form, a confidential one
    authenticates with HTTP Basic (client_secret_basic) instead."""
    if secret is None:
        return http.post(provider.token_endpoint, data=form)
    body = {key: value for key, value in form.items() if key != "client_id"}
    return http.post(provider.token_endpoint, data=body, auth=httpx2.BasicAuth(form["client_id"], secret))


def tokens_for(http: httpx2.Client, provider: Provider, client_id: str, resource: str, *, login: str = "ada") -> dict[str, Any]:
    """A user's consent and the code exchange, as a public client: the token response."""
    request = authorization(provider, client_id, resource=resource)
    params = callback_params(provider, provider.consent(request.url, login=login), request)
    response = token_request(
        http,
        provider,
        {"grant_type": "authorization_code", "code": params["code"], "redirect_uri": REDIRECT_URI, "client_id": client_id,
         "code_verifier": request.verifier, "resource": resource},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    tokens: dict[str, Any] = response.json()
    return tokens


def refresh(http: httpx2.Client, provider: Provider, client_id: str, refresh_token: str, resource: str) -> httpx2.Response:
    return token_request(
        http, provider, {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": client_id, "resource": resource}
    )


def text_of(result: types.CallToolResult) -> str:
    return "".join(block.text for block in result.content if isinstance(block, types.TextContent))


async def whoami(upstream: Upstream, access_token: str) -> str:
    with anyio.fail_after(CALL_TIMEOUT):
        async with mcp_client(upstream.url, bearer=access_token) as client:
            return text_of(await client.call_tool("whoami", {}))


# --- the tests ----------------------------------------------------------------------------------


def test_the_discovery_documents_name_the_endpoints(provider: Provider, http: httpx2.Client) -> None:
    for path in ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"):
        document = http.get(provider.issuer + path).json()
        assert document["issuer"] == provider.issuer, path
        for endpoint, suffix in [("authorization_endpoint", "/auth"), ("token_endpoint", "/token"), ("registration_endpoint", "/reg"),
                                 ("revocation_endpoint", "/token/revocation"), ("introspection_endpoint", "/token/introspection")]:  # fmt: skip
            assert document[endpoint] == provider.issuer + suffix, (path, endpoint)
        assert document["code_challenge_methods_supported"] == ["S256"], path
        assert document["response_types_supported"] == ["code"], path
        assert "none" in document["token_endpoint_auth_methods_supported"], path
        assert {"authorization_code", "refresh_token"} <= set(document["grant_types_supported"]), path


@pytest.mark.anyio
async def test_a_public_client_gets_resource_bound_tokens_that_rotate(provider: Provider, upstream: Upstream, http: httpx2.Client) -> None:
    provider.reset_events()
    client_id = register_public_client(http, provider)
    tokens = tokens_for(http, provider, client_id, upstream.url)

    assert tokens["token_type"] == "Bearer" and tokens["scope"] == SCOPE and tokens["refresh_token"]
    # No offline_access was asked for: the provider issues a refresh token to any client allowed the grant.
    header = jwt.get_unverified_header(tokens["access_token"])
    claims = jwt.decode(tokens["access_token"], options={"verify_signature": False})
    assert (header["alg"], header["typ"]) == ("RS256", "at+jwt")
    assert (claims["aud"], claims["iss"], claims["sub"], claims["client_id"]) == (upstream.url, provider.issuer, "ada", client_id)

    seen_before = len(upstream.subjects)
    assert await whoami(upstream, tokens["access_token"]) == f"sub=ada scopes={SCOPE}"
    assert set(upstream.subjects[seen_before:]) == {"ada"}

    rotated = refresh(http, provider, client_id, tokens["refresh_token"], upstream.url)
    assert rotated.status_code == 200, rotated.text
    fresh = rotated.json()
    assert fresh["refresh_token"] != tokens["refresh_token"]
    assert jwt.decode(fresh["access_token"], options={"verify_signature": False})["aud"] == upstream.url
    assert await whoami(upstream, fresh["access_token"]) == f"sub=ada scopes={SCOPE}"

    reused = refresh(http, provider, client_id, tokens["refresh_token"], upstream.url)
    assert (reused.status_code, reused.json()["error"]) == (400, "invalid_grant")

    events = provider.events()
    assert events["authorization_code"] == {"ada": 1}
    assert events["refresh_token"] == {"ada": 1}
    assert events["refresh_token_errors"] == {"ada": 1}
    assert [(e["sub"], e["error"], e["detail"]) for e in events["errors"]] == [("ada", "invalid_grant", "refresh token already used")]

    # oidc-provider treats a reused refresh token as stolen and revokes the whole grant: the
    # refresh token that replaced it is dead too (what a gateway must cope with after a race).
    after_reuse = refresh(http, provider, client_id, fresh["refresh_token"], upstream.url)
    assert (after_reuse.status_code, after_reuse.json()["error"]) == (400, "invalid_grant")
    assert provider.events()["refresh_token_errors"] == {"ada": 2}


def test_a_revoked_subject_cannot_refresh(provider: Provider, upstream: Upstream, http: httpx2.Client) -> None:
    client_id = register_public_client(http, provider)
    tokens = tokens_for(http, provider, client_id, upstream.url)
    provider.reset_events()

    summary = provider.revoke("ada")
    assert summary["sub"] == "ada" and summary["grants"] >= 1

    response = refresh(http, provider, client_id, tokens["refresh_token"], upstream.url)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")
    assert provider.events() == {
        "refresh_token_errors": {"ada": 1},
        "errors": [{"grant_type": "refresh_token", "sub": "ada", "error": "invalid_grant", "detail": "refresh token not found"}],
    }


def test_revoking_one_subject_leaves_another_alone(provider: Provider, upstream: Upstream, http: httpx2.Client) -> None:
    client_id = register_public_client(http, provider)
    tokens = tokens_for(http, provider, client_id, upstream.url, login="grace")
    provider.revoke("ada")
    assert refresh(http, provider, client_id, tokens["refresh_token"], upstream.url).status_code == 200


def test_the_upstream_refuses_missing_and_foreign_tokens(provider: Provider, upstream: Upstream, http: httpx2.Client) -> None:
    subjects_before, rejected_before = len(upstream.subjects), upstream.rejected
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}

    missing = http.post(upstream.url, json=body)
    assert missing.status_code == 401
    challenge = missing.headers["www-authenticate"]
    assert challenge.startswith("Bearer ") and 'error="invalid_token"' in challenge
    assert f'resource_metadata="{upstream.resource_metadata_url}"' in challenge
    assert upstream.resource_metadata_url.endswith("/.well-known/oauth-protected-resource/mcp")

    metadata = http.get(upstream.resource_metadata_url).json()
    assert metadata["resource"] == upstream.url
    assert metadata["authorization_servers"] == [provider.issuer]
    assert metadata["scopes_supported"] == ["mail.read"]

    # A token the same provider issued, for the same user, but for another resource server.
    client_id = register_public_client(http, provider)
    other = tokens_for(http, provider, client_id, "http://127.0.0.1:9/elsewhere/mcp")
    assert jwt.decode(other["access_token"], options={"verify_signature": False})["aud"] == "http://127.0.0.1:9/elsewhere/mcp"
    foreign = http.post(upstream.url, json=body, headers={"Authorization": f"Bearer {other['access_token']}"})
    assert foreign.status_code == 401

    garbage = http.post(upstream.url, json=body, headers={"Authorization": "Bearer not-a-token"})
    assert garbage.status_code == 401

    assert (len(upstream.subjects), upstream.rejected) == (subjects_before, rejected_before + 3)


def test_denying_consent_redirects_with_access_denied(provider: Provider, upstream: Upstream, http: httpx2.Client) -> None:
    client_id = register_public_client(http, provider)
    request = authorization(provider, client_id, resource=upstream.url)
    params = callback_params(provider, provider.deny(request.url), request)
    assert params["error"] == "access_denied" and "code" not in params


def test_pkce_is_required(provider: Provider, upstream: Upstream, http: httpx2.Client) -> None:
    client_id = register_public_client(http, provider)
    request = authorization(provider, client_id, resource=upstream.url, pkce=False)
    params = callback_params(provider, provider.consent(request.url), request)
    assert (params["error"], params["error_description"]) == ("invalid_request", "Authorization Server policy requires PKCE to be used for this request")


def test_the_preregistered_confidential_client_authenticates_with_its_secret(provider: Provider, upstream: Upstream, http: httpx2.Client) -> None:
    request = authorization(provider, provider.client_id, resource=upstream.url)
    params = callback_params(provider, provider.consent(request.url, login="ada"), request)
    form = {"grant_type": "authorization_code", "code": params["code"], "redirect_uri": REDIRECT_URI, "client_id": provider.client_id,
            "code_verifier": request.verifier, "resource": upstream.url}  # fmt: skip

    wrong = token_request(http, provider, form, secret="not the secret")
    assert (wrong.status_code, wrong.json()["error"]) == (401, "invalid_client")
    response = token_request(http, provider, form, secret=provider.client_secret)
    assert response.status_code == 200, response.text
    tokens = response.json()
    assert jwt.decode(tokens["access_token"], options={"verify_signature": False})["client_id"] == provider.client_id

    form = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "client_id": provider.client_id}
    assert token_request(http, provider, form, secret=provider.client_secret).status_code == 200


def test_token_lifetimes_are_configurable(http: httpx2.Client) -> None:
    with oauth_provider(access_token_ttl=5, refresh_token_ttl=120) as short, oauth_upstream(short.issuer) as upstream:
        client_id = register_public_client(http, short)
        tokens = tokens_for(http, short, client_id, upstream.url)
        claims = jwt.decode(tokens["access_token"], options={"verify_signature": False})
        assert (tokens["expires_in"], claims["exp"] - claims["iat"]) == (5, 5)

        introspected = http.post(
            short.metadata["introspection_endpoint"], data={"token": tokens["refresh_token"], "client_id": client_id}
        ).json()
        assert (introspected["active"], introspected["client_id"], introspected["scope"]) == (True, client_id, SCOPE)
        assert (introspected["sub"], introspected["exp"] - introspected["iat"]) == ("ada", 120)
