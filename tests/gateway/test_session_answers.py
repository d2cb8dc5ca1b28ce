"""A session's listings, pings, notices, `initialize` and DELETE are answered as the SDK answers them.

The session layer (sessions.py) answers these itself, because the SDK's stateless transport
builds a whole server for each, and a client that opens a session per tool call (LangChain's
default) sends all of them for every call. The SDK's answer is the reference: the same request
is sent without a session id, which the SDK serves, and with one, which the session layer
serves, and the two answers must be equal. `initialize` and a stateless DELETE are the SDK's
the first time and replayed after (replayed.py), so the first and a later answer are compared.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from portcullis.gateway.replayed import Replayed
from tests.support.eras import modern_only
from tests.support.one_upstream import OneUpstream, one_upstream
from tests.support.servers import load_example, run_asgi

pytestmark = pytest.mark.anyio
fixture = load_example("examples/fixture/server.py")
TOOLS = ["test_simple_text", "test_image_content", "test_error_handling"]
VERSIONS = ["2025-11-25", "2025-06-18", "2025-03-26"]


@pytest.fixture(scope="module", params=["sessions", "stateless"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OneUpstream]:
    """The fixture upstream keeping sessions, or answering 2026-07-28 only (no upstream sessions to carry)."""
    app = fixture.build_app() if request.param == "sessions" else modern_only(fixture.build_app())
    with run_asgi(app) as url, one_upstream(url, TOOLS, tmp_path_factory.mktemp("answers")) as gateway:
        yield gateway


def _headers(token: str, version: str | None = None, session: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    if version:
        headers["MCP-Protocol-Version"] = version
    if session:
        headers["Mcp-Session-Id"] = session
    return headers


def _seen(response: httpx2.Response) -> tuple[int, str, Any]:
    """Status, media type and the JSON-RPC message (or the bytes) of an answer."""
    media = response.headers.get("content-type", "").split(";")[0]
    if media == "text/event-stream":
        data = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
        return response.status_code, media, [json.loads(d) for d in data if d]
    return response.status_code, media, response.json() if response.content else response.content


def _payload(session_id: str) -> dict[str, Any]:
    part = session_id.split(".")[1]
    decoded = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    assert isinstance(decoded, dict)
    return decoded


async def _initialize(http: httpx2.AsyncClient, served: OneUpstream, version: str, request_id: Any = 1) -> httpx2.Response:
    body = {"jsonrpc": "2.0", "id": request_id, "method": "initialize",
            "params": {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    return await http.post(served.gw.url, json=body, headers=_headers(served.token))


REQUESTS = [
    {"jsonrpc": "2.0", "id": 7, "method": "tools/list"},
    {"jsonrpc": "2.0", "id": "list-2", "method": "tools/list", "params": {}},
    {"jsonrpc": "2.0", "id": 8, "method": "tools/list", "params": {"cursor": "not-a-cursor-of-ours"}},
    {"jsonrpc": "2.0", "id": 9, "method": "ping"},
    {"jsonrpc": "2.0", "method": "notifications/initialized"},
    {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 12345, "reason": "changed my mind"}},
]


@pytest.mark.parametrize("version", VERSIONS)
async def test_listings_pings_and_notices_of_a_session_are_answered_as_the_sdk_answers_them(served: OneUpstream, version: str) -> None:
    sessions = served.gw.endpoint.sessions
    with anyio.fail_after(20):
        async with httpx2.AsyncClient(timeout=10) as http:
            opened = await _initialize(http, served, version)
            session = opened.headers["mcp-session-id"]
            for body in REQUESTS:
                sdk = _seen(await http.post(served.gw.url, json=body, headers=_headers(served.token, version)))
                before = sessions.served
                ours = _seen(await http.post(served.gw.url, json=body, headers=_headers(served.token, version, session)))
                assert ours == sdk, body
                assert sessions.served == before + 1, f"{body}: expected the session layer to answer"


async def _both_ways(served: OneUpstream, bodies: list[dict[str, Any]], version: str) -> tuple[list[tuple[Any, Any]], int]:
    """Each body sent without a session id (the SDK answers) and with one, at `version`: the answer
    pairs, and how many the session layer answered itself."""
    sessions = served.gw.endpoint.sessions
    pairs = []
    with anyio.fail_after(20):
        async with httpx2.AsyncClient(timeout=10) as http:
            session = (await _initialize(http, served, VERSIONS[0])).headers["mcp-session-id"]
            before = sessions.served
            for body in bodies:
                sdk = _seen(await http.post(served.gw.url, json=body, headers=_headers(served.token, version)))
                ours = _seen(await http.post(served.gw.url, json=body, headers=_headers(served.token, version, session)))
                pairs.append((sdk, ours))
    return pairs, sessions.served - before


async def test_a_malformed_or_other_notice_is_left_to_the_sdk(served: OneUpstream) -> None:
    bodies = [{"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"reason": "no id"}},
              {"jsonrpc": "2.0", "method": "notifications/initialized", "params": 5},
              {"jsonrpc": "2.0", "id": True, "method": "ping"},
              {"jsonrpc": "2.0", "id": 3, "method": "tools/list", "params": {"cursor": 7}}]
    pairs, served_here = await _both_ways(served, bodies, VERSIONS[0])
    assert [ours for _, ours in pairs] == [sdk for sdk, _ in pairs]
    assert served_here == 0


@pytest.mark.parametrize("version", [*VERSIONS, "1999-01-01"])
async def test_initialize_is_answered_again_as_the_sdk_answered_it_first(served: OneUpstream, version: str) -> None:
    with anyio.fail_after(20):
        async with httpx2.AsyncClient(timeout=10) as http:
            answers = [await _initialize(http, served, version, request_id) for request_id in (1, "two", 3)]
            sessions = [a.headers["mcp-session-id"] for a in answers]
            called = [await http.post(served.gw.url, headers=_headers(served.token, None, s),
                                      json={"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "test_simple_text"}})
                      for s in sessions]
    (first, *later) = [_seen(a) for a in answers]
    for seen, request_id in zip(later, ("two", 3)):
        assert seen[:2] == first[:2] == (200, "text/event-stream")
        assert seen[2] == [{**first[2][0], "id": request_id}]
    assert [h for h in answers[1].headers.items() if h[0] not in ("date", "mcp-session-id")] == \
        [h for h in answers[0].headers.items() if h[0] not in ("date", "mcp-session-id")]
    # A replayed answer still opens the session's own upstream sessions, where the upstream keeps them.
    carried = [_payload(s).get("up") for s in sessions]
    assert all(c is None for c in carried) or len(set(carried)) == 3
    assert all("This is a simple text response" in c.text for c in called)


async def test_delete_of_a_session_with_nothing_to_end_is_refused_as_the_sdk_refuses_it(served: OneUpstream) -> None:
    with anyio.fail_after(20):
        async with httpx2.AsyncClient(timeout=10) as http:
            sessions = [(await _initialize(http, served, VERSIONS[0])).headers["mcp-session-id"] for _ in range(2)]
            deleted = [await http.delete(served.gw.url, headers=_headers(served.token, VERSIONS[0], s)) for s in sessions]
    statuses = [d.status_code for d in deleted]
    if statuses[0] == 405:  # the stateless upstream: the SDK's refusal, then the same again
        assert [_seen(d) for d in deleted] == [_seen(deleted[0])] * 2
        assert _seen(deleted[0])[2]["error"]["code"] == -32600
    else:  # the session-keeping one: its sessions are ended, as it answers
        assert statuses == [200, 200]


async def test_a_new_config_is_answered_anew() -> None:
    configs = [object()]
    replayed = Replayed(lambda: configs[0])
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    keep = replayed.keeping("k", send)
    await keep({"type": "http.response.start", "status": 405, "headers": [(b"content-type", b"application/json")]})
    await keep({"type": "http.response.body", "body": b"{}"})
    assert await replayed.replay("k", send)
    configs[0] = object()  # a config swap: what was kept may no longer be the answer
    assert not await replayed.replay("k", send)


async def test_a_session_request_at_a_version_the_server_does_not_support_is_refused_as_the_sdk_refuses_it(served: OneUpstream) -> None:
    """The protocol asks for 400 to a request naming an unsupported version: the session layer leaves those to the SDK."""
    bodies = [REQUESTS[0], REQUESTS[3], REQUESTS[4],
              {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "test_simple_text", "arguments": {}}}]
    pairs, served_here = await _both_ways(served, bodies, "1999-01-01")
    assert all(ours == sdk and ours[0] == 400 for sdk, ours in pairs), pairs
    assert served_here == 0
