"""Any replica serves any request: two gateway processes behind a balancer with no stickiness.

The claim (gateway/endpoint.py): the gateway runs stateless (a session id is a
signed record, not a key into a replica's memory), keeps what replicas must agree
on (signing keys, revocations, sealed credentials) in shared state, so a load
balancer needs no sticky routing.
Here two real `portcullis serve` processes share one state directory - the way
pods share the cluster's storage - behind tests/support/round_robin.py, which
sends every HTTP request (not every connection) to the next replica and retries
nothing. The upstreams are the conformance fixture (examples/fixture/server.py)
and the example inbox, which takes a per-user credential.

What is and is not covered:

- 2026-07-28 (the SDK `Client` in that mode): lists, calls, prompts, resources,
  and multi-round-trip calls (SEP-2322). Those are stateless by design: the
  upstream seals its `requestState`, the client echoes it, and the gateway
  forwards both unchanged, so a retry may land on either replica; the test makes
  sure one does land on the other.
- 2025-11-25 (the SDK `Client` in legacy mode): the session id is a signed
  record of the session (gateway/sessions.py), so after `initialize` on one
  replica every later request may go to either; an upstream's question mid-call
  is answered by a POST that lands on the other replica and is passed on to the
  one holding the call (gateway/relay.py).
- A replica killed with SIGKILL mid-run: the calls in flight on it fail and
  nothing else does; calls after the balancer dropped it succeed on the survivor.

Every replica is started with `portcullis serve --url` set to the balancer's URL:
that URL is the audience of the session tokens, so replicas given one URL accept
each other's tokens, as pods behind one Service do. A replica started without
`--url` takes its own bound address as the audience and refuses theirs
(test_replicas_share_tokens_only_when_started_with_one_url).
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
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

from portcullis.gateway.local import admin_secret
from tests.gateway.conftest import inbox
from tests.support.round_robin import Exchange, Replica, RunningProxy, replica, round_robin_proxy, serve_argv
from tests.support.servers import load_example, run_asgi

pytestmark = pytest.mark.anyio
fixture = load_example("examples/fixture/server.py")

NAMESPACE = "acme"
SERVER = "anywhere"
INBOX_SECRET = "any-replica-inbox-token"
MODERN, SESSION_ERA = "2026-07-28", "2025-11-25"
REVOCATION_DEADLINE = 5.0  # "every replica honours it within seconds" (DESIGN.md)


def manifests(fixture_url: str, inbox_url: str | None) -> list[dict[str, Any]]:
    """All of the fixture (no credential) and, with `inbox_url`, two inbox tools (a per-user credential)."""
    meta = {"namespace": NAMESPACE}
    documents: list[dict[str, Any]] = [
        {"apiVersion": "portcullis.dev/v1alpha1", "kind": "MCPConnection", "metadata": {"name": "fixture", **meta},
         "spec": {"url": fixture_url, "timeoutSeconds": 10, "credential": {"source": "none"}}},
        {"apiVersion": "portcullis.dev/v1alpha1", "kind": "MCPConnection", "metadata": {"name": "inbox", **meta},
         "spec": {"url": inbox_url, "timeoutSeconds": 10, "credential": {"source": "user"}}},
        {"apiVersion": "portcullis.dev/v1alpha1", "kind": "VirtualMCPServer", "metadata": {"name": SERVER, **meta},
         "spec": {"sessionTokens": {"defaultTTL": "15m", "maxTTL": "1h"}}},
        {"apiVersion": "portcullis.dev/v1alpha1", "kind": "ToolMapping", "metadata": {"name": f"{SERVER}-fixture", **meta},
         "spec": {
             "serverRef": {"name": SERVER}, "connectionRef": {"name": "fixture"},
             "tools": [{"name": t.name} for t in [*fixture.TOOLS, *fixture.MRTR_TOOLS]],
             "prompts": [{"name": p.name} for p in [*fixture.PROMPTS, fixture.MRTR_PROMPT]],
             "resources": [{"uri": str(r.uri)} for r in fixture.RESOURCES],
             "resourceTemplates": [{"uriTemplate": t.uri_template} for t in fixture.TEMPLATES],
         }},
        {"apiVersion": "portcullis.dev/v1alpha1", "kind": "ToolMapping", "metadata": {"name": f"{SERVER}-inbox", **meta},
         "spec": {"serverRef": {"name": SERVER}, "connectionRef": {"name": "inbox"},
                  "tools": [{"name": "fetch_mails"}, {"name": "search_mails"}]}},
    ]
    return [d for d in documents if inbox_url is not None or "inbox" not in d["metadata"]["name"]]


# --- the stack: upstreams, balancer, replicas ------------------------------------------------


@dataclass
class Admin:
    """One replica's admin port, with the shared state directory's client secret."""

    url: str
    state: Path

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.url + path, data=None if body is None else json.dumps(body).encode(), method=method,
            headers={"Authorization": f"Bearer {admin_secret(self.state)}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def connect_inbox(self, user: str) -> None:
        status, answer = self.call("PUT", f"/v1/users/{user}/connections/inbox", {"secret": INBOX_SECRET})
        assert status == 204, answer

    def mint(self, user: str) -> dict[str, Any]:
        status, answer = self.call("POST", "/v1/tokens", {"user": user})
        assert status == 201, answer
        return dict(answer)


@dataclass
class Stack:
    proxy: RunningProxy
    replicas: dict[str, Replica]
    state: Path
    manifests: Path
    inbox_calls: Any  # the inbox example's CallRecord
    admins: dict[str, Admin] = field(init=False)

    def __post_init__(self) -> None:
        self.admins = {name: Admin(r.admin, self.state) for name, r in self.replicas.items()}

    @property
    def url(self) -> str:
        return self.proxy.url()

    def exchanges(self, since: int = 0) -> list[Exchange]:
        return [e for e in self.proxy.proxy.recorded() if e.id > since]

    async def settled(self) -> None:
        """Until the balancer has finished every exchange but the sessions' standing GET streams
        (a client may have its answer a moment before the balancer sees the end of the stream), bounded."""
        proxy = self.proxy.proxy
        with anyio.fail_after(5):
            while True:
                open_ids = set().union(*(proxy.in_flight(b.name) for b in proxy.backends))
                if not [e for e in proxy.recorded() if e.id in open_ids and not is_standalone_stream(e)]:
                    return
                await anyio.sleep(0.01)

    def last_id(self) -> int:
        recorded = self.proxy.proxy.recorded()
        return recorded[-1].id if recorded else 0

    def user(self, name: str) -> str:
        """A user with the inbox connected (through replica b), so that minting works."""
        user = f"{name}@example.com"
        self.admins["b"].connect_inbox(user)
        return user


@contextmanager
def two_replicas(workdir: Path) -> Iterator[Stack]:
    record = inbox.CallRecord()
    inbox_app = inbox.build_app(record=record, required_auth={f"Bearer {INBOX_SECRET}": "any-replica-user"})
    with run_asgi(fixture.build_app()) as fixture_url, run_asgi(inbox_app) as inbox_url, round_robin_proxy() as proxy, ExitStack() as stack:
        path = workdir / "manifests.yaml"
        path.write_text(yaml.safe_dump_all(manifests(fixture_url, inbox_url)))
        state = workdir / "state"
        replicas: dict[str, Replica] = {}
        for name in ("a", "b"):  # one after the other: the first creates the shared keys and secret
            replicas[name] = stack.enter_context(replica(name, serve_argv([str(path)], str(state), url=proxy.url())))
            proxy.proxy.add_backend(name, replicas[name].mcp)
        yield Stack(proxy, replicas, state, path, record)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One stack for the tests that leave both replicas running."""
    with two_replicas(tmp_path_factory.mktemp("any-replica")) as stack:
        yield stack


