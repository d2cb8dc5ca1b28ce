"""The admin API: minting follows the server's policy, credentials and revocations take effect at once."""

from __future__ import annotations

import jwt
import pytest
from mcp.shared.exceptions import MCPError

from tests.gateway.conftest import Stack
from tests.support.agent import agent


def test_minting_needs_the_admin_secret(stack: Stack) -> None:
    status, answer = stack.admin("POST", "/v1/tokens", {"user": "alice@example.com"}, secret="wrong-secret-but-long-enough")
    assert status == 403
    assert "token" not in answer


def test_a_minted_token_carries_the_design_claims(stack: Stack) -> None:
    status, answer = stack.admin("POST", "/v1/tokens", {"user": "alice@example.com", "ttl": "5m"})
    assert status == 201
    claims = jwt.decode(answer["token"], options={"verify_signature": False})
    assert set(claims) >= {"iss", "aud", "sub", "tenant", "exp", "iat", "jti"}
    assert claims["aud"] == stack.url and claims["sub"] == "alice@example.com" and claims["tenant"] == "acme"
    assert claims["exp"] - int(claims["iat"]) == 300
    assert jwt.get_unverified_header(answer["token"])["alg"] == "EdDSA"


def test_the_ttl_is_capped_by_max_ttl(stack: Stack) -> None:
    status, answer = stack.admin("POST", "/v1/tokens", {"user": "alice@example.com", "ttl": "2h"})
    assert status == 400
    assert "maxTTL (1h)" in answer["message"]


def test_a_bad_ttl_says_how_to_write_one(stack: Stack) -> None:
    status, answer = stack.admin("POST", "/v1/tokens", {"user": "alice@example.com", "ttl": "soon"})
    assert status == 400 and "e.g. 15m" in answer["message"]


def test_a_scope_outside_the_allowlist_is_refused(stack: Stack) -> None:
    status, answer = stack.admin("POST", "/v1/tokens", {"user": "alice@example.com", "tools": ["send_mail"]})
    assert status == 400 and answer["unknown"] == ["send_mail"]


def test_minting_for_a_user_who_has_not_connected_names_the_missing_connections(stack: Stack) -> None:
    status, answer = stack.admin("POST", "/v1/tokens", {"user": "nobody@example.com"})
    assert status == 409
    assert answer["missing"] == ["inbox"]
    assert "connect them first" in answer["message"]


def test_credentials_are_stored_and_deleted_through_the_api(stack: Stack) -> None:
    assert stack.admin("PUT", "/v1/users/frank@example.com/connections/inbox", {"secret": "frank-secret"})[0] == 204
    assert stack.admin("POST", "/v1/tokens", {"user": "frank@example.com"})[0] == 201
    assert stack.admin("DELETE", "/v1/users/frank@example.com/connections/inbox")[0] == 204
    assert stack.admin("DELETE", "/v1/users/frank@example.com/connections/inbox")[0] == 404
    assert stack.admin("POST", "/v1/tokens", {"user": "frank@example.com"})[0] == 409


def test_bad_admin_bodies_are_clear_errors(stack: Stack) -> None:
    assert stack.admin("POST", "/v1/tokens", {})[0] == 400
    assert stack.admin("POST", "/v1/revocations", {})[0] == 400
    assert stack.admin("PUT", "/v1/users/x/connections/inbox", {"secret": ""})[0] == 400


def test_status_reports_counts_and_schema_tokens(stack: Stack) -> None:
    status, body = stack.admin("GET", "/v1/status")
    assert status == 200
    assert body["exposed"] == 7
    assert body["upstream"] > 30
    assert 0 < body["schemaTokens"]["exposed"] < body["schemaTokens"]["upstream"]
    assert body["unknownTools"] == [{"mapping": "summarizer-down", "name": "anything", "exposedAs": "anything", "connection": "down"}]


@pytest.mark.anyio
async def test_every_call_and_denial_is_audited_without_secrets(stack: Stack) -> None:
    async with agent(stack.url, stack.mint("alice@example.com"), "2026-07-28") as client:
        await client.call_tool("whoami", {"secret_argument": "do-not-log-me"})
        with pytest.raises(MCPError):
            await client.call_tool("send_mail", {"body": "do-not-log-me"})
    joined = "\n".join(e.to_json() for e in stack.audit.events)
    assert "alice-inbox-token" not in joined and "Bearer" not in joined
    assert "do-not-log-me" not in joined
    whoami = [e for e in stack.audit.events if e.tool == "whoami"][-1]
    denied = [e for e in stack.audit.events if e.tool == "send_mail"][-1]
    assert (whoami.user, whoami.decision, whoami.outcome, whoami.connection) == ("alice@example.com", "allow", "ok", "inbox")
    assert whoami.jti and whoami.latency_ms > 0
    assert (denied.decision, denied.reason, denied.outcome) == ("deny", "not_exposed", "denied")


@pytest.mark.anyio
async def test_a_token_minted_right_after_revoking_its_user_works_and_one_minted_before_does_not(stack: Stack) -> None:
    # Many rounds, so some fall within one second (and one millisecond) of the revocation.
    for _ in range(20):
        before = stack.mint("alice@example.com")
        assert stack.admin("POST", "/v1/revocations", {"user": "alice@example.com"})[0] == 200
        after = stack.mint("alice@example.com")
        async with agent(stack.url, after, "2026-07-28") as client:
            assert (await client.list_tools()).tools
        async with agent(stack.url, before, "2026-07-28") as client:
            with pytest.raises(Exception):
                await client.list_tools()
