"""A session-era agent's upstream sessions are the same on every replica (gateway/upstream_sessions.py).

At `initialize` the replica answering it opens the agent's upstream session and
seals its id into the agent's session id; every replica then sends that agent's
requests on it, the one holding the agent's GET stream holds the upstream
session's, and DELETE ends it. What is checked here:

- the seal itself (session_ids.py `UpstreamSessionSeal`): it opens only for
  its tenant, server and user, under the signing keys it was made with, and a
  session id carries a bounded amount of it;
- against a session-protocol upstream written for this test (`SessionUpstream`,
  which shows what reached it, per session, and lets the test speak on a
  session's GET stream), two gateways on one state directory, each reached at
  its own address: one upstream session per agent session whichever replica
  serves; setLevel and subscribe through one replica, the stream on the other;
  only what the agent may see is relayed; a question on the stream is answered
  through the other replica; DELETE; an upstream that forgets the session or
  refuses to open one;
- with two `portcullis serve` processes in front of the official everything
  server, the SDK client's GET stream on one and every POST on the other: the
  level set and the resource subscribed through the one apply to what arrives on
  the other.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
import yaml
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPDeprecationWarning
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from portcullis.gateway.audit import MemoryAuditSink
from portcullis.gateway.identity.tokens import SigningKeys, TokenError
from portcullis.gateway.session_ids import MAX_UPSTREAM_SESSIONS_BYTES, SessionIds, UpstreamSession, UpstreamSessionSeal
from portcullis.serve import LocalGateway, local_gateway
from tests.support.foreign import Catalog, everything_missing, everything_server
from tests.support.foreign import manifests as foreign_manifests
from tests.support.one_upstream import mint
from tests.support.round_robin import replica, round_robin_proxy, serve_argv
from tests.support.servers import run_asgi

pytestmark = pytest.mark.anyio

SESSION_ERA = "2025-11-25"
SHOWN, HIDDEN = "note://shown", "note://hidden"
WAIT = 10.0  # any one thing a test waits for


# --- the seal ---------------------------------------------------------------------------------


def a_seal(keys: SigningKeys, tenant: str = "acme", server: str = "http://gw/mcp") -> UpstreamSessionSeal:
    return UpstreamSessionSeal(lambda: keys, lambda: server, lambda: tenant)


def test_sealed_upstream_sessions_open_only_for_their_tenant_server_and_user() -> None:
    keys = SigningKeys.generate()
    sessions = [UpstreamSession("inbox", "5f0c-upstream-secret", "http://inbox/mcp"), UpstreamSession("crm", "s-2", "http://crm/mcp")]
    sealed, carried = a_seal(keys).seal("ada", sessions)
    assert sealed is not None and carried == sessions
    assert "upstream-secret" not in sealed
    assert [entry[:2] for entry in a_seal(keys).open("ada", sealed)] == [("inbox", "5f0c-upstream-secret"), ("crm", "s-2")]
    for other in (a_seal(keys, tenant="globex"), a_seal(keys, server="http://other/mcp"), a_seal(SigningKeys.generate())):
        with pytest.raises(TokenError):
            other.open("ada", sealed)
    with pytest.raises(TokenError):
        a_seal(keys).open("bob", sealed)
    kid, _, body = sealed.partition(".")
    flipped = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1]
    with pytest.raises(TokenError):
        a_seal(keys).open("ada", f"{kid}.{flipped}")


def test_a_seal_made_before_a_rotation_opens_until_its_key_is_pruned() -> None:
    keys = SigningKeys.generate(now=1000)
    sealed, _ = a_seal(keys).seal("ada", [UpstreamSession("inbox", "s-1", "http://inbox/mcp")])
    assert sealed is not None
    rotated = keys.rotate(now=2000)
    assert a_seal(rotated).open("ada", sealed)[0][1] == "s-1"
    with pytest.raises(TokenError):
        a_seal(rotated.prune(now=10_000, keep_seconds=60)).open("ada", sealed)


def test_a_session_id_carries_a_bounded_amount_of_upstream_sessions() -> None:
    keys = SigningKeys.generate()
    many = [UpstreamSession(f"connection-{i:03}", "x" * 200, f"http://up-{i}/mcp") for i in range(40)]
    many.append(UpstreamSession("odd", "no spaces allowed", "http://odd/mcp"))  # not a transport-valid id
    sealed, carried = a_seal(keys).seal("ada", many)
    assert sealed is not None and 0 < len(carried) < 40 and all(s.connection != "odd" for s in carried)
    assert len(json.dumps([[s.connection, s.session_id, "0" * 16] for s in carried])) <= MAX_UPSTREAM_SESSIONS_BYTES
    ids = SessionIds(lambda: keys, lambda: "http://gw/mcp")
    session_id = ids.issue_session("ada", SESSION_ERA, {}, sealed)
    assert session_id is not None and len(session_id) < 2 * MAX_UPSTREAM_SESSIONS_BYTES + 1024
    assert ids.open_session(session_id).sealed == sealed


# --- a session-protocol upstream that shows what reached it -------------------------------------------


@dataclass
class UpstreamSessionState:
    capabilities: dict[str, Any]
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    level: str | None = None
    subscriptions: set[str] = field(default_factory=set)


class SessionUpstream:
    """Speaks only the session protocol, keeps its sessions, and lets a test write on a session's GET stream.

    It runs on the server thread's own loop; the test reads its records (plain lists, appended
    under the GIL) and pushes messages with `push`, which hands them to that loop.
    """

    def __init__(self) -> None:
        self.sessions: dict[str, UpstreamSessionState] = {}
        self.deleted: list[str] = []
        self.answers: list[tuple[str, dict[str, Any]]] = []
        self.delete_status = 200
        self.refuse_agents = False  # answer an agent session's initialize with 500
        self.stale = ""  # an Authorization value the GET stream answers 401 (an expired token)
        self.streams_refused = 0
        self._ids = itertools.count(1)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[dict[str, Any]]]] = {}
        self._lock = threading.Lock()

    def agent_sessions(self) -> list[str]:
        """The sessions opened for agents (the gateways' listing sessions declare sampling; these agents do not)."""
        return [sid for sid, state in list(self.sessions.items()) if "sampling" not in state.capabilities]

    def push(self, session_id: str, message: dict[str, Any]) -> None:
        with self._lock:
            loop, queue = self._streams[session_id]
        loop.call_soon_threadsafe(queue.put_nowait, {"jsonrpc": "2.0", **message})

    def app(self) -> Starlette:
        async def post(request: Request) -> Response:
            body = json.loads(await request.body())
            rid, method, params = body.get("id"), body.get("method"), body.get("params") or {}
            if method == "server/discover":
                return JSONResponse({"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": "Method not found"}}, status_code=400)
            if method == "initialize":
                capabilities = params.get("capabilities") or {}
                if self.refuse_agents and "sampling" not in capabilities:
                    return Response("no sessions today", status_code=500)
                session_id = f"upstream-session-{next(self._ids)}"
                self.sessions[session_id] = UpstreamSessionState(capabilities)
                opened = {"protocolVersion": SESSION_ERA, "serverInfo": {"name": "sessions", "version": "1"},
                          "capabilities": {"tools": {}, "resources": {"subscribe": True}, "logging": {}}}  # fmt: skip
                return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": opened}, headers={"mcp-session-id": session_id})
            state = self.sessions.get(request.headers.get("mcp-session-id", ""))
            if state is None:
                return Response("unknown session", status_code=404)
            if method is None:  # the client's answer to what we asked on the stream
                self.answers.append((request.headers["mcp-session-id"], body))
                return Response(status_code=202)
            if rid is None:
                return Response(status_code=202)
            state.requests.append((method, params))
            result: dict[str, Any] = {}
            if method == "tools/list":
                result = {"tools": [{"name": "echo", "inputSchema": {"type": "object"}}]}
            elif method == "resources/list":
                result = {"resources": [{"uri": SHOWN, "name": "shown"}, {"uri": HIDDEN, "name": "hidden"}]}
            elif method == "tools/call":
                result = {"content": [{"type": "text", "text": json.dumps(params.get("arguments", {}))}]}
            elif method == "logging/setLevel":
                state.level = params["level"]
            elif method == "resources/subscribe":
                state.subscriptions.add(params["uri"])
            elif method == "resources/unsubscribe":
                state.subscriptions.discard(params["uri"])
            return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": result})

        async def stream(request: Request) -> Response:
            session_id = request.headers.get("mcp-session-id", "")
            if session_id not in self.sessions:
                return Response("unknown session", status_code=404)
            if self.stale and request.headers.get("authorization") == self.stale:
                self.streams_refused += 1
                return Response("token expired", status_code=401)
            queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
            with self._lock:
                self._streams[session_id] = (asyncio.get_running_loop(), queue)

            async def events() -> AsyncIterator[bytes]:
                yield b": open\n\n"
                while True:
                    yield f"data: {json.dumps(await queue.get())}\n\n".encode()

            return StreamingResponse(events(), media_type="text/event-stream")

        async def delete(request: Request) -> Response:
            session_id = request.headers.get("mcp-session-id", "")
            self.deleted.append(session_id)
            if self.delete_status == 200:
                self.sessions.pop(session_id, None)
            return Response(status_code=self.delete_status)

        return Starlette(routes=[Route("/mcp", post, methods=["POST"]), Route("/mcp", stream, methods=["GET"]),
                                 Route("/mcp", delete, methods=["DELETE"])])  # fmt: skip