@asynccontextmanager
async def client(url: str, token: str, mode: str, **options: Any) -> AsyncIterator[Client]:
    """The SDK `Client` with a bearer token (options: elicitation_callback, read_timeout_seconds, ...)."""
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        async with Client(streamable_http_client(url, http_client=http), mode=mode, **options) as connected:
            yield connected


def is_standalone_stream(exchange: Exchange) -> bool:
    """A session's GET stream (list-change notices), open for as long as its session."""
    return exchange.http_method == "GET"


async def answer_form(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
    """The user of the 2026-07-28 client: answers every form the fixture asks for."""
    return types.ElicitResult(action="accept", content={"name": "Ada", "color": "blue", "context": "replicas"})


def text(result: Any) -> str:
    """The text of a tool result's content blocks."""
    return " ".join(getattr(c, "text", "") for c in result.content)


def first(items: Any, attribute: str = "text") -> Any:
    """`attribute` of the first message or resource content (prompts/get, resources/read)."""
    head = items[0]
    return getattr(getattr(head, "content", head), attribute)


def served_by(exchanges: list[Exchange]) -> set[str]:
    return {e.backend for e in exchanges}


def call_status(url: str, token: str, tool: str = "test_simple_text") -> int:
    """HTTP status of one raw 2026-07-28 tools/call (200 or 401), for polling."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": tool, "arguments": {},
        "_meta": {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}}}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json", "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": tool})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            assert b'"result"' in response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def refused_within(url: str, token: str, deadline: float) -> float:
    """Seconds until `url` answers 401 to `token` (fails the test past `deadline`)."""
    started = time.monotonic()
    with anyio.fail_after(deadline):
        while call_status(url, token) != 401:
            await anyio.sleep(0.02)
    return time.monotonic() - started


# --- mixed sequences, both eras --------------------------------------------------------------


async def test_both_eras_run_a_mixed_sequence_through_a_balancer_with_no_stickiness(shared: Stack) -> None:
    token = shared.admins["a"].mint(shared.user("mixed"))["token"]
    start = shared.last_id()
    with anyio.fail_after(30):
        async with client(shared.url, token, MODERN, elicitation_callback=answer_form) as modern:
            names = {t.name for t in (await modern.list_tools()).tools}
            assert {"test_simple_text", "test_input_required_result_multi_round", "search_mails"} <= names
            assert text(await modern.call_tool("test_simple_text", {})) == "This is a simple text response for testing."
            image = await modern.call_tool("test_image_content", {})
            assert first(image.content, "type") == "image" and first(image.content, "mime_type") == "image/png"
            failing = await modern.call_tool("test_error_handling", {})  # a tool error is relayed as a result
            assert failing.is_error and "intentionally" in text(failing)
            schema = await modern.call_tool("json_schema_2020_12_tool", {"name": "Ada", "contactMethod": "email", "email": "ada@example.com"})
            assert '"email":"ada@example.com"' in text(schema)
            assert not (await modern.call_tool("search_mails", {"query": "invoice"})).is_error
            prompt = await modern.get_prompt("test_prompt_with_arguments", {"arg1": "x", "arg2": "y"})
            assert first(prompt.messages) == "Prompt with arguments: arg1='x', arg2='y'"
            static = await modern.read_resource("test://static-text")
            assert first(static.contents) == "This is the content of the static text resource."
            templated = await modern.read_resource("test://template/42/data")
            assert json.loads(first(templated.contents))["id"] == "42"

            # Multi-round trip: three requests for one call, each answerable by either replica.
            before = shared.last_id()
            done = await modern.call_tool("test_input_required_result_multi_round", {})
            assert text(done) == "Multi-round complete for Ada who likes blue"
            rounds = [e for e in shared.exchanges(before) if e.rpc_method == "tools/call"][:3]
            assert len(rounds) == 3 and served_by(rounds) == {"a", "b"}, rounds
            prompted = await modern.get_prompt("test_input_required_result_prompt", {})
            assert first(prompted.messages) == "Prompt with context: replicas"
        await shared.settled()
        modern_exchanges = shared.exchanges(start)

        middle = shared.last_id()
        reported: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            reported.append(progress)

        async with client(shared.url, token, "legacy") as legacy:
            assert legacy.protocol_version == SESSION_ERA
            assert "test_simple_text" in {t.name for t in (await legacy.list_tools()).tools}
            assert text(await legacy.call_tool("test_simple_text", {})) == "This is a simple text response for testing."
            embedded = await legacy.call_tool("test_embedded_resource", {})
            assert first(embedded.content, "resource").text == "This is an embedded resource content."
            # Progress arrives on the answer's SSE stream, through the balancer, before the result.
            streamed = await legacy.call_tool("test_tool_with_progress", {}, progress_callback=on_progress)
            assert not streamed.is_error and reported == [0, 50, 100]
            assert not (await legacy.call_tool("fetch_mails", {"limit": 2})).is_error
            simple = await legacy.get_prompt("test_simple_prompt", {})
            assert first(simple.messages) == "This is a simple prompt for testing."
            binary = await legacy.read_resource("test://static-binary")
            assert first(binary.contents, "mime_type") == "image/png"
        await shared.settled()
        legacy_exchanges = shared.exchanges(middle)

    for era, exchanges in (("2026-07-28", modern_exchanges), ("2025-11-25", legacy_exchanges)):
        assert served_by(exchanges) == {"a", "b"}, f"{era}: one replica served everything"
        failed = [e for e in exchanges if e.outcome not in ("ok", "client_gone") and not is_standalone_stream(e)]
        assert not failed, f"{era}: {failed}"
    # Both inbox calls reached the upstream with the credential stored through replica b.
    assert [c.authorization for c in shared.inbox_calls.calls][-2:] == [f"Bearer {INBOX_SECRET}"] * 2


async def test_a_session_era_question_is_answered_through_whichever_replica_the_answer_reaches(shared: Stack) -> None:
    """The upstream asks mid-call; the agent's answer is a new POST, which the balancer sends to
    the other replica, which passes it on to the one holding the call (gateway/relay.py)."""
    token = shared.admins["a"].mint(shared.user("asked"))["token"]
    asked: list[str] = []

    async def answer(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"response": "through the other replica"})

    for _ in range(2):  # the call starts once on each replica: each time the answer lands on the other
        before = shared.last_id()
        with anyio.fail_after(30):
            async with client(shared.url, token, "legacy", elicitation_callback=answer) as legacy:
                result = await legacy.call_tool("test_elicitation", {"message": "Which replica?"})
        await shared.settled()
        assert not result.is_error and "through the other replica" in text(result), text(result)
        exchanges = shared.exchanges(before)
        call = next(e for e in exchanges if e.rpc_method == "tools/call")
        answers = [e for e in exchanges if e.http_method == "POST" and e.rpc_method is None and e.dispatched > call.dispatched]
        assert answers and answers[0].backend != call.backend, (call, answers)
        assert all(e.outcome in ("ok", "client_gone") for e in exchanges if not is_standalone_stream(e)), exchanges
    assert asked == ["Which replica?", "Which replica?"]



# --- shared identity state -------------------------------------------------------------------


async def test_a_token_minted_on_one_replica_is_accepted_by_the_other(shared: Stack) -> None:
    user = shared.user("carol")
    a, b = shared.replicas["a"], shared.replicas["b"]
    for minter, other in (("a", b), ("b", a)):
        token = shared.admins[minter].mint(user)["token"]
        with anyio.fail_after(15):
            async with client(other.mcp, token, MODERN) as direct:  # straight to the other replica
                assert text(await direct.call_tool("test_simple_text", {})) == "This is a simple text response for testing."


async def test_a_revocation_through_either_replica_is_honoured_by_the_other_within_seconds(shared: Stack) -> None:
    user = shared.user("dave")
    a, b = shared.replicas["a"], shared.replicas["b"]
    first = shared.admins["a"].mint(user)
    second = shared.admins["b"].mint(user)
    assert call_status(b.mcp, first["token"]) == call_status(a.mcp, second["token"]) == 200

    # One token, revoked through b: a refuses it; the user's other token still works.
    status, _ = shared.admins["b"].call("POST", "/v1/revocations", {"jti": first["jti"], "expiresAt": first["expiresAt"]})
    assert status == 200
    await refused_within(a.mcp, first["token"], REVOCATION_DEADLINE)
    assert call_status(b.mcp, first["token"]) == 401
    assert call_status(a.mcp, second["token"]) == 200

    # Every token of the user, revoked through a: b refuses the one b minted.
    status, _ = shared.admins["a"].call("POST", "/v1/revocations", {"user": user})
    assert status == 200
    await refused_within(b.mcp, second["token"], REVOCATION_DEADLINE)
    assert call_status(shared.url, second["token"]) == 401
    # A token minted afterwards, on either replica, works on both.
    fresh = shared.admins["b"].mint(user)["token"]
    assert call_status(a.mcp, fresh) == call_status(b.mcp, fresh) == 200


async def test_a_credential_stored_through_one_replica_is_used_and_forgotten_by_both(shared: Stack) -> None:
    user = shared.user("erin")  # stored through b
    token = shared.admins["a"].mint(user)["token"]
    before = shared.last_id()
    with anyio.fail_after(20):
        async with client(shared.url, token, MODERN) as agent:
            for i in range(4):
                assert not (await agent.call_tool("search_mails", {"query": f"q{i}"})).is_error
            assert served_by([e for e in shared.exchanges(before) if e.rpc_method == "tools/call"]) == {"a", "b"}

            assert shared.admins["a"].call("DELETE", f"/v1/users/{user}/connections/inbox")[0] == 204
            for i in range(2):  # the next call cuts access on both replicas, whichever answers
                cut = await agent.call_tool("search_mails", {"query": "after"})
                assert cut.is_error and "connect inbox first" in text(cut), text(cut)


def refusal(url: str, token: str) -> str:
    """The `error_description` of a 401 from `url` to `token` (fails if it is not a 401)."""
    request = urllib.request.Request(url, data=b"{}", method="POST", headers={"Authorization": f"Bearer {token}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401
    challenge = refused.value.headers["WWW-Authenticate"]
    return challenge.split('error_description="', 1)[1].split('"', 1)[0] if "error_description" in challenge else challenge


async def test_replicas_share_tokens_only_when_started_with_one_url(shared: Stack) -> None:
    """a and b run with `--url` the balancer's; c on the same state and manifests, without it."""
    user = shared.user("frank")
    a, b = shared.replicas["a"], shared.replicas["b"]
    assert a.public == b.public == shared.url and shared.url not in (a.mcp, b.mcp)  # each is reached on its own port
    minted = shared.admins["a"].mint(user)
    assert minted["audience"] == shared.url
    assert call_status(a.mcp, minted["token"]) == call_status(b.mcp, minted["token"]) == 200

    with replica("c", serve_argv([str(shared.manifests)], str(shared.state))) as c:
        assert c.public == c.mcp  # without --url, the audience is the address it bound
        own = Admin(c.admin, shared.state).mint(user)
        assert own["audience"] == c.mcp and call_status(c.mcp, own["token"]) == 200
        assert refusal(c.mcp, minted["token"]) == "wrong audience"
        assert refusal(a.mcp, own["token"]) == "wrong audience"


# --- a replica dies mid-run ------------------------------------------------------------------


@dataclass
class Outcome:
    worker: int
    era: str
    tool: str
    ok: bool
    error: str
    started: float
    ended: float


SLOW, FAST = "test_tool_with_logging", "test_simple_text"  # the slow one takes ~100 ms upstream
WORKERS = (MODERN, "legacy", MODERN, "legacy", MODERN, "legacy")
CALLS_AFTER_DROP = 6


async def test_killing_a_replica_mid_run_fails_only_the_calls_in_flight_on_it(tmp_path: Path) -> None:
    with two_replicas(tmp_path) as stack:
        token = stack.admins["a"].mint(stack.user("gina"))["token"]
        proxy = stack.proxy.proxy
        outcomes: list[Outcome] = []
        kill: dict[str, Any] = {}
        victim = stack.replicas["b"]

        async def worker(index: int, era: str) -> None:
            async with client(stack.url, token, era, read_timeout_seconds=10) as agent:
                after_drop = 0
                for k in range(200):
                    if after_drop >= CALLS_AFTER_DROP:
                        return
                    dropped = not proxy.backend("b").alive
                    tool = SLOW if k % 2 == 0 else FAST
                    started = time.monotonic()
                    try:
                        result = await agent.call_tool(tool, {})
                        outcomes.append(Outcome(index, era, tool, not result.is_error, text(result), started, time.monotonic()))
                    except Exception as exc:  # noqa: BLE001 - a failed call is what this test counts
                        outcomes.append(Outcome(index, era, tool, False, f"{type(exc).__name__}: {exc}", started, time.monotonic()))
                    after_drop += 1 if dropped else 0
                raise AssertionError(f"worker {index} never saw replica b dropped")

        def calls_in_flight_on_b() -> set[int]:
            # Calls only: a session's standalone GET stream is in flight on b all along.
            return {e.id for e in proxy.recorded() if e.backend == "b" and e.outcome is None and e.rpc_method == "tools/call"}

        async def killer() -> None:
            # Mid-run: every worker has made calls, and calls are in flight on b right now.
            while len(outcomes) < 2 * len(WORKERS) or len(calls_in_flight_on_b()) < 2:
                await anyio.sleep(0.002)
            kill["at"] = time.monotonic()  # before the snapshot: a call sent in between is in both sets
            kill["in_flight"] = proxy.in_flight("b")
            os.kill(victim.pid, signal.SIGKILL)
            kill["exit"] = await anyio.to_thread.run_sync(victim.process.wait)
            kill["dead"] = time.monotonic()

        with anyio.fail_after(45):
            async with anyio.create_task_group() as group:
                for index, era in enumerate(WORKERS):
                    group.start_soon(worker, index, era)
                group.start_soon(killer)

        assert kill["exit"] == -signal.SIGKILL
        await stack.settled()
        b = proxy.backend("b")
        assert not b.alive and b.dropped_at is not None and proxy.backend("a").alive
        exchanges = stack.exchanges()
        # A session's standalone GET stream on b breaks with b too; it carries no call (the client
        # reopens it), so the calls are what is counted.
        failed = [e for e in exchanges if e.outcome in ("refused", "broken") and not is_standalone_stream(e)]
        late = {e.id for e in exchanges if e.backend == "b" and kill["at"] < e.dispatched <= b.dropped_at}
        # Only b's exchanges failed, and each was in flight on b at the kill or sent to b
        # after it died and before the balancer dropped it (that window is usually empty).
        assert {e.backend for e in failed} <= {"b"}, failed
        assert {e.id for e in failed} <= kill["in_flight"] | late, (failed, kill, late)
        assert {e.id for e in failed} & kill["in_flight"], "no call in flight on b failed: the kill was not mid-call"
        assert all(e.rpc_method == "tools/call" for e in failed), failed
        # The clients saw exactly those failures, and no other.
        client_failures = [o for o in outcomes if not o.ok]
        assert len(client_failures) == len(failed), (client_failures, failed)
        assert all("MCPError" in o.error for o in client_failures), client_failures
        # Everything dispatched after the drop went to a and succeeded; every worker kept going.
        # A session's standing GET stream the client has just closed may not be marked ended yet
        # (settled() does not wait for those); every other exchange has its outcome.
        after = [e for e in exchanges if e.dispatched > b.dropped_at and not (e.outcome is None and is_standalone_stream(e))]
        wrong = [e for e in after if e.backend != "a" or e.outcome not in ("ok", "client_gone")]
        assert after and not wrong, wrong
        for index in range(len(WORKERS)):
            mine = [o for o in outcomes if o.worker == index and o.started > b.dropped_at]
            assert len(mine) >= CALLS_AFTER_DROP and all(o.ok for o in mine), mine
