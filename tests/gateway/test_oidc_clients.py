"""Interactive clients: people sign in with the company's OpenID Connect provider.

oidc-provider (npm) is the company provider. The gateway's resource metadata names it, and
clients get access tokens there for the gateway's URL. The virtual server exposes one tool of a
plain upstream (the sample inbox, no credential) and one of an OAuth upstream that each user
connects (connected accounts): the person signed in is the vault's user.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import jwt
import pytest
import yaml

from portcullis.demo import load_inbox
from portcullis.gateway.audit import MemoryAuditSink
from portcullis.gateway.local import admin_secret
from portcullis.serve import LocalGateway, local_gateway
from tests.support.agent import agent, result_text
from tests.support.oauth_provider import Provider, new_signing_key, oauth_provider
from tests.support.oauth_upstream import Upstream, oauth_upstream
from tests.support.mcp_remote import mcp_remote_session
from tests.support.sdk_oauth_client import sdk_oauth_client
from tests.support.servers import serve_asgi

NS = "acme"
SCOPE = "mcp:tools"


@dataclass
class Stack:
    provider: Provider
    upstream: Upstream
    inbox: str
    gw: LocalGateway
    audit: MemoryAuditSink
    state: Path

    def token(self, login: str = "ada", *, resource: str | None = None, scope: str = SCOPE) -> str:
        return self.provider.token_for(resource or self.gw.public_url, login=login, scope=scope)

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx2.Response:
        headers = {"Authorization": f"Bearer {admin_secret(self.state)}"}
        return httpx2.request(method, self.gw.admin_url + path, headers=headers, timeout=15, **kwargs)


def manifests(issuer: str, upstream: str, inbox: str, **oidc: Any) -> list[dict[str, Any]]:
    meta = {"namespace": NS}
    mapping = {"apiVersion": "portcullis.dev/v1alpha1", "kind": "ToolMapping"}
    return [
        {"apiVersion": "portcullis.dev/v1alpha1", "kind": "MCPConnection", "metadata": {"name": "inbox", **meta},
         "spec": {"url": inbox}},
        {"apiVersion": "portcullis.dev/v1alpha1", "kind": "MCPConnection", "metadata": {"name": "mail", **meta},
         "spec": {"url": upstream, "credential": {"source": "oauth", "oauth": {"scopes": ["mail.read"]}}}},
        {"apiVersion": "portcullis.dev/v1alpha1", "kind": "VirtualMCPServer", "metadata": {"name": "triage", **meta},
         "spec": {"auth": {"oidc": {"issuer": issuer, "requiredScopes": [SCOPE], "requiredGroup": "mcp-users",
                                    "clockSkewSeconds": 0, **oidc}}}},
        {**mapping, "metadata": {"name": "inbox", **meta},
         "spec": {"serverRef": {"name": "triage"}, "connectionRef": {"name": "inbox"}, "tools": [{"name": "fetch_mails", "as": "inbox_fetch_mails"}]}},
        {**mapping, "metadata": {"name": "mail", **meta},
         "spec": {"serverRef": {"name": "triage"}, "connectionRef": {"name": "mail"}, "tools": [{"name": "whoami"}]}},
    ]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    groups = {"ada": ["mcp-users"], "grace": ["mcp-users"], "eve": []}
    with (
        # mcp-remote refreshes tokens that expire within 60 s: give it longer ones.
        oauth_provider(groups=groups, access_token_ttl=300) as provider,
        oauth_upstream(provider.issuer) as upstream,
        serve_asgi(load_inbox().build_app()) as inbox,
    ):
        path = tmp_path / "m.yaml"
        path.write_text(yaml.safe_dump_all(manifests(provider.issuer, upstream.url, inbox.url())))
        audit = MemoryAuditSink()
        state = tmp_path / "state"
        with local_gateway([path], state_dir=state, port=0, admin_port=0, audit=audit) as gw:
            yield Stack(provider, upstream, inbox.url(), gw, audit, state)


def call(stack: Stack, token: str, tool: str, arguments: dict[str, Any] | None = None) -> tuple[bool, str]:
    async def run() -> tuple[bool, str]:
        async with agent(stack.gw.url, token, "2026-07-28") as client:
            result = await client.call_tool(tool, arguments or {})
            return bool(result.is_error), result_text(result)

    return anyio.run(run)


def refusal(stack: Stack, token: str) -> httpx2.Response:
    body = {"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {}}
    return httpx2.post(stack.gw.url, json=body, headers={"Authorization": f"Bearer {token}", "MCP-Protocol-Version": "2026-07-28"}, timeout=15)


# --- the resource server, by the spec ------------------------------------------------------------


def test_the_resource_metadata_names_the_company_issuer(stack: Stack) -> None:
    anonymous = httpx2.post(stack.gw.url, json={"jsonrpc": "2.0", "id": 1, "method": "server/discover"}, timeout=15)
    assert anonymous.status_code == 401
    hint = anonymous.headers["www-authenticate"]
    metadata_url = hint.split('resource_metadata="', 1)[1].split('"', 1)[0]
    metadata = httpx2.get(metadata_url, timeout=15).json()
    assert metadata["resource"] == stack.gw.public_url
    assert metadata["authorization_servers"] == [stack.provider.issuer]
    assert metadata["scopes_supported"] == [SCOPE]
    assert f"Sign in with {stack.provider.issuer}" in anonymous.json()["message"]


def test_a_signed_in_person_lists_and_calls_as_themselves(stack: Stack) -> None:
    token = stack.token("ada")

    async def run() -> tuple[list[str], str]:
        async with agent(stack.gw.url, token, "2026-07-28") as client:
            tools = [t.name for t in (await client.list_tools()).tools]
            result = await client.call_tool("inbox_fetch_mails", {"limit": 1})
            return tools, result_text(result)

    tools, text = anyio.run(run)
    assert "inbox_fetch_mails" in tools and "mails" in text
    event = stack.audit.events[-1]
    assert event.user == "ada" and event.tool == "inbox_fetch_mails" and event.jti is not None and event.jti.startswith("oidc-")


@pytest.mark.parametrize(
    "case, status, error",
    [
        ("another resource", 401, "wrong audience"),
        ("another issuer", 401, None),
        ("missing scope", 403, "insufficient_scope"),
        ("missing group", 403, "mcp-users"),
        ("garbage", 401, None),
        ("a body nested past the recursion limit", 401, None),
    ],
)
def test_tokens_that_are_not_for_this_server_are_refused(stack: Stack, case: str, status: int, error: str | None) -> None:
    if case == "another resource":
        token = stack.token("ada", resource=stack.upstream.url)
    elif case == "another issuer":
        with oauth_provider(groups={"ada": ["mcp-users"]}) as other:
            token = other.token_for(stack.gw.public_url, login="ada", scope=SCOPE)
    elif case == "missing scope":
        token = stack.token("ada", scope="mail.read")
    elif case == "missing group":
        token = stack.token("eve")
    elif case == "garbage":
        token = "not.a.token"
    else:
        token = "e30." + base64.urlsafe_b64encode(b"[" * 5000).decode().rstrip("=") + ".c2ln"
    answer = refusal(stack, token)
    assert answer.status_code == status, answer.text
    challenge = answer.headers["www-authenticate"]
    assert "resource_metadata=" in challenge
    if status == 403:
        assert 'error="insufficient_scope"' in challenge
        if case == "missing scope":
            assert f'scope="{SCOPE}"' in challenge
    else:
        assert 'error="invalid_token"' in challenge
    if error is not None:
        assert error in answer.text
    assert stack.audit.events[-1].decision == "deny"
    assert stack.upstream.subjects == []  # nothing reached any upstream


def test_an_expired_token_is_refused(stack: Stack) -> None:
    token = stack.provider.expired_token_for(stack.gw.public_url, login="ada", scope=SCOPE)
    answer = refusal(stack, token)
    assert answer.status_code == 401 and "expired" in answer.text


def test_revoking_the_user_refuses_their_signed_in_tokens(stack: Stack) -> None:
    token = stack.token("ada")
    assert not call(stack, token, "inbox_fetch_mails", {"limit": 1})[0]
    assert stack.admin("POST", "/v1/revocations", json={"user": "ada"}).status_code == 200
    answer = refusal(stack, token)
    assert answer.status_code == 401 and "revoked" in answer.text
    # Signing in again afterwards works (issued after the revocation).
    anyio.run(anyio.sleep, 1.1)  # iat has a one-second grain at this provider
    assert not call(stack, stack.token("ada"), "inbox_fetch_mails", {"limit": 1})[0]


def test_keys_rotated_at_the_provider_are_picked_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("portcullis.gateway.identity.oidc.REFETCH_SECONDS", 0.0)
    first, second = new_signing_key(), new_signing_key()
    with oauth_provider(groups={"ada": ["mcp-users"]}, keys=[first]) as provider, serve_asgi(load_inbox().build_app()) as inbox:
        path = tmp_path / "m.yaml"
        path.write_text(yaml.safe_dump_all(manifests(provider.issuer, inbox.url(), inbox.url())))
        with local_gateway([path], state_dir=tmp_path / "s", port=0, admin_port=0, audit=MemoryAuditSink()) as gw:
            old = provider.token_for(gw.public_url, login="ada", scope=SCOPE)
            assert works(gw, old)
            # The provider signs with a new key from now on, still publishing the old one. The
            # gateway has only the old one cached: the new kid makes it read the JWKS again.
            provider.rotate([second, first])
            new = provider.token_for(gw.public_url, login="ada", scope=SCOPE)
            assert unverified_kid(new) == second["kid"] != unverified_kid(old)
            assert works(gw, new)
            assert works(gw, old)


def unverified_kid(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


def works(gw: LocalGateway, token: str) -> bool:
    """Does an agent with `token` get the tool list?"""

    async def run() -> bool:
        async with agent(gw.url, token, "2026-07-28") as client:
            return bool((await client.list_tools()).tools)

    return anyio.run(run)


# --- the same controls as session tokens -----------------------------------------------------------


def test_a_missing_connection_answers_with_the_persons_own_connect_link(stack: Stack) -> None:
    token = stack.token("ada")
    failed, text = call(stack, token, "whoami")
    assert failed and "Connect 'mail' first: open " in text
    link = text.split("open ", 1)[1].split(" in your browser", 1)[0]
    back = stack.provider.consent(link, login="ada")
    assert httpx2.get(back, timeout=15).status_code == 200
    failed, text = call(stack, token, "whoami")
    assert not failed and text.startswith("sub=ada ")


def test_the_sdk_oauth_client_logs_in_lists_and_calls(stack: Stack) -> None:
    async def run() -> tuple[list[str], str]:
        async with sdk_oauth_client(stack.gw.url, stack.provider, login="grace") as session:
            client = session.client
            tools = [t.name for t in (await client.list_tools()).tools]
            result = await client.call_tool("inbox_fetch_mails", {"limit": 1})
            return tools, result_text(result)

    tools, text = anyio.run(run)
    assert "inbox_fetch_mails" in tools and "mails" in text
    assert stack.audit.events[-1].user == "grace"


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_mcp_remote_logs_a_person_in_and_works_through_the_gateway(stack: Stack, mode: str) -> None:
    """Claude Desktop's bridge: mcp-remote finds the issuer in the resource metadata, registers,
    sends the person to the login page (a headless stand-in for the browser), and relays."""
    with mcp_remote_session(stack.gw.url, stack.provider, login="ada", mode=mode) as remote:  # type: ignore[arg-type]
        tools = [t["name"] for t in remote.request("tools/list")["tools"]]
        assert "inbox_fetch_mails" in tools
        result = remote.request("tools/call", {"name": "inbox_fetch_mails", "arguments": {"limit": 1}})
        assert not result.get("isError") and "mails" in result["content"][0]["text"]
        assert remote.opened  # the login went through the browser stand-in
    calls = [e for e in stack.audit.events if e.tool == "inbox_fetch_mails"]
    assert calls and calls[-1].user == "ada" and calls[-1].jti is not None and calls[-1].jti.startswith("oidc-")


def test_opaque_tokens_are_checked_by_introspection(tmp_path: Path) -> None:
    """Tokens the gateway cannot read (opaque) are asked about at the provider (RFC 7662), as the
    pre-registered confidential client; revoking one at the provider ends it once the cache lapses."""
    audience = "http://127.0.0.1:1/opaque"  # the provider issues opaque tokens for this resource
    with oauth_provider(groups={"ada": ["mcp-users"]}, access_token_ttl=300) as provider, serve_asgi(load_inbox().build_app()) as inbox:
        docs = manifests(provider.issuer, inbox.url(), inbox.url(), audience=audience,
                         introspection={"clientId": provider.client_id, "clientSecretRef": {"name": "introspection", "key": "secret"}})
        docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "introspection", "namespace": NS},
                     "stringData": {"secret": provider.client_secret}})
        path = tmp_path / "m.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        with local_gateway([path], state_dir=tmp_path / "s", port=0, admin_port=0, audit=MemoryAuditSink()) as gw:
            token = provider.token_for(audience, login="ada", scope=SCOPE)
            assert token.count(".") != 2  # opaque indeed
            assert works(gw, token)
            elsewhere = provider.token_for("http://127.0.0.1:2/opaque", login="ada", scope=SCOPE)
            answer = refusal_of(gw, elsewhere)
            assert answer.status_code == 401 and "wrong audience" in answer.text
            answer = refusal_of(gw, "made-up-opaque-token")
            assert answer.status_code == 401 and "not active" in answer.text


def refusal_of(gw: LocalGateway, token: str) -> httpx2.Response:
    body = {"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {}}
    return httpx2.post(gw.url, json=body, headers={"Authorization": f"Bearer {token}", "MCP-Protocol-Version": "2026-07-28"}, timeout=15)


def test_one_signed_in_token_can_be_revoked_by_its_jti(stack: Stack) -> None:
    token = stack.token("ada")
    assert not call(stack, token, "inbox_fetch_mails", {"limit": 1})[0]
    jti = stack.audit.events[-1].jti
    assert jti is not None and jti.startswith("oidc-")
    assert stack.admin("POST", "/v1/revocations", json={"jti": jti}).status_code == 200
    answer = refusal(stack, token)
    assert answer.status_code == 401 and "revoked" in answer.text
    assert not call(stack, stack.token("ada"), "inbox_fetch_mails", {"limit": 1})[0]  # the user is not revoked
