"""`portcullis demo` runs the whole story end to end, with real parts.

The story includes the connect step of an OAuth upstream (examples/calendar/server.py, with its
toy authorization server), so the demo's authorization server is checked here too: it must
refuse what a real one refuses, or the demo would show a flow that only works against a toy.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from starlette.testclient import TestClient

from portcullis.demo import run_demo
from portcullis.gateway.oauth.record import loads
from portcullis.vault.local import LocalVault
from tests.support.servers import load_example

TENANT = "demo"
USER = "ada@example.com"
calendar_example = load_example("examples/calendar/server.py")


def grant_of(state: Path, user: str = USER) -> dict[str, str | None]:
    """The calendar grant the demo sealed in the vault: what must never be printed."""

    async def read() -> str | None:
        return await LocalVault(state).get(TENANT, user, "calendar")

    text = anyio.run(read)
    assert text is not None
    record = loads(text)
    assert record is not None and record.grant is not None
    return {"access": record.grant.access_token, "refresh": record.grant.refresh_token}


def test_the_demo_shows_the_slice_the_connect_step_the_calls_and_the_audit(tmp_path: Path) -> None:
    out = io.StringIO()
    state = tmp_path / "fresh" / "state"
    assert run_demo(state_dir=state, out=out) == 0
    text = out.getvalue()
    assert "MCP URL (mcp_server_url): http://127.0.0.1:" in text
    assert "in front of a 35-tool inbox and a 5-tool calendar" in text
    assert (
        "tools exposed / upstream: 4 / 40  (calendar_list_events, calendar_get_event, inbox_fetch_mails, search_mails)" in text
    )
    assert "% fewer" in text

    # The connect step: refused first, naming calendar; a link; consent; the gateway's page.
    assert "mint a session token first: refused, HTTP 409 connections_missing: user 'ada@example.com' has not connected calendar" in text
    link = next(line.strip() for line in text.splitlines() if "/demo-oauth/authorize?" in line)
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)
    assert query["code_challenge_method"] == ["S256"] and query["scope"] == ["calendar.read"]
    assert query["resource"][0].endswith("/mcp") and query["redirect_uri"][0].endswith("/oauth/callback")
    assert "consent page 'Demo calendar: allow access?'; Allow as ada@example.com" in text
    assert "/oauth/callback: page 'Connected calendar'" in text
    assert "connect step: minting refused until calendar was connected" in text
    assert "connected account calendar (OAuth, ada@example.com): scopes calendar.read, connected 20" in text

    # The calendar answered for the demo user, reached with the token the vault holds.
    assert 'allowed call calendar_list_events: {"owner": "ada@example.com", "events": [{"id": "ev-1"' in text
    assert "it reached the calendar with ada@example.com's own OAuth access token, from the vault" in text
    assert "refused before the upstream: Unknown tool: send_mail" in text

    # No token or secret reaches the output.
    grant = grant_of(state)
    assert grant["access"] and grant["refresh"]
    for value in (grant["access"], grant["refresh"], "inbox-oauth-token-for-ada"):
        assert value not in text

    assert "audit: 2 allowed, 1 denied" in text
    audit_file = Path(text.split("JSON lines in ")[1].splitlines()[0].strip())
    assert "(SQLite): chains verified intact over 3 events" in text
    events = [json.loads(line) for line in audit_file.read_text().splitlines()]
    assert [(e["tool"], e["decision"]) for e in events] == [
        ("inbox_fetch_mails", "allow"), ("calendar_list_events", "allow"), ("send_mail", "deny"),
    ]
    assert all(e["user"] == USER for e in events)


def test_a_second_run_on_the_same_state_connects_afresh(tmp_path: Path) -> None:
    # The demo's authorization server forgets everything when the demo ends, the state directory
    # does not (by default ~/.local/state/portcullis/demo): the old grant must not be reused.
    state = tmp_path / "state"
    assert run_demo(state_dir=state, out=io.StringIO()) == 0
    first = grant_of(state)
    out = io.StringIO()
    assert run_demo(state_dir=state, out=out) == 0
    assert "has not connected calendar" in out.getvalue()
    assert "it reached the calendar with ada@example.com's own OAuth access token" in out.getvalue()
    assert grant_of(state)["access"] != first["access"]


# --- the demo's authorization server -------------------------------------------------------------

BASE = "http://127.0.0.1:8766"
REDIRECT = "http://127.0.0.1:9999/oauth/callback"
VERIFIER = "v" * 43


def challenge(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


@pytest.fixture
def calendar() -> Iterator[tuple[Any, TestClient]]:
    built = calendar_example.build(BASE, access_token_seconds=60)
    with TestClient(built.app, base_url=BASE, follow_redirects=False) as client:
        yield built, client


def register(client: TestClient) -> str:
    answer = client.post("/demo-oauth/register", json={"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["client_id"])


def consent(client: TestClient, client_id: str, *, login: str = "grace@example.com", **extra: str) -> dict[str, str]:
    """Open the authorization URL, press Allow; the query the browser is sent back with."""
    params = {
        "response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT, "state": "s-1",
        "code_challenge": challenge(VERIFIER), "code_challenge_method": "S256", "resource": BASE + "/mcp",
        "scope": "calendar.read", **extra,
    }
    page = client.get("/demo-oauth/authorize", params=params)
    assert page.status_code == 200 and "Portcullis demo authorization server" in page.text
    request_id = page.text.split('name="request" value="')[1].split('"')[0]
    back = client.post("/demo-oauth/authorize", data={"request": request_id, "login": login, "decision": "allow"})
    assert back.status_code == 303 and back.headers["location"].startswith(REDIRECT + "?")
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(back.headers["location"]).query))


def exchange(client: TestClient, client_id: str, code: str, **overrides: str) -> Any:
    form = {"grant_type": "authorization_code", "client_id": client_id, "code": code, "code_verifier": VERIFIER,
            "redirect_uri": REDIRECT, "resource": BASE + "/mcp", **overrides}
    return client.post("/demo-oauth/token", data=form)


def test_the_metadata_is_what_the_gateway_discovers(calendar: tuple[Any, TestClient]) -> None:
    _, client = calendar
    resource = client.get("/.well-known/oauth-protected-resource/mcp").json()
    assert resource["resource"] == BASE + "/mcp" and resource["authorization_servers"] == [BASE + "/demo-oauth"]
    metadata = client.get("/.well-known/oauth-authorization-server/demo-oauth").json()
    assert metadata["issuer"] == BASE + "/demo-oauth"
    assert metadata["code_challenge_methods_supported"] == ["S256"]
    assert metadata["token_endpoint_auth_methods_supported"] == ["none"]
    assert metadata["registration_endpoint"] == BASE + "/demo-oauth/register"
    assert set(metadata["grant_types_supported"]) == {"authorization_code", "refresh_token"}
    refused = client.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert refused.status_code == 401 and "oauth-protected-resource/mcp" in refused.headers["www-authenticate"]


def test_codes_are_single_use_and_need_the_pkce_verifier_and_the_redirect_uri(calendar: tuple[Any, TestClient]) -> None:
    built, client = calendar
    client_id = register(client)
    back = consent(client, client_id)
    assert back["state"] == "s-1" and back["iss"] == BASE + "/demo-oauth"
    assert exchange(client, client_id, back["code"], code_verifier="w" * 43).json()["error"] == "invalid_grant"
    # That failed attempt spent the code too: a code works once, right or wrong.
    assert exchange(client, client_id, back["code"]).json()["error"] == "invalid_grant"

    code = consent(client, client_id)["code"]
    assert exchange(client, client_id, code, redirect_uri="http://127.0.0.1:9999/elsewhere").json()["error"] == "invalid_grant"
    code = consent(client, client_id)["code"]
    assert exchange(client, client_id, code, resource="http://127.0.0.1:1/mcp").json()["error"] == "invalid_target"

    code = consent(client, client_id)["code"]
    tokens = exchange(client, client_id, code).json()
    assert tokens["token_type"] == "Bearer" and tokens["expires_in"] == 60 and tokens["scope"] == "calendar.read"
    assert exchange(client, client_id, code).json()["error"] == "invalid_grant"
    verified = anyio.run(built.authorization_server.verify_token, tokens["access_token"])
    assert verified.subject == "grace@example.com" and verified.resource == BASE + "/mcp"


def test_refresh_tokens_rotate(calendar: tuple[Any, TestClient]) -> None:
    _, client = calendar
    client_id = register(client)
    tokens = exchange(client, client_id, consent(client, client_id)["code"]).json()
    form = {"grant_type": "refresh_token", "client_id": client_id, "refresh_token": tokens["refresh_token"], "resource": BASE + "/mcp"}
    fresh = client.post("/demo-oauth/token", data=form).json()
    assert fresh["access_token"] != tokens["access_token"] and fresh["refresh_token"] != tokens["refresh_token"]
    assert client.post("/demo-oauth/token", data=form).json()["error"] == "invalid_grant"  # spent


def test_the_authorization_endpoint_refuses_what_it_must(calendar: tuple[Any, TestClient]) -> None:
    _, client = calendar
    client_id = register(client)
    base = {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT, "state": "s",
            "code_challenge": challenge(VERIFIER), "code_challenge_method": "S256"}
    # An unregistered redirect URI is never redirected to.
    wrong = client.get("/demo-oauth/authorize", params={**base, "redirect_uri": "http://127.0.0.1:1/steal"})
    assert wrong.status_code == 400 and "location" not in wrong.headers
    plain = client.get("/demo-oauth/authorize", params={**base, "code_challenge_method": "plain"})
    assert plain.status_code == 303 and "error=invalid_request" in plain.headers["location"]
    other = client.get("/demo-oauth/authorize", params={**base, "resource": "http://127.0.0.1:1/mcp"})
    assert "error=invalid_target" in other.headers["location"]
    page = client.get("/demo-oauth/authorize", params=base)
    request_id = page.text.split('name="request" value="')[1].split('"')[0]
    denied = client.post("/demo-oauth/authorize", data={"request": request_id, "decision": "deny"})
    assert denied.status_code == 303 and "error=access_denied" in denied.headers["location"]
    confidential = client.post("/demo-oauth/register", json={"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "client_secret_basic"})
    assert confidential.status_code == 400