def manifests(url: str) -> list[dict[str, Any]]:
    meta = {"namespace": "acme"}
    return [
        {"apiVersion": "portcullis.dev/v1alpha1", "kind": "MCPConnection", "metadata": {"name": "up", **meta},
         "spec": {"url": url, "timeoutSeconds": 5, "credential": {"source": "none"}}},
        {"apiVersion": "portcullis.dev/v1alpha1", "kind": "VirtualMCPServer", "metadata": {"name": "s", **meta}},
        {"apiVersion": "portcullis.dev/v1alpha1", "kind": "ToolMapping", "metadata": {"name": "m", **meta},
         "spec": {"serverRef": {"name": "s"}, "connectionRef": {"name": "up"}, "tools": [{"name": "echo"}],
                  "resources": [{"uri": SHOWN}]}},
    ]  # fmt: skip


@dataclass
class Stack:
    upstream: SessionUpstream
    a: LocalGateway
    b: LocalGateway
    state: Path
    audit_b: MemoryAuditSink

    def mint(self, user: str = "ada@example.com") -> str:
        return mint(self.a, self.state, user)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Two gateways on one state directory (replicas: one public URL), each reached at its own address."""
    directory = tmp_path_factory.mktemp("session-upstreams")
    upstream = SessionUpstream()
    with ExitStack() as stack:
        url = stack.enter_context(run_asgi(upstream.app()))
        proxy = stack.enter_context(round_robin_proxy())  # only the public URL: the tests address each replica
        (directory / "m.yaml").write_text(yaml.safe_dump_all(manifests(url)))
        audits = [MemoryAuditSink(), MemoryAuditSink()]
        a, b = (
            stack.enter_context(local_gateway([directory / "m.yaml"], state_dir=directory / "state", port=0, admin_port=0,
                                              audit=audit, public_url=proxy.url()))
            for audit in audits
        )  # fmt: skip
        yield Stack(upstream, a, b, directory / "state", audits[1])


# --- the agent, by hand ---------------------------------------------------------------------------


def headers(token: str, session_id: str | None = None) -> dict[str, str]:
    sent = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": SESSION_ERA}
    return {**sent, "Mcp-Session-Id": session_id} if session_id else sent


def last_message(answer: httpx2.Response) -> dict[str, Any]:
    body = answer.text
    message: dict[str, Any] = json.loads(body.split("data: ")[-1]) if body.startswith(("event", "data", ":")) else answer.json()
    return message


async def initialize(url: str, token: str, capabilities: dict[str, Any] | None = None) -> str:
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": SESSION_ERA, "capabilities": capabilities or {}, "clientInfo": {"name": "t", "version": "1"}}}  # fmt: skip
    async with httpx2.AsyncClient(timeout=WAIT) as http:
        opened = await http.post(url, json=body, headers=headers(token))
    assert opened.status_code == 200, opened.text
    return opened.headers["mcp-session-id"]


async def rpc(url: str, token: str, session_id: str, method: str, params: dict[str, Any], request_id: Any = 2) -> dict[str, Any]:
    async with httpx2.AsyncClient(timeout=WAIT) as http:
        answer = await http.post(url, json={"jsonrpc": "2.0", "id": request_id, "method": method, "params": params},
                                 headers=headers(token, session_id))  # fmt: skip
    assert answer.status_code == 200, answer.text
    return last_message(answer)


async def call(url: str, token: str, session_id: str, n: int) -> str:
    answer = await rpc(url, token, session_id, "tools/call", {"name": "echo", "arguments": {"n": n}})
    return str(answer["result"]["content"][0]["text"])


class AgentStream:
    """The agent's standalone GET stream on one replica: every message it brings, in order."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self._arrived = anyio.Event()

    def add(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        self._arrived.set()
        self._arrived = anyio.Event()

    async def until(self, done: Any) -> list[dict[str, Any]]:
        """The messages so far, once one satisfies `done` (fails past WAIT)."""
        with anyio.fail_after(WAIT):
            while not any(done(m) for m in self.messages):
                await self._arrived.wait()
        return list(self.messages)


@asynccontextmanager
async def agent_stream(url: str, token: str, session_id: str) -> AsyncIterator[AgentStream]:
    """Opens the GET stream and returns once the replica answered it (its upstream streams are open then)."""
    seen = AgentStream()
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(WAIT, read=None)) as http:
        async with http.stream("GET", url, headers=headers(token, session_id)) as response:
            assert response.status_code == 200

            async def read() -> None:
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        seen.add(json.loads(line[5:]))

            async with anyio.create_task_group() as group:
                group.start_soon(read)
                yield seen
                group.cancel_scope.cancel()


