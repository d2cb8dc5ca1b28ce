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
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
import yaml
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from portcullis.gateway.audit import MemoryAuditSink
from portcullis.gateway.local import admin_secret
from portcullis.serve import LocalGateway, local_gateway
from tests.support.eras import modern_only, session_protocol_only
from tests.support.one_upstream import OneUpstream, manifests, mint, one_upstream
from tests.support.round_robin import round_robin_proxy
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


async def test_a_2026_agent_is_asked_what_a_session_protocol_upstream_asks_mid_call(stack: Stack) -> None:
    """The bridge (gateway/bridge.py): the upstream's mid-stream question becomes `input_required`,
    the agent's retry carries the answer to the upstream call still waiting, and the call ends."""
    if stack.era != "session":
        pytest.skip("a 2026-07-28 upstream asks in its results already: nothing to bridge")
    person = Person([])
    audit_before = len(stack.served.audit.events)
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {stack.mint()}"}, timeout=30) as http:
        async with Client(
            streamable_http_client(stack.gw.url, http_client=http), mode="2026-07-28",
            elicitation_callback=person.elicit, sampling_callback=person.sample,
        ) as client:
            with anyio.fail_after(20):
                asked = await client.call_tool("test_elicitation", {"message": "Bridge?"})
                sampled = await client.call_tool("test_sampling", {"prompt": "Say something"})
    assert not asked.is_error and "yes" in text(asked), text(asked)
    assert not sampled.is_error and "sampled words" in text(sampled), text(sampled)
    assert person.asked == ["elicitation: Bridge?", "sampling"]
    # Each of the four requests (two calls, two retries) is one audit event.
    events = [e for e in list(stack.served.audit.events)[audit_before:] if e.method == "tools/call"]
    assert [(e.tool, e.outcome) for e in events] == [
        ("test_elicitation", "ok"), ("test_elicitation", "ok"), ("test_sampling", "ok"), ("test_sampling", "ok"),
    ], events


async def test_a_2026_agent_that_declared_nothing_is_not_bridged(stack: Stack) -> None:
    if stack.era != "session":
        pytest.skip("only session-protocol upstreams ask mid-stream")
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {stack.mint()}"}, timeout=30) as http:
        async with Client(streamable_http_client(stack.gw.url, http_client=http), mode="2026-07-28") as client:
            with anyio.fail_after(20):
                result = await client.call_tool("test_elicitation", {"message": "Anyone?"})
    # The upstream is told its client cannot be asked (as a client without the capability would say).
    assert "cannot reach this call's client" in text(result) or result.is_error, text(result)


async def test_a_bridged_answer_reaches_the_replica_holding_the_call(tmp_path: Path) -> None:
    """Two gateways on one state directory behind a balancer with no stickiness: a 2026-07-28
    agent's retry lands on the other replica, which passes it on to the one whose upstream call
    waits for it (sessions.py `pass_on`)."""
    app = session_protocol_only(fixture.build_app())
    person = Person([])
    with ExitStack() as stack:
        url = stack.enter_context(run_asgi(app))
        proxy = stack.enter_context(round_robin_proxy())
        (tmp_path / "m.yaml").write_text(yaml.safe_dump_all(manifests(url, TOOLS)))
        replicas = [
            stack.enter_context(
                local_gateway([tmp_path / "m.yaml"], state_dir=tmp_path / "state", port=0, admin_port=0,
                              audit=MemoryAuditSink(), public_url=proxy.url())
            )
            for _ in range(2)
        ]
        for name, replica in zip("ab", replicas, strict=True):
            proxy.proxy.add_backend(name, replica.url)
        token = mint(replicas[0], tmp_path / "state", "ada@example.com")
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
            async with Client(
                streamable_http_client(proxy.url(), http_client=http), mode="2026-07-28", elicitation_callback=person.elicit
            ) as client:
                with anyio.fail_after(30):
                    for _ in range(2):  # started once on each replica, so each time the retry lands on the other
                        result = await client.call_tool("test_elicitation", {"message": "Which replica?"})
                        assert not result.is_error and "yes" in text(result), text(result)
        calls = [e for e in proxy.proxy.settled() if e.rpc_method == "tools/call"]
    assert len(calls) == 4 and all(e.outcome == "ok" for e in calls), calls
    assert {(first.backend, retry.backend) for first, retry in zip(calls[::2], calls[1::2], strict=True)} == {("a", "b"), ("b", "a")}
    assert person.asked == ["elicitation: Which replica?"] * 2


async def test_both_eras_are_told_the_lists_announce_their_changes(stack: Stack) -> None:
    """Changes are told on `subscriptions/listen` (2026-07-28) and on a session's GET stream (the session era)."""
    token = stack.mint()
    opened = await _initialize(stack.gw.url, token, {})
    session_era = json.loads(opened.text.split("data: ", 1)[1]) if opened.text.startswith("event") else opened.json()
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
    async with httpx2.AsyncClient(timeout=10) as http:
        discovered = await http.post(
            stack.gw.url,
            json={"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta": meta}},
            headers={
                "Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream",
                "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "server/discover",
            },
        )
    modern = json.loads(discovered.text.split("data: ", 1)[1]) if discovered.text.startswith("event") else discovered.json()
    for answer in (session_era, modern):
        capabilities = answer["result"]["capabilities"]
        assert all(capabilities[kind]["listChanged"] is True for kind in ("tools", "prompts", "resources")), answer


async def _modern_call(url: str, token: str, name: str, arguments: dict[str, Any], **retry: Any) -> dict[str, Any]:
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {"elicitation": {"form": {}}},
    }
    params = {"name": name, "arguments": arguments, "_meta": meta, **retry}
    async with httpx2.AsyncClient(timeout=20) as http:
        answer = await http.post(
            url,
            json={"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": params},
            headers={
                "Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream",
                "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": name,
            },
        )
    body = answer.text
    message: dict[str, Any] = json.loads(body.split("data: ")[-1]) if body.startswith(("event", "data")) else answer.json()
    return message


async def test_only_the_user_who_was_asked_can_answer_a_bridged_question(stack: Stack) -> None:
    if stack.era != "session":
        pytest.skip("only session-protocol upstreams ask mid-stream")
    ada = stack.mint("ada@example.com")
    with anyio.fail_after(20):
        asked = await _modern_call(stack.gw.url, ada, "test_elicitation", {"message": "Who answers?"})
        assert asked["result"]["resultType"] == "input_required", asked
        state, (key,) = asked["result"]["requestState"], asked["result"]["inputRequests"]
        answer = {"inputResponses": {key: {"action": "accept", "content": {"response": "me"}}}, "requestState": state}
        scoped = httpx2.post(
            stack.gw.admin_url + "/v1/tokens", json={"user": "ada@example.com", "tools": ["test_simple_text"]},
            headers={"Authorization": f"Bearer {admin_secret(stack.served.state_dir)}"}, timeout=10,
        ).json()["token"]
        for intruder in (stack.mint("bob@example.com"), scoped):
            refused = await _modern_call(stack.gw.url, intruder, "test_elicitation", {"message": "Who answers?"}, **answer)
            assert refused["error"]["code"] == -32602, refused
        done = await _modern_call(stack.gw.url, ada, "test_elicitation", {"message": "Who answers?"}, **answer)
    assert "me" in json.dumps(done["result"]["content"]), done
