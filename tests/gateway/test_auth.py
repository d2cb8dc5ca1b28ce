"""Only a valid, unrevoked session token for this server opens /mcp; everything else is a 401."""

from __future__ import annotations

import base64
import json
import time

import httpx2
import jwt
import pytest

from portcullis.gateway.identity.tokens import LocalKeyStore, SigningKeys, mint_token
from tests.gateway.conftest import Stack

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "tools/list",
    "params": {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}},
}
HEADERS = {
    "Accept": "application/json, text/event-stream",
    "Content-Type": "application/json",
    "MCP-Protocol-Version": "2026-07-28",
    "Mcp-Method": "tools/list",
}


def post(stack: Stack, token: str | None) -> httpx2.Response:
    headers = dict(HEADERS)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx2.post(stack.url, json=INIT, headers=headers, timeout=10)


def server_keys(stack: Stack) -> SigningKeys:
    """The gateway's own signing keys, to forge tokens that are valid but for one thing."""
    config = stack.gw.gateway.config
    return LocalKeyStore(stack.state_dir).load_or_create(config.server.namespace, config.server.name)


def forge(stack: Stack, **overrides: object) -> str:
    config = stack.gw.gateway.config
    claims = dict(
        issuer=config.server.issuer, audience=config.server.url, user="alice@example.com", tenant=config.tenant, ttl_seconds=600
    )
    claims.update(overrides)
    token, _ = mint_token(server_keys(stack), **claims)  # type: ignore[arg-type]
    return token


def assert_401(response: httpx2.Response, reason: str | None) -> None:
    assert response.status_code == 401, response.text
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert 'resource_metadata="http://127.0.0.1:' in challenge
    assert "/.well-known/oauth-protected-resource/mcp" in challenge
    if reason is not None:
        assert f'error_description="{reason}"' in challenge


def test_a_valid_token_is_accepted(stack: Stack) -> None:
    response = post(stack, stack.mint("alice@example.com"))
    assert response.status_code == 200
    assert "inbox_fetch_mails" in response.text


def test_no_token_gets_the_rfc9728_hint_without_an_error_code(stack: Stack) -> None:
    response = post(stack, None)
    assert_401(response, None)
    assert "error=" not in response.headers["www-authenticate"]


def test_an_expired_token_is_rejected(stack: Stack) -> None:
    assert_401(post(stack, forge(stack, now=int(time.time()) - 3600, ttl_seconds=60)), "expired")


def test_a_token_for_another_server_is_rejected(stack: Stack) -> None:
    assert_401(post(stack, forge(stack, audience="http://other.acme.svc:8080/mcp")), "wrong audience")


def test_a_tampered_token_is_rejected(stack: Stack) -> None:
    header, payload, signature = stack.mint("alice@example.com").split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "mallory@example.com"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert_401(post(stack, f"{header}.{forged}.{signature}"), "bad signature")


def test_an_unsigned_token_is_rejected(stack: Stack) -> None:
    good = jwt.decode(stack.mint("alice@example.com"), options={"verify_signature": False})
    unsigned = jwt.encode(good, key=None, algorithm="none")
    assert_401(post(stack, unsigned), None)


def test_a_token_signed_with_another_algorithm_is_rejected(stack: Stack) -> None:
    good = jwt.decode(stack.mint("alice@example.com"), options={"verify_signature": False})
    kid = jwt.get_unverified_header(stack.mint("alice@example.com"))["kid"]
    hs = jwt.encode(good, key="a-shared-secret-of-32-bytes-or-more!", algorithm="HS256", headers={"kid": kid})
    assert_401(post(stack, hs), None)


def test_a_token_signed_by_a_stranger_key_is_rejected(stack: Stack) -> None:
    config = stack.gw.gateway.config
    token, _ = mint_token(
        SigningKeys.generate(), issuer=config.server.issuer, audience=config.server.url,
        user="alice@example.com", tenant=config.tenant, ttl_seconds=600,
    )
    assert_401(post(stack, token), None)


def test_garbage_is_rejected(stack: Stack) -> None:
    assert_401(post(stack, "not-a-jwt"), None)


def test_a_revoked_token_fails_on_its_next_request(stack: Stack) -> None:
    status, answer = stack.admin("POST", "/v1/tokens", {"user": "alice@example.com"})
    token = answer["token"]
    assert post(stack, token).status_code == 200
    status, _ = stack.admin("POST", "/v1/revocations", {"jti": answer["jti"], "expiresAt": answer["expiresAt"]})
    assert status == 200
    assert_401(post(stack, token), "revoked")
    assert post(stack, stack.mint("alice@example.com")).status_code == 200  # other tokens are untouched


def test_revoking_a_user_cuts_every_token_they_hold(stack: Stack) -> None:
    stack.put_credential("erin@example.com", "erin-secret")
    first, second = stack.mint("erin@example.com"), stack.mint("erin@example.com")
    status, _ = stack.admin("POST", "/v1/revocations", {"user": "erin@example.com"})
    assert status == 200
    assert_401(post(stack, first), "revoked")
    assert_401(post(stack, second), "revoked")
    assert post(stack, stack.mint("alice@example.com")).status_code == 200


def test_the_protected_resource_metadata_names_this_server(stack: Stack) -> None:
    base = stack.url.removesuffix("/mcp")
    document = httpx2.get(base + "/.well-known/oauth-protected-resource/mcp", timeout=10).json()
    assert document["resource"] == stack.url
    assert document["bearer_methods_supported"] == ["header"]


def test_unauthenticated_requests_are_audited_without_the_token(stack: Stack) -> None:
    post(stack, "secret-looking-garbage-token")
    event = stack.audit.events[-1]
    assert (event.decision, event.outcome) == ("deny", "unauthenticated")
    assert "secret-looking-garbage-token" not in event.to_json()


@pytest.mark.parametrize("scope", [["whoami"]])
def test_a_narrower_token_scope_hides_and_refuses_the_rest(stack: Stack, scope: list[str]) -> None:
    token = stack.mint("alice@example.com", tools=scope)
    listed = post(stack, token).json()["result"]["tools"]
    assert [t["name"] for t in listed] == scope