def new_agent_sessions(upstream: SessionUpstream, before: list[str]) -> list[str]:
    return [s for s in upstream.agent_sessions() if s not in before]


# --- one upstream session, whichever replica ---------------------------------------------------------


async def test_an_agent_session_gets_one_upstream_session_which_both_replicas_use(stack: Stack) -> None:
    token, before = stack.mint(), stack.upstream.agent_sessions()
    session_id = await initialize(stack.a.url, token, {"experimental": {"marker": {}}})
    (upstream_session,) = new_agent_sessions(stack.upstream, before)
    assert stack.upstream.sessions[upstream_session].capabilities == {"experimental": {"marker": {}}}
    for n, replica in enumerate((stack.b, stack.a, stack.b, stack.a)):
        assert await call(replica.url, token, session_id, n) == json.dumps({"n": n})
    assert new_agent_sessions(stack.upstream, before) == [upstream_session]  # no replica opened one of its own
    assert [p["arguments"]["n"] for m, p in stack.upstream.sessions[upstream_session].requests if m == "tools/call"] == [0, 1, 2, 3]


async def test_the_agent_never_sees_its_upstream_session_id(stack: Stack) -> None:
    token, before = stack.mint(), stack.upstream.agent_sessions()
    session_id = await initialize(stack.b.url, token)
    (upstream_session,) = new_agent_sessions(stack.upstream, before)
    payload = json.loads(base64.urlsafe_b64decode(session_id.split(".")[1] + "=="))
    assert "up" in payload and upstream_session not in session_id and upstream_session not in json.dumps(payload)
    sealed = payload["up"].partition(".")[2]
    assert upstream_session.encode() not in base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4))  # encrypted, not encoded


