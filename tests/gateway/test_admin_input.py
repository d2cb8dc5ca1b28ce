"""Bad input on the admin port is a clear 4xx naming the field, never a 500, and the next good request works."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portcullis.gateway.local import admin_secret
from tests.gateway.conftest import Stack

USER = "alice@example.com"


def raw(stack: Stack, method: str, path: str, body: bytes | None) -> tuple[int, Any]:
    request = urllib.request.Request(
        stack.gw.admin_url + path, data=body, method=method,
        headers={"Authorization": f"Bearer {admin_secret(stack.state_dir)}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            data = response.read()
            return response.status, json.loads(data) if data else None
    except urllib.error.HTTPError as exc:
        data = exc.read()
        try:
            return exc.code, json.loads(data) if data else None
        except ValueError:
            return exc.code, data.decode(errors="replace")


BAD = [
    ("PUT", "/v1/users/alice@example.com/connections/INBOX", {"secret": "s"}, 400, "connection"),
    ("PUT", "/v1/users/alice@example.com/connections/..", {"secret": "s"}, 400, "connection"),
    ("PUT", "/v1/users/alice@example.com/connections/%2e%2e", {"secret": "s"}, 400, "connection"),
    ("PUT", "/v1/users/alice@example.com/connections/" + "a" * 300, {"secret": "s"}, 400, "connection"),
    ("PUT", "/v1/users/alice@example.com/connections/gmail", {"secret": "s"}, 404, "connection"),
    ("PUT", "/v1/users/alice@example.com/connections/down", {"secret": "s"}, 404, "connection"),
    ("DELETE", "/v1/users/alice@example.com/connections/INBOX", None, 400, "connection"),
    ("PUT", "/v1/users/alice%0A@example.com/connections/inbox", {"secret": "s"}, 400, "user"),
    ("PUT", "/v1/users/" + "u" * 300 + "/connections/inbox", {"secret": "s"}, 400, "user"),
    ("PUT", "/v1/users/alice@example.com/connections/inbox", {"secret": ""}, 400, "secret"),
    ("PUT", "/v1/users/alice@example.com/connections/inbox", {"secret": "s", "extra": 1}, 400, "extra"),
    ("POST", "/v1/revocations", {"jti": ""}, 400, "jti"),
    ("POST", "/v1/revocations", {"jti": "../../etc/passwd"}, 400, "jti"),
    ("POST", "/v1/revocations", {"jti": "a" * 300}, 400, "jti"),
    ("POST", "/v1/revocations", {"jti": 7}, 400, "jti"),
    ("POST", "/v1/revocations", {"jti": "abc", "expiresAt": "tomorrow"}, 400, "expiresAt"),
    ("POST", "/v1/revocations", {"jti": "abc", "expiresAt": 10**30}, 400, "expiresAt"),
    ("POST", "/v1/revocations", {}, 400, "jti"),
    ("POST", "/v1/revocations", {"jti": "abc", "user": USER}, 400, "jti"),
    ("POST", "/v1/revocations", {"user": ""}, 400, "user"),
    ("POST", "/v1/tokens", {"user": ""}, 400, "user"),
    ("POST", "/v1/tokens", {"user": USER, "colour": "red"}, 400, "colour"),
    ("POST", "/v1/tokens", {"user": USER, "ttl": "soon"}, 400, "ttl"),
    ("POST", "/v1/tokens", {"user": USER, "agentRunId": "white space"}, 400, "agentRunId"),
    ("POST", "/v1/tokens", {"user": USER, "tools": "inbox_fetch_mails"}, 400, "tools"),
    ("GET", "/v1/audit?limit=many", None, 400, "limit"),
    ("GET", "/v1/audit/verify?since=never", None, 400, "since"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "field"), BAD, ids=[f"{m} {p[:60]} {b}" for m, p, b, *_ in BAD])
def test_bad_input_is_a_4xx_naming_the_field_and_the_next_request_works(
    stack: Stack, method: str, path: str, body: Any, status: int, field: str
) -> None:
    got, answer = raw(stack, method, path, None if body is None else json.dumps(body).encode())
    assert (got, answer.get("field")) == (status, field), answer
    assert answer["message"]
    assert stack.admin("POST", "/v1/tokens", {"user": USER})[0] == 201


@pytest.mark.parametrize("body", [b"{", b"[]", b'"user"', b"[" * 60_000, b"\xff\xfe{}", b"x" * 70_000])
def test_bodies_that_are_not_a_json_object_are_4xx(stack: Stack, body: bytes) -> None:
    status, _ = raw(stack, "POST", "/v1/tokens", body)
    assert 400 <= status < 500


def test_minting_for_a_user_whose_stored_credential_does_not_open_says_reconnect(stack: Stack, tmp_path: Path) -> None:
    stack.put_credential("moved@example.com", "their-secret")
    vault_dir = stack.state_dir / "vault" / "acme"
    [sealed] = [p for p in vault_dir.glob("*.inbox.sealed") if p.read_text() and _owned_by(p, "moved@example.com")]
    sealed.write_text("v1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")  # not sealed for this place and key
    status, answer = stack.admin("POST", "/v1/tokens", {"user": "moved@example.com"})
    assert status == 409 and answer["unreadable"] == ["inbox"] and "reconnect" in answer["message"]
    assert stack.admin("PUT", "/v1/users/moved@example.com/connections/inbox", {"secret": "their-secret"})[0] == 204
    assert stack.admin("POST", "/v1/tokens", {"user": "moved@example.com"})[0] == 201


def _owned_by(path: Path, user: str) -> bool:
    import hashlib

    return path.name.startswith(hashlib.sha256(user.encode()).hexdigest()[:32] + ".")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
bodies = st.dictionaries(
    st.sampled_from(["user", "ttl", "tools", "agentRunId", "jti", "expiresAt", "secret", "x"]), json_values, max_size=4
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/tokens", "/v1/revocations"]), body=bodies)
def test_fuzzed_admin_bodies_never_get_a_5xx(stack: Stack, path: str, body: dict[str, Any]) -> None:
    status, answer = raw(stack, "POST", path, json.dumps(body).encode())
    assert status < 500, (status, answer)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=st.text(min_size=1, max_size=30), connection=st.text(min_size=1, max_size=30))
def test_fuzzed_credential_paths_never_get_a_5xx(stack: Stack, user: str, connection: str) -> None:
    from urllib.parse import quote

    path = f"/v1/users/{quote(user, safe='')}/connections/{quote(connection, safe='')}"
    status, answer = raw(stack, "DELETE", path, None)
    assert status < 500, (status, answer)
