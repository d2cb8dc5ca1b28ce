"""Bad input on the agent port: a clear answer of the right shape, on both eras, and the next call works."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gateway.conftest import Stack

ERAS = {"2026-07-28": {"Mcp-Method": "tools/call", "Mcp-Name": "whoami"}, "2025-11-25": {}}
CALL = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}}


def post(stack: Stack, body: bytes, headers: dict[str, str], path: str = "") -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(
        stack.url + path, data=body, method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json, text/event-stream", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            parsed: Any = json.loads(raw)
        except ValueError:
            parsed = raw
        return exc.code, dict(exc.headers), parsed


def good_call_works(stack: Stack, token: str, era: str) -> None:
    body = dict(CALL)
    if era == "2026-07-28":
        body = {**CALL, "params": {**CALL["params"], "_meta": {"io.modelcontextprotocol/clientInfo": {"name": "t", "version": "1"},
                                                                "io.modelcontextprotocol/protocolVersion": era,
                                                                "io.modelcontextprotocol/clientCapabilities": {}}}}
    status, _, raw = post(stack, json.dumps(body).encode(), {"Authorization": f"Bearer {token}", "Mcp-Protocol-Version": era, **ERAS[era]})
    assert status == 200 and b"alice@example.com" in raw, raw


@pytest.mark.parametrize("era", list(ERAS))
@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-8-sig"])
def test_a_body_that_is_not_utf8_json_is_a_parse_error_on_both_eras(stack: Stack, era: str, encoding: str) -> None:
    token = stack.mint("alice@example.com")
    status, _, answer = post(stack, json.dumps(CALL).encode(encoding), {"Authorization": f"Bearer {token}", "Mcp-Protocol-Version": era, **ERAS[era]})
    assert status == 400 and answer["error"]["code"] == -32700
    good_call_works(stack, token, era)


DEEP = "[" * 5000 + "]" * 5000  # past the interpreter's recursion limit, which json.loads recurses on


@pytest.mark.parametrize("era", list(ERAS))
@pytest.mark.parametrize("where", ["initialize capabilities", "call arguments", "the whole body"])
def test_a_body_nested_past_the_recursion_limit_is_a_parse_error_on_both_eras(stack: Stack, era: str, where: str) -> None:
    token = stack.mint("alice@example.com")
    meta = '"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"t","version":"1"},"io.modelcontextprotocol/clientCapabilities":{}}'
    body = {
        "initialize capabilities": '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":'
        + DEEP + ',"clientInfo":{"name":"t","version":"1"}}}',
        "call arguments": '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"whoami","arguments":{"a":' + DEEP + "}"
        + ("," + meta if era == "2026-07-28" else "") + "}}",
        "the whole body": DEEP,
    }[where]
    status, _, answer = post(stack, body.encode(), {"Authorization": f"Bearer {token}", "Mcp-Protocol-Version": era, **ERAS[era]})
    assert status == 400 and answer["error"]["code"] == -32700, (status, answer)
    good_call_works(stack, token, era)


def test_a_token_whose_header_is_nested_past_the_recursion_limit_is_malformed_not_unavailable(stack: Stack) -> None:
    head = base64.urlsafe_b64encode(DEEP.encode()).decode().rstrip("=")
    before = len(stack.audit.events)
    status, response_headers, answer = post(stack, json.dumps(CALL).encode(), {"Authorization": f"Bearer {head}.e30.c2ln", "Mcp-Method": "tools/call"})
    assert status == 401 and 'error_description="malformed"' in response_headers["www-authenticate"], (status, answer)
    [event] = list(stack.audit.events)[before:]
    assert event.outcome == "unauthenticated" and event.reason == "malformed"


@pytest.mark.parametrize("origin", ["http://[::1].evil.example", "http://localhost@evil.example", "http://localhost.evil.example", "null"])
def test_a_foreign_origin_posing_as_loopback_is_refused(stack: Stack, origin: str) -> None:
    token = stack.mint("alice@example.com")
    status, _, answer = post(stack, json.dumps(CALL).encode(), {"Authorization": f"Bearer {token}", "Origin": origin})
    assert status == 403 and answer["error"]["code"] == -32600


@pytest.mark.parametrize(("token", "reason"), [(None, None), ("not-a-jwt", "malformed")])
def test_a_401_says_why_and_how_to_get_a_new_token(stack: Stack, token: str | None, reason: str | None) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    before = len(stack.audit.events)
    status, response_headers, answer = post(stack, json.dumps(CALL).encode(), {**headers, "Mcp-Method": "tools/call"})
    assert status == 401
    challenge = response_headers["www-authenticate"]
    assert "resource_metadata=" in challenge
    if reason:
        assert f'error="invalid_token", error_description="{reason}"' in challenge
    else:
        assert "error=" not in challenge  # RFC 6750: no error code when no credentials were sent
    assert "mint a new one" in answer["message"] and "POST /v1/tokens" in answer["message"]
    [event] = list(stack.audit.events)[before:]
    assert event.outcome == "unauthenticated" and event.method == "tools/call"


@pytest.mark.parametrize("path", ["/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"])
def test_oauth_discovery_is_told_there_is_no_authorization_server(stack: Stack, path: str) -> None:
    base = stack.url.removesuffix("/mcp")
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(base + path, timeout=10)
    assert answer.value.code == 404
    assert "session tokens minted by your application" in json.loads(answer.value.read())["error_description"]
    request = urllib.request.Request(base + "/register", data=b'{"redirect_uris": ["http://localhost/cb"]}', method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 400
    assert json.loads(refused.value.read())["error"] == "invalid_client_metadata"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=10,
)
requests = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "1.0", 2]),
        "id": st.one_of(st.integers(), st.text(max_size=8), st.none(), st.booleans()),
        "method": st.sampled_from(["tools/call", "tools/list", "prompts/get", "resources/read", "completion/complete",
                                   "initialize", "ping", "nope", ""]),
        "params": st.one_of(json_values, st.fixed_dictionaries({}, optional={
            "name": st.one_of(st.sampled_from(["whoami", "inbox_fetch_mails", "send_mail"]), st.text(max_size=10)),
            "arguments": json_values, "_meta": json_values, "uri": st.text(max_size=20), "ref": json_values,
        })),
    },
)


_tokens: dict[int, str] = {}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(requests, st.lists(requests, max_size=3), json_values), era=st.sampled_from(list(ERAS)))
def test_fuzzed_json_rpc_bodies_never_get_a_5xx(stack: Stack, body: Any, era: str) -> None:
    token = _tokens.get(id(stack)) or _tokens.setdefault(id(stack), stack.mint("alice@example.com"))
    headers = {"Authorization": f"Bearer {token}", "Mcp-Protocol-Version": era}
    if era == "2026-07-28" and isinstance(body, dict) and isinstance(body.get("method"), str):
        headers["Mcp-Method"] = body["method"]
    status, _, answer = post(stack, json.dumps(body).encode(), headers)
    assert status < 500, (status, answer)