async def test_a_session_presented_with_another_users_token_is_refused(stack: Stack) -> None:
    session_id = await initialize(stack.a.url, stack.mint("ada@example.com"))
    async with httpx2.AsyncClient(timeout=WAIT) as http:
        for method in ("POST", "GET", "DELETE"):
            answer = await http.request(method, stack.b.url, headers=headers(stack.mint("bob@example.com"), session_id),
                                        json={"jsonrpc": "2.0", "id": 1, "method": "ping"} if method == "POST" else None)  # fmt: skip
            assert answer.status_code == 403, (method, answer.text)
    assert stack.upstream.deleted.count(session_id) == 0


# --- state a session changes after it opened, through the other replica ------------------------------------


async def test_set_level_and_subscribe_through_one_replica_apply_to_the_stream_the_other_holds(stack: Stack) -> None:
    token, before = stack.mint(), stack.upstream.agent_sessions()
    session_id = await initialize(stack.a.url, token)
    (upstream_session,) = new_agent_sessions(stack.upstream, before)
    async with agent_stream(stack.a.url, token, session_id) as stream:
        audited = len(stack.audit_b.events)
        assert await rpc(stack.b.url, token, session_id, "logging/setLevel", {"level": "warning"}) == {"jsonrpc": "2.0", "id": 2, "result": {}}
        assert (await rpc(stack.b.url, token, session_id, "resources/subscribe", {"uri": SHOWN}))["result"] == {}
        state = stack.upstream.sessions[upstream_session]
        assert state.level == "warning" and state.subscriptions == {SHOWN}
        events = list(stack.audit_b.events)[audited:]  # one event each, like any request on the call path
        assert [(e.method, e.tool, e.connection, e.outcome) for e in events] == [
            ("logging/setLevel", "warning", "up", "ok"), ("resources/subscribe", SHOWN, "up", "ok"),
        ], events

        # What the upstream says on that session's stream, the agent hears on its own, through a.
        for message in (
            {"method": "notifications/resources/updated", "params": {"uri": HIDDEN}},  # not exposed: not the agent's
            {"method": "notifications/resources/updated", "params": {"uri": SHOWN}},
            {"method": "notifications/progress", "params": {"progressToken": 1, "progress": 1}},  # no call of the agent's
            {"method": "notifications/message", "params": {"level": "warning", "data": "from the upstream"}},
        ):
            stack.upstream.push(upstream_session, message)
        seen = await stream.until(lambda m: m.get("method") == "notifications/message")
        assert [(m["method"], m["params"]) for m in seen] == [
            ("notifications/resources/updated", {"uri": SHOWN}),
            ("notifications/message", {"level": "warning", "data": "from the upstream"}),
        ]
        # A list change becomes the gateway's own notice (its lists are filtered): refetch, not the upstream's words.
        stack.upstream.push(upstream_session, {"method": "notifications/tools/list_changed", "params": {"_meta": {"x": 1}}})
        told = await stream.until(lambda m: m.get("method") == "notifications/tools/list_changed")
        assert told[-1] == {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}

        assert (await rpc(stack.b.url, token, session_id, "resources/unsubscribe", {"uri": SHOWN}))["result"] == {}
        assert state.subscriptions == set()


