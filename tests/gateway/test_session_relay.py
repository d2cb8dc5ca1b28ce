"""A session-era agent gets the upstream's questions mid-call, and its answers reach the upstream.

The agent is the SDK `Client` in legacy mode (2025-11-25) with elicitation and
sampling callbacks; the upstream is the conformance fixture, reached two ways:

- speaking the session protocol only (tests/support/eras.py): its tools ask
  mid-stream (`elicitation/create`, `sampling/createMessage` on the call's
  stream), and the gateway sends the agent those requests and posts its answers
  back on the upstream session;
- speaking 2026-07-28 only (refusing `initialize`): its tools return
  `inputRequests`, which the gateway asks the agent one by one and answers on
  the retry, round after round.

And the session id: issued at `initialize`, carrying what the client declared,
refused when another user presents it or when this server did not sign it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from portcullis.serve import LocalGateway
from tests.support.eras import modern_only, session_protocol_only
from tests.support.one_upstream import OneUpstream, one_upstream
from tests.support.servers import load_example, run_asgi

pytestmark = pytest.mark.anyio
fixture = load_example("examples/fixture/server.py")
UPSTREAM_ERAS = ("session", "2026-07-28")

TOOLS = ["test_elicitation", "test_sampling", "test_simple_text", "test_input_required_result_multi_round", "test_input_required_result_sampling"]


@dataclass
class Stack:
    served: OneUpstream
    era: str

    @property
    def gw(self) -> LocalGateway:
        return self.served.gw

    def mint(self, user: str = "ada@example.com") -> str:
        return self.served.mint(user)


@pytest.fixture(scope="module", params=UPSTREAM_ERAS)
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    app = fixture.build_app()
    app = session_protocol_only(app) if request.param == "session" else modern_only(app)
    with run_asgi(app) as url, one_upstream(url, TOOLS, tmp_path_factory.mktemp("relay")) as served:
        yield Stack(served, request.param)


@dataclass
class Person:
    """The user at the agent's client: answers what it is asked, and remembers it."""

    asked: list[str]

    async def elicit(self, context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        self.asked.append(f"elicitation: {params.message}")
        return types.ElicitResult(action="accept", content={"response": "yes", "name": "Ada", "color": "blue"})

    async def sample(self, context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        self.asked.append("sampling")
        return types.CreateMessageResult(role="assistant", content=types.TextContent(text="sampled words"), model="test-model")


def session_client(url: str, token: str, person: Person, http: httpx2.AsyncClient) -> Client:
    return Client(
        streamable_http_client(url, http_client=http), mode="legacy", elicitation_callback=person.elicit, sampling_callback=person.sample
    )


def text(result: Any) -> str:
    return " ".join(getattr(c, "text", "") for c in result.content)


async def test_an_elicitation_reaches_the_agent_and_its_answer_the_upstream(stack: Stack) -> None:
    person = Person([])
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {stack.mint()}"}, timeout=30) as http:
        async with session_client(stack.gw.url, "", person, http) as client:
            with anyio.fail_after(20):
                if stack.era == "session":
                    result = await client.call_tool("test_elicitation", {"message": "Proceed?"})
                    assert not result.is_error, text(result)
                    assert "yes" in text(result)
                    assert person.asked == ["elicitation: Proceed?"]
                else:
                    result = await client.call_tool("test_input_required_result_multi_round", {})
                    assert text(result) == "Multi-round complete for Ada who likes blue"
                    assert len(person.asked) >= 2 and all(a.startswith("elicitation: ") for a in person.asked)


async def test_a_sampling_request_reaches_the_agent(stack: Stack) -> None:
    person = Person([])
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {stack.mint()}"}, timeout=30) as http:
        async with session_client(stack.gw.url, "", person, http) as client:
            with anyio.fail_after(20):
                tool = "test_sampling" if stack.era == "session" else "test_input_required_result_sampling"
                result = await client.call_tool(tool, {"prompt": "Say something"})
    assert not result.is_error, text(result)
    assert "sampled words" in text(result)
    assert person.asked == ["sampling"]


async def test_a_client_that_declared_nothing_is_served_as_before(stack: Stack) -> None:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {stack.mint()}"}, timeout=30) as http:
        async with Client(streamable_http_client(stack.gw.url, http_client=http), mode="legacy") as client:
            with anyio.fail_after(20):
                assert text(await client.call_tool("test_simple_text", {})) == "This is a simple text response for testing."


async def _initialize(url: str, token: str, capabilities: dict[str, Any]) -> httpx2.Response:
    body = {
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": capabilities, "clientInfo": {"name": "t", "version": "1"}},
    }
    async with httpx2.AsyncClient(timeout=10) as http:
        return await http.post(
            url, json=body, headers={"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
        )


async def _list(url: str, token: str, session_id: str) -> httpx2.Response:
    async with httpx2.AsyncClient(timeout=10) as http:
        return await http.post(
            url,
            json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
            headers={
                "Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream",
                "Mcp-Session-Id": session_id, "MCP-Protocol-Version": "2025-11-25",
            },
        )


async def test_a_session_id_is_issued_at_initialize_and_bound_to_its_user(stack: Stack) -> None:
    ada, bob = stack.mint("ada@example.com"), stack.mint("bob@example.com")
    opened = await _initialize(stack.gw.url, ada, {"elicitation": {"form": {}}})
    assert opened.status_code == 200
    session_id = opened.headers["mcp-session-id"]
    assert all(0x21 <= ord(c) <= 0x7E for c in session_id)  # visible ASCII, as the transport requires

    assert (await _list(stack.gw.url, ada, session_id)).status_code == 200
    stolen = await _list(stack.gw.url, bob, session_id)
    assert stolen.status_code == 403
    assert "another user" in stolen.json()["error"]["message"]
    forged = await _list(stack.gw.url, ada, session_id[:-4] + ("AAAA" if not session_id.endswith("AAAA") else "BBBB"))
    assert forged.status_code == 404
    assert (await _list(stack.gw.url, ada, "not-a-session")).status_code == 404


async def test_an_answer_for_another_users_call_is_refused(stack: Stack) -> None:
    """An id the gateway gave a relayed request names its user: nobody else can answer it."""
    sessions = stack.gw.endpoint.sessions
    assert sessions is not None
    relay_id = sessions.ids.relay_id("", "ada@example.com")
    bob = stack.mint("bob@example.com")
    opened = await _initialize(stack.gw.url, bob, {"elicitation": {"form": {}}})
    async with httpx2.AsyncClient(timeout=10) as http:
        answer = await http.post(
            stack.gw.url,
            content=json.dumps({"jsonrpc": "2.0", "id": relay_id, "result": {"action": "accept", "content": {}}}),
            headers={
                "Authorization": f"Bearer {bob}", "Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                "Mcp-Session-Id": opened.headers["mcp-session-id"], "MCP-Protocol-Version": "2025-11-25",
            },
        )
    assert answer.status_code == 403
