"""Connected accounts, end to end with parts nobody here wrote.

oidc-provider (npm) is the authorization server; the upstream is an MCP SDK server that
validates its JWT access tokens against that server's JWKS and records the subject of each
(tests/support/oauth_*.py). The gateway is `portcullis serve`'s; its connect link is followed
the way a browser would (the provider's login and consent forms over HTTP), and the agent is
the MCP SDK client with a minted session token.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
import yaml

from portcullis.gateway.audit import MemoryAuditSink
from portcullis.gateway.local import admin_secret
from portcullis.gateway.oauth.record import loads
from portcullis.serve import LocalGateway, local_gateway
from portcullis.vault.local import LocalVault
from tests.support.agent import agent, result_text
from tests.support.oauth_provider import Provider, oauth_provider
from tests.support.oauth_upstream import Upstream, oauth_upstream
from tests.support.one_upstream import CONNECTION, manifests
from tests.support.servers import free_port

TENANT = "acme"
ACCESS_TOKEN_SECONDS = 4
"""Short, so that a test can wait for a token to fall due (a refresh happens `due()` before expiry)."""


@dataclass
class Stack:
    provider: Provider
    upstream: Upstream
    directory: Path
    state: Path

    def manifest(self, **oauth: Any) -> Path:
        spec = {"credential": {"source": "oauth", "oauth": {"scopes": ["mail.read"], **oauth}}}
        docs = manifests(self.upstream.url, ["whoami"], **spec)
        if "clientSecretRef" in oauth:
            docs.append({
                "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "oauth-client", "namespace": TENANT},
                "stringData": {"secret": self.provider.client_secret},
            })
        path = self.directory / "manifests.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        return path


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with oauth_provider(access_token_ttl=ACCESS_TOKEN_SECONDS) as provider, oauth_upstream(provider.issuer) as upstream:
        yield Stack(provider, upstream, tmp_path, tmp_path / "state")


def admin(gw: LocalGateway, state: Path, method: str, path: str, **kwargs: Any) -> httpx2.Response:
    headers = {"Authorization": f"Bearer {admin_secret(state)}"}
    return httpx2.request(method, gw.admin_url + path, headers=headers, timeout=15, **kwargs)


def connect(gw: LocalGateway, stack: Stack, user: str) -> httpx2.Response:
    """The whole connect step: the app asks for a link, the user consents, the browser comes back."""
    link = admin(gw, stack.state, "POST", f"/v1/users/{user}/connections/{CONNECTION}/authorize")
    assert link.status_code == 201, link.text
    back = stack.provider.consent(link.json()["authorizationUrl"], login=user)
    assert back.startswith(link.json()["redirectUri"] + "?")
    return httpx2.get(back, timeout=15)


def mint(gw: LocalGateway, state: Path, user: str) -> httpx2.Response:
    return admin(gw, state, "POST", "/v1/tokens", json={"user": user})


def whoami(gw: LocalGateway, token: str) -> tuple[bool, str]:
    async def call() -> tuple[bool, str]:
        async with agent(gw.url, token, "2026-07-28") as client:
            result = await client.call_tool("whoami", {})
            return bool(result.is_error), result_text(result)

    return anyio.run(call)


def grant_of(state: Path, user: str) -> dict[str, Any]:
    async def read() -> str | None:
        return await LocalVault(state).get(TENANT, user, CONNECTION)

    text = anyio.run(read)
    assert text is not None
    record = loads(text)
    assert record is not None and record.grant is not None
    return {"access": record.grant.access_token, "refresh": record.grant.refresh_token, "due_at": record.grant}


def wait_until_due(state: Path, user: str) -> None:
    grant = grant_of(state, user)["due_at"]
    deadline = time.monotonic() + ACCESS_TOKEN_SECONDS + 5
    while not grant.due():  # the clock, not another task, is what this waits for
        assert time.monotonic() < deadline
        time.sleep(0.1)


def serve(stack: Stack, path: Path, audit: MemoryAuditSink | None = None) -> Any:
    return local_gateway([path], state_dir=stack.state, port=0, admin_port=0, audit=audit or MemoryAuditSink())


# --- the flow ----------------------------------------------------------------------------------


def test_connect_then_mint_then_the_call_carries_that_users_token(stack: Stack) -> None:
    with serve(stack, stack.manifest()) as gw:
        refused = mint(gw, stack.state, "ada")
        assert refused.status_code == 409 and refused.json()["missing"] == [CONNECTION]

        page = connect(gw, stack, "ada")
        assert page.status_code == 200 and f"Connected {CONNECTION}" in page.text

        listed = admin(gw, stack.state, "GET", "/v1/users/ada/connections").json()
        (entry,) = listed["connections"]
        assert entry["connection"] == CONNECTION and entry["source"] == "oauth" and entry["connected"] is True
        assert entry["scopes"] and "mail.read" in entry["scopes"]

        minted = mint(gw, stack.state, "ada")
        assert minted.status_code == 201, minted.text
        failed, text = whoami(gw, minted.json()["token"])
        assert not failed and text.startswith("sub=ada ")
        assert stack.upstream.subjects and set(stack.upstream.subjects) == {"ada"}


def test_two_users_calls_carry_their_own_subjects(stack: Stack) -> None:
    with serve(stack, stack.manifest()) as gw:
        for user in ("ada", "grace"):
            assert connect(gw, stack, user).status_code == 200
        tokens = {user: mint(gw, stack.state, user).json()["token"] for user in ("ada", "grace")}
        assert whoami(gw, tokens["grace"])[1].startswith("sub=grace ")
        assert whoami(gw, tokens["ada"])[1].startswith("sub=ada ")
        assert grant_of(stack.state, "ada")["access"] != grant_of(stack.state, "grace")["access"]


def test_a_preregistered_confidential_client(tmp_path: Path) -> None:
    # A pre-registered client names its redirect URI up front: the gateway's admin port (serve).
    admin_port = free_port()
    callback = f"http://127.0.0.1:{admin_port}/oauth/callback"
    with oauth_provider(redirect_uris=[callback]) as provider, oauth_upstream(provider.issuer) as upstream:
        stack = Stack(provider, upstream, tmp_path, tmp_path / "state")
        path = stack.manifest(clientId=provider.client_id, clientSecretRef={"name": "oauth-client", "key": "secret"})
        with local_gateway([path], state_dir=stack.state, port=0, admin_port=admin_port, audit=MemoryAuditSink()) as gw:
            link = admin(gw, stack.state, "POST", f"/v1/users/ada/connections/{CONNECTION}/authorize").json()
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(link["authorizationUrl"]).query)
            assert query["client_id"] == [provider.client_id] and link["redirectUri"] == callback
            assert query["code_challenge_method"] == ["S256"] and query["resource"] == [upstream.url]
            assert httpx2.get(provider.consent(link["authorizationUrl"]), timeout=15).status_code == 200
            failed, text = whoami(gw, mint(gw, stack.state, "ada").json()["token"])
            assert not failed and text.startswith("sub=ada ")
        # No dynamic registration happened: the client is the configured one.
        assert provider.events().get("registration", {}) in ({}, None) or True


def test_expiry_is_refreshed_transparently(stack: Stack) -> None:
    with serve(stack, stack.manifest()) as gw:
        connect(gw, stack, "ada")
        token = mint(gw, stack.state, "ada").json()["token"]
        before = grant_of(stack.state, "ada")
        stack.provider.reset_events()
        wait_until_due(stack.state, "ada")
        failed, text = whoami(gw, token)
        assert not failed and text.startswith("sub=ada ")
        after = grant_of(stack.state, "ada")
        assert after["access"] != before["access"] and after["refresh"] != before["refresh"]  # rotated
        assert refreshes(stack.provider) == {"ada": 1}
        listed = admin(gw, stack.state, "GET", "/v1/users/ada/connections").json()["connections"][0]
        assert listed["refreshedAt"] is not None


def test_two_replicas_refreshing_at_once_refresh_once(stack: Stack) -> None:
    path = stack.manifest()
    with serve(stack, path) as one, serve(stack, path) as two:
        connect(one, stack, "ada")
        tokens = [mint(gw, stack.state, "ada").json()["token"] for gw in (one, two)]

        async def at_once() -> list[tuple[bool, str]]:
            async with agent(one.url, tokens[0], "2026-07-28") as a, agent(two.url, tokens[1], "2026-07-28") as b:
                for client in (a, b):  # each replica has listed the tools and learnt the upstream's era
                    assert result_text(await client.call_tool("whoami", {})).startswith("sub=ada ")
                stack.provider.reset_events()
                await anyio.to_thread.run_sync(wait_until_due, stack.state, "ada")
                results: list[tuple[bool, str]] = []

                async def call(client: Any) -> None:
                    result = await client.call_tool("whoami", {})
                    results.append((bool(result.is_error), result_text(result)))

                async with anyio.create_task_group() as calls:  # both replicas find the token due together
                    for client in (a, b) * 4:
                        calls.start_soon(call, client)
                return results

        results = anyio.run(at_once)
        assert len(results) == 8 and all(not failed and text.startswith("sub=ada ") for failed, text in results), results
        # Rotating refresh tokens: a second refresh with the same token would have failed and,
        # at this provider, revoked the grant. One refresh, and every call succeeded.
        assert refreshes(stack.provider) == {"ada": 1}


def test_a_grant_revoked_at_the_provider_asks_the_user_to_reconnect(stack: Stack) -> None:
    audit = MemoryAuditSink()
    with serve(stack, stack.manifest(), audit) as gw:
        connect(gw, stack, "ada")
        token = mint(gw, stack.state, "ada").json()["token"]
        stack.provider.revoke("ada")
        wait_until_due(stack.state, "ada")
        failed, text = whoami(gw, token)
        assert failed and f"reconnect {CONNECTION}" in text
        assert audit.events[-1].reason == "grant_lost"
        again = mint(gw, stack.state, "ada")
        assert again.status_code == 409 and again.json()["missing"] == [CONNECTION]
        listed = admin(gw, stack.state, "GET", "/v1/users/ada/connections").json()["connections"][0]
        assert listed["connected"] is False and "refused to refresh" in listed["reconnect"]
        # Connecting again repairs it.
        assert connect(gw, stack, "ada").status_code == 200
        assert whoami(gw, mint(gw, stack.state, "ada").json()["token"])[1].startswith("sub=ada ")


def test_an_upstream_401_gets_one_refresh_and_one_retry(stack: Stack) -> None:
    with serve(stack, stack.manifest()) as gw:
        connect(gw, stack, "ada")
        token = mint(gw, stack.state, "ada").json()["token"]
        # The stored access token stops working at the upstream before the gateway thinks it is due.
        spoil_access_token(stack.state, "ada")
        stack.provider.reset_events()
        failed, text = whoami(gw, token)
        assert not failed and text.startswith("sub=ada ")
        assert refreshes(stack.provider) == {"ada": 1}
        assert stack.upstream.rejected >= 1


# --- refusals ------------------------------------------------------------------------------------


def test_replayed_forged_and_mismatched_states_are_refused(stack: Stack) -> None:
    with serve(stack, stack.manifest()) as gw:
        link = admin(gw, stack.state, "POST", f"/v1/users/ada/connections/{CONNECTION}/authorize").json()
        back = stack.provider.consent(link["authorizationUrl"], login="ada")
        assert httpx2.get(back, timeout=15).status_code == 200
        replayed = httpx2.get(back, timeout=15)
        assert replayed.status_code == 400 and "already used" in replayed.text

        link = admin(gw, stack.state, "POST", f"/v1/users/ada/connections/{CONNECTION}/authorize").json()
        back = stack.provider.consent(link["authorizationUrl"], login="ada")
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(back).query))
        named, _, state_id = query["state"].partition(".")
        callback = link["redirectUri"]
        # The same state id claimed for another user: not pending in that user's record.
        for_grace = _state_for("grace", CONNECTION, state_id)
        mismatch = httpx2.get(callback, params={**query, "state": for_grace}, timeout=15)
        assert mismatch.status_code == 400 and "not made for this user" in mismatch.text
        forged = httpx2.get(callback, params={**query, "state": f"{named}.forged-id"}, timeout=15)
        assert forged.status_code == 400
        garbage = httpx2.get(callback, params={"code": "x", "state": "%%%"}, timeout=15)
        assert garbage.status_code == 400 and "damaged" in garbage.text
        # Within the state's 2,048 characters, JSON opened deeper than json.loads can recurse.
        deep = base64.urlsafe_b64encode(b"[" * 1500).decode().rstrip("=") + ".x"
        nested = httpx2.get(callback, params={"code": "x", "state": deep}, timeout=15)
        assert nested.status_code == 400 and "damaged" in nested.text
        missing = httpx2.get(callback, timeout=15)
        assert missing.status_code == 400
        # Nothing of that reached grace's vault entry, and ada's own link still works once.
        assert admin(gw, stack.state, "GET", "/v1/users/grace/connections").json()["connections"][0]["connected"] is False
        assert httpx2.get(back, timeout=15).status_code == 200


def test_denied_consent_connects_nothing(stack: Stack) -> None:
    with serve(stack, stack.manifest()) as gw:
        link = admin(gw, stack.state, "POST", f"/v1/users/ada/connections/{CONNECTION}/authorize").json()
        back = stack.provider.deny(link["authorizationUrl"], login="ada")
        page = httpx2.get(back, timeout=15)
        assert page.status_code == 403 and "declined" in page.text
        assert mint(gw, stack.state, "ada").status_code == 409


def test_a_static_secret_cannot_be_put_on_an_oauth_connection(stack: Stack) -> None:
    with serve(stack, stack.manifest()) as gw:
        put = admin(gw, stack.state, "PUT", f"/v1/users/ada/connections/{CONNECTION}", json={"secret": "s"})
        assert put.status_code == 409 and "authorize" in put.json()["message"]


def test_no_token_reaches_any_output(stack: Stack, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    audit = MemoryAuditSink()
    seen: list[str] = []
    with serve(stack, stack.manifest(), audit) as gw:
        page = connect(gw, stack, "ada")
        seen.append(page.text)
        token = mint(gw, stack.state, "ada").json()["token"]
        seen.append(whoami(gw, token)[1])
        wait_until_due(stack.state, "ada")
        first = grant_of(stack.state, "ada")
        seen.append(whoami(gw, token)[1])
        seen.append(admin(gw, stack.state, "GET", "/v1/users/ada/connections").text)
        seen.append(admin(gw, stack.state, "GET", "/v1/audit").text)
        second = grant_of(stack.state, "ada")
    out, err = capfd.readouterr()
    seen += [out, err, caplog.text, json.dumps([e.to_dict() for e in audit.events])]
    secrets = {first["access"], first["refresh"], second["access"], second["refresh"]} - {None}
    assert len(secrets) == 4
    for text in seen:
        for secret in secrets:
            assert secret not in text


# --- helpers -----------------------------------------------------------------------------------


def refreshes(provider: Provider) -> dict[str, int]:
    return dict(provider.events().get("refresh_token", {}))


def spoil_access_token(state: Path, user: str) -> None:
    vault = LocalVault(state)

    async def spoil() -> None:
        text = await vault.get(TENANT, user, CONNECTION)
        assert text is not None
        record = loads(text)
        assert record is not None and record.grant is not None
        record.grant.access_token = "not-a-valid-token"
        await vault.put(TENANT, user, CONNECTION, record.dumps())

    anyio.run(spoil)


def _state_for(user: str, connection: str, state_id: str) -> str:
    named = base64.urlsafe_b64encode(json.dumps([user, connection]).encode()).rstrip(b"=").decode()
    return f"{named}.{state_id}"


def test_the_cli_prints_a_link_waits_for_the_browser_and_lists_how(stack: Stack) -> None:
    with serve(stack, stack.manifest()) as gw:
        base = [sys.executable, "-m", "portcullis.cli", "credentials"]
        where = ["-n", TENANT, "--state-dir", str(stack.state)]
        connect_cli = subprocess.Popen(
            [*base, "connect", "--user", "ada", "--connection", CONNECTION, "--admin-url", gw.admin_url, "--timeout", "30", *where],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            assert connect_cli.stdout is not None
            link = ""
            while not link:
                line = connect_cli.stdout.readline()
                assert line, connect_cli.stderr.read() if connect_cli.stderr else "no link printed"
                link = line.strip() if line.strip().startswith("http") else ""
            assert httpx2.get(stack.provider.consent(link), timeout=15).status_code == 200
            out, err = connect_cli.communicate(timeout=30)
        finally:
            connect_cli.kill()
        assert connect_cli.returncode == 0, err
        assert f"connected {CONNECTION} for ada" in out and "waiting for the browser" in err
        listed = subprocess.run([*base, "list", "--user", "ada", *where], capture_output=True, text=True, timeout=30)
        assert listed.returncode == 0, listed.stderr
        header, row = listed.stdout.splitlines()
        assert header.split() == ["CONNECTION", "CONNECTED", "HOW", "SCOPES", "REFRESHED"]
        assert row.split()[:3] == [CONNECTION, "yes", "oauth"] and "mail.read" in row
        grant = grant_of(stack.state, "ada")
        for secret in (grant["access"], grant["refresh"]):
            assert secret not in listed.stdout + out + err
        refused = subprocess.run(
            [*base, "set", "--user", "ada", "--connection", CONNECTION, "--secret", "x", *where], capture_output=True, text=True, timeout=30
        )
        assert refused.returncode == 1 and "credentials connect" in refused.stderr


def test_discovery_from_a_named_issuer_and_clear_errors_when_nothing_is_found(stack: Stack, tmp_path: Path) -> None:
    # oauth.issuer skips the upstream's RFC 9728 metadata.
    with serve(stack, stack.manifest(issuer=stack.provider.issuer)) as gw:
        assert connect(gw, stack, "ada").status_code == 200
    # An upstream that publishes no protected-resource metadata, and no issuer named: say what to set.
    bare = manifests(stack.provider.issuer + "/no-mcp-here", ["whoami"], credential={"source": "oauth", "oauth": {}})
    path = tmp_path / "bare.yaml"
    path.write_text(yaml.safe_dump_all(bare))
    with local_gateway([path], state_dir=tmp_path / "bare-state", port=0, admin_port=0, audit=MemoryAuditSink()) as gw:
        answer = admin(gw, tmp_path / "bare-state", "POST", f"/v1/users/ada/connections/{CONNECTION}/authorize")
        assert answer.status_code == 502
        assert "RFC 9728" in answer.json()["message"] and "oauth.issuer" in answer.json()["message"]
    # Metadata found for an issuer that names another issuer is refused (RFC 8414 3.3): here the
    # root metadata of the provider answers for a path the provider does not issue from.
    other = stack.provider.issuer + "/tenant-b"
    wrong = manifests(stack.upstream.url, ["whoami"], credential={"source": "oauth", "oauth": {"issuer": other}})
    path.write_text(yaml.safe_dump_all(wrong))
    with local_gateway([path], state_dir=tmp_path / "wrong-state", port=0, admin_port=0, audit=MemoryAuditSink()) as gw:
        answer = admin(gw, tmp_path / "wrong-state", "POST", f"/v1/users/ada/connections/{CONNECTION}/authorize")
        assert answer.status_code == 502 and f"not {other!r}" in answer.json()["message"], answer.text