async def test_a_resource_the_server_does_not_expose_cannot_be_subscribed_to(stack: Stack) -> None:
    token, before = stack.mint(), stack.upstream.agent_sessions()
    session_id = await initialize(stack.a.url, token)
    (upstream_session,) = new_agent_sessions(stack.upstream, before)
    refused = await rpc(stack.b.url, token, session_id, "resources/subscribe", {"uri": HIDDEN})
    assert refused["error"]["code"] == -32602 and "Resource not found" in refused["error"]["message"], refused
    bad = await rpc(stack.b.url, token, session_id, "logging/setLevel", {"level": "loud"})
    assert bad["error"]["code"] == -32602, bad
    assert stack.upstream.sessions[upstream_session].requests == []


async def test_a_question_on_the_upstream_stream_is_asked_of_the_agent_and_answered_through_the_other_replica(stack: Stack) -> None:
    token, before = stack.mint(), stack.upstream.agent_sessions()
    session_id = await initialize(stack.a.url, token, {"roots": {}})
    (upstream_session,) = new_agent_sessions(stack.upstream, before)
    async with agent_stream(stack.a.url, token, session_id) as stream:
        stack.upstream.push(upstream_session, {"id": "ping-1", "method": "ping"})  # answered by the gateway itself
        stack.upstream.push(upstream_session, {"id": "ask-1", "method": "roots/list", "params": {}})
        stack.upstream.push(upstream_session, {"id": "ask-2", "method": "sampling/createMessage", "params": {}})  # not declared
        (asked,) = [m for m in await stream.until(lambda m: m.get("method") == "roots/list") if m.get("method") == "roots/list"]
        assert asked["id"].startswith("portcullis-relay:")
        answer = {"jsonrpc": "2.0", "id": asked["id"], "result": {"roots": [{"uri": "file:///work", "name": "work"}]}}
        async with httpx2.AsyncClient(timeout=WAIT) as http:  # posted to b; a holds the stream and the question
            posted = await http.post(stack.b.url, json=answer, headers=headers(token, session_id))
        assert posted.status_code == 202, posted.text
        with anyio.fail_after(WAIT):
            while len([a for s, a in stack.upstream.answers if s == upstream_session]) < 3:
                await anyio.sleep(0.01)  # the upstream runs on its own thread: its records are polled
    answers = {a["id"]: a for s, a in stack.upstream.answers if s == upstream_session}
    assert answers["ping-1"]["result"] == {}
    assert answers["ask-1"]["result"] == {"roots": [{"uri": "file:///work", "name": "work"}]}
    assert answers["ask-2"]["error"]["code"] == -32601


