"""Bad input on the wire gets a proper HTTP or JSON-RPC error, and the gateway keeps serving."""

from __future__ import annotations

import httpx2

from tests.gateway.conftest import Stack
from tests.gateway.test_auth import HEADERS, INIT


def headers(stack: Stack, **extra: str) -> dict[str, str]:
    return {**HEADERS, "Authorization": f"Bearer {stack.mint('alice@example.com')}", **extra}


def test_malformed_json_gets_a_parse_error(stack: Stack) -> None:
    response = httpx2.post(stack.url, content=b'{"jsonrpc": "2.0", "id": 1, "meth', headers=headers(stack), timeout=10)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == -32700


def test_a_request_that_is_not_json_rpc_gets_an_invalid_request(stack: Stack) -> None:
    response = httpx2.post(stack.url, json={"hello": "world"}, headers=headers(stack), timeout=10)
    assert response.status_code == 400
    assert response.json()["error"]["code"] in (-32600, -32602)


def test_headers_that_disagree_with_the_body_are_refused(stack: Stack) -> None:
    response = httpx2.post(stack.url, json=INIT, headers=headers(stack, **{"Mcp-Method": "tools/call"}), timeout=10)
    assert response.status_code == 400
    assert "error" in response.json()


def test_an_oversized_body_is_refused_with_413(stack: Stack) -> None:
    big = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"whoami","arguments":{"x":"' + b"a" * (5 * 1024 * 1024) + b'"}}}'
    response = httpx2.post(stack.url, content=big, headers=headers(stack, **{"Mcp-Method": "tools/call", "Mcp-Name": "whoami"}), timeout=30)
    assert response.status_code == 413
    # and the gateway still serves
    assert httpx2.post(stack.url, json=INIT, headers=headers(stack), timeout=10).status_code == 200


def test_health_and_readiness(stack: Stack) -> None:
    base = stack.url.removesuffix("/mcp")
    assert httpx2.get(base + "/healthz", timeout=10).json() == {"status": "ok"}
    ready = httpx2.get(base + "/readyz", timeout=10)
    assert ready.status_code == 200  # every connection's tool list is known, or marked failed ("down")


def test_a_foreign_origin_is_refused_before_authentication(stack: Stack) -> None:
    response = httpx2.post(stack.url, json=INIT, headers=headers(stack, Origin="http://evil.example.com"), timeout=10)
    assert response.status_code == 403
    assert "evil.example.com" in response.json()["error"]["message"]
    local = httpx2.post(stack.url, json=INIT, headers=headers(stack, Origin="http://localhost:3000"), timeout=10)
    assert local.status_code == 200