async def test_a_401_on_the_upstream_stream_renews_the_credential_once_and_the_stream_is_held(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OAuth access token that expired while the agent's stream was away: the stream's 401 renews it
    once (as a call's does), and the upstream's messages flow again. The credential layer is stood in
    for here (its OAuth renewal is tested end to end in test_connected_accounts.py)."""
    stale, fresh = {"authorization": "Bearer stale"}, {"authorization": "Bearer renewed"}
    renewals: list[Any] = []

    async def headers_now(user: str, connection: str) -> dict[str, str]:
        return fresh if renewals else stale

    async def rejected(user: str, connection: str, sent: Any) -> dict[str, str]:
        renewals.append(sent)
        return fresh

    token, before = stack.mint(), stack.upstream.agent_sessions()
    session_id = await initialize(stack.a.url, token)
    (upstream_session,) = new_agent_sessions(stack.upstream, before)
    monkeypatch.setattr(stack.a.gateway.credentials, "headers", headers_now)
    monkeypatch.setattr(stack.a.gateway.credentials, "rejected", rejected)
    monkeypatch.setattr(stack.upstream, "stale", stale["authorization"])
    async with agent_stream(stack.a.url, token, session_id) as stream:
        stack.upstream.push(upstream_session, {"method": "notifications/message", "params": {"level": "info", "data": "back"}})
        await stream.until(lambda m: m.get("params", {}).get("data") == "back")
    assert renewals == [stale] and stack.upstream.streams_refused == 1


# --- ending, forgetting, refusing ------------------------------------------------------------------------


async def test_delete_ends_the_upstream_session_and_a_forgotten_one_is_replaced_on_each_replica(stack: Stack) -> None:
    token, before = stack.mint(), stack.upstream.agent_sessions()
    session_id = await initialize(stack.a.url, token)
    (upstream_session,) = new_agent_sessions(stack.upstream, before)
    async with httpx2.AsyncClient(timeout=WAIT) as http:
        deleted = await http.delete(stack.b.url, headers=headers(token, session_id))
    assert deleted.status_code == 200 and stack.upstream.deleted[-1] == upstream_session
    assert upstream_session not in stack.upstream.sessions
    # The gateway's own id holds no state to revoke: it still works, on a fresh upstream session of the replica's.
    assert await call(stack.a.url, token, session_id, 7) == json.dumps({"n": 7})
    (fallback,) = new_agent_sessions(stack.upstream, [*before, upstream_session])
    assert stack.upstream.sessions[fallback].requests[-1][0] == "tools/call"


async def test_delete_answers_what_the_upstream_answers(stack: Stack) -> None:
    token = stack.mint()
    session_id = await initialize(stack.a.url, token)
    stack.upstream.delete_status = 405
    try:
        async with httpx2.AsyncClient(timeout=WAIT) as http:
            assert (await http.delete(stack.a.url, headers=headers(token, session_id))).status_code == 405
    finally:
        stack.upstream.delete_status = 200


async def test_an_upstream_that_opens_no_session_at_initialize_leaves_the_agent_on_each_replicas_own(stack: Stack) -> None:
    token, before = stack.mint(), stack.upstream.agent_sessions()
    stack.upstream.refuse_agents = True
    try:
        session_id = await initialize(stack.a.url, token)
    finally:
        stack.upstream.refuse_agents = False
    payload = json.loads(base64.urlsafe_b64decode(session_id.split(".")[1] + "=="))
    assert "up" not in payload and new_agent_sessions(stack.upstream, before) == []
    assert await call(stack.b.url, token, session_id, 1) == json.dumps({"n": 1})
    assert await call(stack.a.url, token, session_id, 2) == json.dumps({"n": 2})
    assert len(new_agent_sessions(stack.upstream, before)) == 2  # one per replica, as before this existed
    async with httpx2.AsyncClient(timeout=WAIT) as http:  # nothing the gateway could end: it does not let sessions end
        assert (await http.delete(stack.a.url, headers=headers(token, session_id))).status_code == 405


# --- two gateway processes in front of the everything server ----------------------------------------------


class ByMethod(httpx2.AsyncBaseTransport):
    """Sends the session's GET stream to one replica and every POST and DELETE to the other, as a
    balancer with no stickiness may; remembers where each request went."""

    def __init__(self, stream_to: str, requests_to: str):
        self._inner = httpx2.AsyncHTTPTransport()
        self._to = {"GET": httpx2.URL(stream_to), "other": httpx2.URL(requests_to)}
        self.sent: list[tuple[str, str]] = []
        self.stream_open = anyio.Event()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        target = self._to.get(request.method, self._to["other"])
        request.url = target
        request.headers["host"] = target.netloc.decode()
        self.sent.append((request.method, str(target)))
        response = await self._inner.handle_async_request(request)
        if request.method == "GET" and response.status_code == 200:
            self.stream_open.set()  # the replica answers once it holds the upstream session's stream
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


@contextmanager
def everything_behind_two_replicas(workdir: Path) -> Iterator[tuple[str, list[Any], Any]]:
    everything = everything_server()
    with everything as server, round_robin_proxy() as proxy, ExitStack() as stack:
        catalog = Catalog(("echo", "toggle-simulated-logging", "toggle-subscriber-updates"), (), (ARCHITECTURE,), ())
        path = workdir / "everything.yaml"
        path.write_text(yaml.safe_dump_all(foreign_manifests("everything", server.url, catalog, timeout_seconds=10)))
        replicas = [stack.enter_context(replica(n, serve_argv([str(path)], str(workdir / "state"), url=proxy.url()))) for n in "ab"]
        yield proxy.url(), replicas, server


ARCHITECTURE = "demo://resource/static/document/architecture.md"
_RANK = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")


@pytest.mark.interop
@pytest.mark.skipif(everything_missing() is not None, reason=str(everything_missing()))
async def test_two_processes_the_stream_on_one_is_told_what_the_level_and_subscription_set_through_the_other_cause(tmp_path: Path) -> None:
    import warnings

    with everything_behind_two_replicas(tmp_path) as (public, (a, b), everything):
        token = mint(a.admin, tmp_path / "state", "ada@example.com")
        logs: list[dict[str, Any]] = []
        updated: list[str] = []
        arrived = anyio.Event()

        async def on_log(params: types.LoggingMessageNotificationParams) -> None:
            nonlocal arrived
            logs.append({"level": params.level, "data": str(params.data)})
            arrived.set()
            arrived = anyio.Event()

        async def on_message(message: Any) -> None:
            nonlocal arrived
            if getattr(message, "method", None) == "notifications/resources/updated":
                updated.append(str(message.params.uri))
                arrived.set()
                arrived = anyio.Event()

        async def until(done: Any) -> None:
            with anyio.fail_after(WAIT):
                while not done():
                    await arrived.wait()

        routing = ByMethod(stream_to=a.mcp, requests_to=b.mcp)
        mark = len(everything.observed)
        with anyio.fail_after(45), warnings.catch_warnings():
            warnings.simplefilter("ignore", MCPDeprecationWarning)  # setLevel and subscribe are the session era's
            async with httpx2.AsyncClient(transport=routing, headers={"Authorization": f"Bearer {token}"}, timeout=WAIT) as http:
                async with Client(streamable_http_client(public, http_client=http), mode="legacy",
                                  logging_callback=on_log, message_handler=on_message) as agent:  # fmt: skip
                    with anyio.fail_after(WAIT):
                        await routing.stream_open.wait()
                    await agent.set_logging_level("error")
                    await agent.subscribe_resource(ARCHITECTURE)  # acknowledged at info: below the level, not sent
                    await agent.call_tool("toggle-simulated-logging", {})  # one line at once, at a random level
                    await agent.call_tool("toggle-simulated-logging", {})
                    await agent.call_tool("toggle-subscriber-updates", {})  # the first update at once
                    await until(lambda: ARCHITECTURE in updated)
                    await agent.call_tool("toggle-subscriber-updates", {})
                    await agent.set_logging_level("info")
                    await agent.unsubscribe_resource(ARCHITECTURE)  # acknowledged at info: sent now
                    await until(lambda: any("Unsubscribe" in log["data"] for log in logs))

        assert updated[:1] == [ARCHITECTURE]
        before_ack = logs[: next(i for i, log in enumerate(logs) if "Unsubscribe" in log["data"])]
        assert all(_RANK.index(log["level"]) >= _RANK.index("error") for log in before_ack), logs
        assert not any("Received Subscribe" in log["data"] for log in logs), logs
        assert {m for m, _ in routing.sent if m != "GET"} <= {"POST", "DELETE"}
        assert {u for m, u in routing.sent if m == "GET"} == {a.mcp} and {u for m, u in routing.sent if m != "GET"} == {b.mcp}
        # Every request of the agent reached the everything server on one session, and the client's DELETE ended it.
        asked = ("tools/call", "resources/subscribe", "resources/unsubscribe", "logging/setLevel")
        mine = [o for o in list(everything.observed)[mark:] if o["method"] in asked]
        assert len(mine) == 8 and len({o["session"] for o in mine}) == 1, mine
        ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        async with httpx2.AsyncClient(timeout=WAIT) as http:  # asked directly: the upstream knows no such session now
            gone = await http.post(everything.url, json=ping, headers={**headers("", mine[0]["session"]), "Authorization": ""})
        assert gone.status_code == 400, gone.text  # the everything server's answer to a session it does not know
