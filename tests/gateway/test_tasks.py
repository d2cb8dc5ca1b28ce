"""Tasks (2025-11-25): a task-augmented call of an exposed tool is relayed, and so is the task.

Two raw upstreams keep their tasks per caller (the `Authorization` header, i.e. the
user's credential). The agent only ever sees gateway task ids, which any replica
sharing the signing keys can route, and which are held to the same allowlist and
user as the call that made them.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from portcullis.gateway.audit import MemoryAuditSink
from portcullis.gateway.local import admin_secret
from portcullis.serve import LocalGateway, local_gateway
from tests.support.foreign import Catalog, everything_missing, everything_server, gateway_in_front, gateways_in_front, without_upstream_identity
from tests.support.raw_session import RawSession
from tests.support.servers import run_asgi

pytestmark = pytest.mark.anyio
RELATED = "io.modelcontextprotocol/related-task"
PUBLIC_URL = "http://tasks.example.test/mcp"
ADA, BOB = "ada@example.com", "bob@example.com"
PAGE = 2


@dataclass
class TaskUpstream:
    """A session-era upstream whose tools named in `tools` support tasks ({name: taskSupport})."""

    tools: dict[str, str]
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=itertools.count)

    def task_requests(self) -> list[tuple[str, dict[str, Any]]]:
        return [(m, p) for m, p in self.seen if m.startswith("tasks/") or (m == "tools/call" and "task" in p)]

    def app(self) -> Starlette:
        async def mcp(request: Request) -> Response:
            body = json.loads(await request.body())
            rid, method, params = body.get("id"), body.get("method"), body.get("params") or {}
            if rid is None:
                return Response(status_code=202)
            if method == "server/discover":  # the session era only
                return JSONResponse({"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": "Method not found"}})
            self.seen.append((method, params))
            try:
                result = self.answer(method, params, request.headers.get("authorization"))
            except LookupError:
                return JSONResponse({"jsonrpc": "2.0", "id": rid, "error": {"code": -32602, "message": "Failed to retrieve task: Task not found"}})
            return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": result})

        return Starlette(routes=[Route("/mcp", mcp, methods=["POST"])])

    def answer(self, method: str, params: dict[str, Any], caller: str | None) -> dict[str, Any]:
        if method == "initialize":
            capabilities = {"tools": {}, "tasks": {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}}
            return {"protocolVersion": "2025-11-25", "capabilities": capabilities, "serverInfo": {"name": "tasks", "version": "1"}}
        if method == "tools/list":
            return {"tools": [{"name": n, "inputSchema": {"type": "object"}, "execution": {"taskSupport": s}} for n, s in self.tools.items()]}
        if method == "tools/call" and "task" in params:
            task_id = f"up-{next(self._ids)}"
            task = {"taskId": task_id, "status": "working", "createdAt": "2026-12-01T00:00:00Z",
                    "lastUpdatedAt": "2026-12-01T00:00:00Z", "ttl": 60000, "pollInterval": 100}
            self.tasks[task_id] = {"task": task, "caller": caller, "tool": params["name"]}
            return {"task": task}
        if method == "tools/call":
            return {"content": [{"type": "text", "text": f"{params['name']} at once"}]}
        if method == "tasks/list":  # paged PAGE tasks at a time, the cursor an offset
            mine = [t["task"] for t in self.tasks.values() if t["caller"] == caller]
            start = int(params.get("cursor") or 0)
            following = {"nextCursor": str(start + PAGE)} if start + PAGE < len(mine) else {}
            return {"tasks": mine[start:start + PAGE], **following}
        kept = self.tasks.get(str(params.get("taskId")))
        if kept is None or kept["caller"] != caller:
            raise LookupError
        if method == "tasks/get":
            return dict(kept["task"])
        if method == "tasks/cancel":
            kept["task"]["status"] = "cancelled"
            return dict(kept["task"])
        if method == "tasks/result":
            kept["task"]["status"] = "completed"
            return {"content": [{"type": "text", "text": f"{kept['tool']} done"}], "_meta": {RELATED: {"taskId": params["taskId"]}}}
        raise AssertionError(method)


MANIFESTS = """
apiVersion: portcullis.dev/v1alpha1
kind: MCPConnection
metadata: {{name: reports, namespace: acme}}
spec: {{url: "{reports}", timeoutSeconds: 5, credential: {{source: user, header: Authorization, scheme: Bearer}}}}
---
apiVersion: portcullis.dev/v1alpha1
kind: MCPConnection
metadata: {{name: jobs, namespace: acme}}
spec: {{url: "{jobs}", timeoutSeconds: 5, credential: {{source: user, header: Authorization, scheme: Bearer}}}}
---
apiVersion: portcullis.dev/v1alpha1
kind: VirtualMCPServer
metadata: {{name: s, namespace: acme}}
---
apiVersion: portcullis.dev/v1alpha1
kind: ToolMapping
metadata: {{name: r, namespace: acme}}
spec:
  serverRef: {{name: s}}
  connectionRef: {{name: reports}}
  tools: [{{name: slow_report, as: report}}, {{name: quick}}]
---
apiVersion: portcullis.dev/v1alpha1
kind: ToolMapping
metadata: {{name: j, namespace: acme}}
spec:
  serverRef: {{name: s}}
  connectionRef: {{name: jobs}}
  tools: [{{name: job_a}}]
"""


@dataclass
class Stack:
    first: LocalGateway
    second: LocalGateway
    reports: TaskUpstream
    jobs: TaskUpstream
    audit: MemoryAuditSink
    state: Path

    def mint(self, user: str, **extra: Any) -> str:
        answer = httpx2.post(
            self.first.admin_url + "/v1/tokens", json={"user": user, **extra},
            headers={"Authorization": f"Bearer {admin_secret(self.state)}"}, timeout=10,
        )
        assert answer.status_code == 201, answer.text
        return str(answer.json()["token"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("tasks")
    state = directory / "state"
    # `reports` offers one task-capable tool (its tasks can be listed), `jobs` two (one hidden).
    reports = TaskUpstream({"slow_report": "required", "quick": "forbidden"})
    jobs = TaskUpstream({"job_a": "optional", "job_b": "optional"})
    audit = MemoryAuditSink()
    with run_asgi(reports.app()) as reports_url, run_asgi(jobs.app()) as jobs_url:
        (directory / "m.yaml").write_text(MANIFESTS.format(reports=reports_url, jobs=jobs_url))
        with (
            local_gateway([directory / "m.yaml"], state_dir=state, port=0, admin_port=0, audit=audit, public_url=PUBLIC_URL) as first,
            local_gateway([directory / "m.yaml"], state_dir=state, port=0, admin_port=0, audit=MemoryAuditSink(),
                          public_url=PUBLIC_URL) as second,
        ):
            for user in (ADA, BOB):
                for connection in ("reports", "jobs"):
                    asyncio.run(first.gateway.vault.put("acme", user, connection, f"{user}-{connection}"))
            yield Stack(first, second, reports, jobs, audit, state)


async def _post(url: str, token: str, body: dict[str, Any], session: str | None = None) -> httpx2.Response:
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-11-25"}
    if session is not None:
        headers["Mcp-Session-Id"] = session
    async with httpx2.AsyncClient(timeout=10) as http:
        return await http.post(url, json=body, headers=headers)


def _message(response: httpx2.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        data = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
        messages = [json.loads(d) for d in data if d]
        return next(m for m in messages if "id" in m)
    message = response.json()
    assert isinstance(message, dict)
    return message


async def _session(url: str, token: str, capabilities: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    body = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": capabilities or {}, "clientInfo": {"name": "t", "version": "1"}}}
    response = await _post(url, token, body)
    return response.headers["mcp-session-id"], _message(response)["result"]


async def _rpc(url: str, token: str, session: str | None, method: str, params: dict[str, Any]) -> dict[str, Any]:
    return _message(await _post(url, token, {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}, session))


async def _create(stack: Stack, token: str, tool: str = "report", session: str | None = None) -> dict[str, Any]:
    answer = await _rpc(stack.first.url, token, session, "tools/call", {"name": tool, "arguments": {}, "task": {"ttl": 60000}})
    assert "result" in answer, answer
    task = answer["result"]["task"]
    assert isinstance(task, dict)
    return task


async def test_the_server_says_tools_may_be_called_as_tasks_and_lists_their_task_support(stack: Stack) -> None:
    ada = stack.mint(ADA)
    with anyio.fail_after(20):
        session, initialized = await _session(stack.first.url, ada)
        tools = await _rpc(stack.first.url, ada, session, "tools/list", {})
    assert initialized["capabilities"]["tasks"] == {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}
    support = {t["name"]: t.get("execution", {}).get("taskSupport") for t in tools["result"]["tools"]}
    assert support == {"report": "required", "quick": "forbidden", "job_a": "optional"}


async def test_a_task_is_created_polled_and_its_result_fetched_under_a_gateway_task_id(stack: Stack) -> None:
    ada = stack.mint(ADA)
    with anyio.fail_after(20):
        session, _ = await _session(stack.first.url, ada)
        task = await _create(stack, ada, session=session)
        task_id = task["taskId"]
        assert not task_id.startswith("up-") and task["status"] == "working"
        created = stack.reports.task_requests()[-1]
        got = (await _rpc(stack.first.url, ada, session, "tasks/get", {"taskId": task_id}))["result"]
        result = (await _rpc(stack.first.url, ada, session, "tasks/result", {"taskId": task_id}))["result"]
    assert created[0] == "tools/call" and created[1]["name"] == "slow_report" and created[1]["task"] == {"ttl": 60000}
    assert got["taskId"] == task_id and got["status"] == "working"
    assert result["content"] == [{"type": "text", "text": "slow_report done"}]
    assert result["_meta"][RELATED] == {"taskId": task_id}
    # The upstream was asked with its own id.
    upstream = _upstream_id(stack, task_id)
    assert [(m, p["taskId"]) for m, p in stack.reports.task_requests()[-2:]] == [("tasks/get", upstream), ("tasks/result", upstream)]
    events = [e for e in stack.audit.events if e.method in ("tasks/get", "tasks/result") and e.user == ADA]
    assert [(e.method, e.tool, e.connection, e.outcome) for e in events[-2:]] == [
        ("tasks/get", "report", "reports", "ok"), ("tasks/result", "report", "reports", "ok")
    ]


def _upstream_id(stack: Stack, task_id: str) -> str:
    sessions = stack.first.endpoint.sessions
    assert sessions is not None
    return sessions.ids.open_task_id(task_id).upstream_id


async def test_a_task_can_be_cancelled(stack: Stack) -> None:
    ada = stack.mint(ADA)
    with anyio.fail_after(20):
        task = await _create(stack, ada)
        cancelled = (await _rpc(stack.first.url, ada, None, "tasks/cancel", {"taskId": task["taskId"]}))["result"]
    assert cancelled["taskId"] == task["taskId"] and cancelled["status"] == "cancelled"
    assert stack.reports.tasks[_upstream_id(stack, task["taskId"])]["task"]["status"] == "cancelled"
    assert stack.audit.events[-1].method == "tasks/cancel" and stack.audit.events[-1].tool == "report"


async def test_an_agent_that_can_be_asked_things_still_gets_its_task(stack: Stack) -> None:
    """Such a session's calls are served by session_calls.py; a task-augmented one is not."""
    ada = stack.mint(ADA)
    with anyio.fail_after(20):
        session, _ = await _session(stack.first.url, ada, {"elicitation": {"form": {}}})
        task = await _create(stack, ada, session=session)
    assert task["status"] == "working" and not task["taskId"].startswith("up-")


async def test_another_users_task_id_is_refused_and_the_upstream_hears_nothing(stack: Stack) -> None:
    ada, bob = stack.mint(ADA), stack.mint(BOB)
    with anyio.fail_after(20):
        task = await _create(stack, ada)
        before = len(stack.reports.seen)
        answers = [await _rpc(stack.first.url, bob, None, m, {"taskId": task["taskId"]}) for m in ("tasks/get", "tasks/result", "tasks/cancel")]
        forged = await _rpc(stack.first.url, ada, None, "tasks/get", {"taskId": task["taskId"][:-4] + "AAAA"})
        raw = await _rpc(stack.first.url, ada, None, "tasks/get", {"taskId": _upstream_id(stack, task["taskId"])})
    for answer in [*answers, forged, raw]:
        assert answer["error"]["code"] == -32602 and "not found" in answer["error"]["message"], answer
    assert len(stack.reports.seen) == before
    refused = list(stack.audit.events)[-5:]
    assert [(e.method, e.decision, e.reason) for e in refused] == [
        ("tasks/get", "deny", "unknown_task"), ("tasks/result", "deny", "unknown_task"), ("tasks/cancel", "deny", "unknown_task"),
        ("tasks/get", "deny", "unknown_task"), ("tasks/get", "deny", "unknown_task"),
    ]
    assert {e.user for e in refused[:3]} == {BOB}


async def test_a_tool_outside_the_allowlist_or_the_token_scope_cannot_be_task_called_or_polled(stack: Stack) -> None:
    ada = stack.mint(ADA)
    narrow = stack.mint(ADA, tools=["quick"])
    with anyio.fail_after(20):
        task = await _create(stack, ada)
        before_jobs, before_reports = len(stack.jobs.seen), len(stack.reports.seen)
        hidden = await _rpc(stack.first.url, ada, None, "tools/call", {"name": "job_b", "arguments": {}, "task": {}})
        scoped_call = await _rpc(stack.first.url, narrow, None, "tools/call", {"name": "report", "arguments": {}, "task": {}})
        scoped_poll = await _rpc(stack.first.url, narrow, None, "tasks/get", {"taskId": task["taskId"]})
    assert hidden["error"]["code"] == -32602 and "Unknown tool" in hidden["error"]["message"]
    assert scoped_call["error"]["code"] == -32602
    assert scoped_poll["error"]["code"] == -32602 and "not found" in scoped_poll["error"]["message"]
    assert (len(stack.jobs.seen), len(stack.reports.seen)) == (before_jobs, before_reports)
    assert stack.audit.events[-1].reason == "outside_token_scope" and stack.audit.events[-1].tool == "report"


async def test_tasks_list_shows_only_tasks_the_gateway_can_tell_are_of_exposed_tools(stack: Stack) -> None:
    """`reports` has one task-capable tool, exposed: its tasks are listed. `jobs` has two, one
    hidden, and a task names no tool: none of its tasks are listed, the exposed tool's included."""
    ada, bob = stack.mint(ADA), stack.mint(BOB)
    with anyio.fail_after(20):
        report = await _create(stack, ada)
        job = await _create(stack, ada, tool="job_a")
        stack.jobs.answer("tools/call", {"name": "job_b", "task": {}}, f"Bearer {ADA}-jobs")  # made elsewhere, by the hidden tool
        listed = (await _rpc(stack.first.url, ada, None, "tasks/list", {}))["result"]["tasks"]
        bobs = (await _rpc(stack.first.url, bob, None, "tasks/list", {}))["result"]["tasks"]
        polled = (await _rpc(stack.first.url, ada, None, "tasks/get", {"taskId": job["taskId"]}))["result"]
        again = (await _rpc(stack.first.url, ada, None, "tasks/get", {"taskId": listed[-1]["taskId"]}))["result"]
    ids = [_upstream_id(stack, t["taskId"]) for t in listed]
    ada_reports = [i for i, t in stack.reports.tasks.items() if t["caller"] == f"Bearer {ADA}-reports"]
    assert ids == ada_reports and _upstream_id(stack, report["taskId"]) in ids
    assert not any(t["taskId"].startswith("up-") for t in listed)
    assert {_upstream_id(stack, t["taskId"]) for t in bobs}.isdisjoint(ids)
    assert polled["taskId"] == job["taskId"]  # still reachable by the id the agent was given
    assert again["taskId"] == listed[-1]["taskId"]
    assert not any(m == "tasks/list" for m, _ in stack.jobs.seen)
    # The upstream pages its list (PAGE at a time): every page is followed, each request audited.
    assert len(ada_reports) > PAGE
    listing = [e for e in stack.audit.events if e.method == "tasks/list" and e.user == ADA]
    assert [(e.tool, e.connection, e.outcome) for e in listing] == [("report", "reports", "ok")] * -(-len(ada_reports) // PAGE)


async def test_a_task_id_works_on_another_replica_sharing_the_signing_keys(stack: Stack) -> None:
    ada = stack.mint(ADA)
    with anyio.fail_after(20):
        task = await _create(stack, ada)
        got = (await _rpc(stack.second.url, ada, None, "tasks/get", {"taskId": task["taskId"]}))["result"]
        result = (await _rpc(stack.second.url, ada, None, "tasks/result", {"taskId": task["taskId"]}))["result"]
    assert got["taskId"] == task["taskId"]
    assert result["content"] == [{"type": "text", "text": "slow_report done"}]


async def test_a_modern_agent_has_no_tasks_methods(stack: Stack) -> None:
    ada = stack.mint(ADA)
    body = {"jsonrpc": "2.0", "id": 1, "method": "tasks/list",
            "params": {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {},
                                 "io.modelcontextprotocol/clientInfo": {"name": "t", "version": "1"}}}}
    headers = {"Authorization": f"Bearer {ada}", "Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tasks/list"}
    with anyio.fail_after(20):
        async with httpx2.AsyncClient(timeout=10) as http:
            answer = (await http.post(stack.first.url, json=body, headers=headers)).json()
    assert answer["error"]["code"] == -32601


@pytest.mark.skipif(everything_missing() is not None, reason=str(everything_missing()))
async def test_the_everything_servers_task_tool_runs_as_a_task_through_the_gateway(tmp_path: Path) -> None:
    """A real task-capable upstream (the TypeScript SDK's task support): create, poll, fetch the result."""
    catalog = Catalog(tools=("simulate-research-query",), prompts=(), resources=(), templates=())
    with everything_server() as upstream, gateway_in_front("everything", upstream.url, catalog, tmp_path) as fronted:
        with anyio.fail_after(30):
            session, initialized = await _session(fronted.url, fronted.token)
            created = await _rpc(fronted.url, fronted.token, session, "tools/call",
                                 {"name": "simulate-research-query", "arguments": {"topic": "portcullises"}, "task": {"ttl": 60000}})
            task_id = created["result"]["task"]["taskId"]
            got = (await _rpc(fronted.url, fronted.token, session, "tasks/get", {"taskId": task_id}))["result"]
            # tasks/result waits for the task to finish (about four seconds of simulated stages).
            result = (await _rpc(fronted.url, fronted.token, session, "tasks/result", {"taskId": task_id}))["result"]
            done = (await _rpc(fronted.url, fronted.token, session, "tasks/get", {"taskId": task_id}))["result"]
    assert "tasks" in initialized["capabilities"]
    assert len(upstream.received("tasks/get")) == 2 and len(upstream.received("tasks/result")) == 1
    assert got["taskId"] == task_id and got["status"] in ("working", "completed")
    assert "portcullises" in json.dumps(result["content"]) and result["_meta"][RELATED] == {"taskId": task_id}
    assert done["status"] == "completed"


async def test_in_a_session_a_task_keeps_its_id_in_the_list_and_a_bad_cursor_is_refused(stack: Stack) -> None:
    """A session's task requests are served on its own stream (sessions.py): the list names each task
    by the id its creating call answered, every upstream page followed; a cursor not the gateway's is -32602."""
    ada = stack.mint(ADA)
    with anyio.fail_after(20):
        session, _ = await _session(stack.first.url, ada)
        made = [await _create(stack, ada, session=session) for _ in range(PAGE + 1)]
        listed = (await _rpc(stack.first.url, ada, session, "tasks/list", {}))["result"]
        polled = (await _rpc(stack.second.url, ada, session, "tasks/get", {"taskId": made[0]["taskId"]}))["result"]
        bad = await _rpc(stack.first.url, ada, session, "tasks/list", {"cursor": "not-ours"})
    assert {t["taskId"] for t in made} <= {t["taskId"] for t in listed["tasks"]}
    assert "nextCursor" not in listed
    assert polled["taskId"] == made[0]["taskId"] and polled["status"] == "working"
    assert bad["error"]["code"] == -32602


# --- the everything server's task (the TypeScript SDK's task support) -------------------------------

RESEARCH = Catalog(tools=("simulate-research-query",), prompts=(), resources=(), templates=())
CLARIFIED = {"action": "accept", "content": {"interpretation": "programming"}}


async def _clarify(method: str, params: dict[str, Any]) -> dict[str, Any]:
    assert method == "elicitation/create", method
    return CLARIFIED


@dataclass
class Researched:
    task_id: str
    asked: list[tuple[str, dict[str, Any]]]
    result: dict[str, Any]
    statuses: list[dict[str, Any]]


async def _research(url: str, token: str | None, then: str | None = None) -> Researched:
    """An ambiguous research task, made on `url`, then polled and fetched on `then` (the same by default):
    it asks its client to clarify while the client waits on `tasks/result`."""
    async with httpx2.AsyncClient(timeout=30) as http:
        first = RawSession(url, token, http, _clarify)
        await first.initialize({"elicitation": {"form": {}}})
        other = RawSession(then or url, token, http, _clarify, session_id=first.session_id)
        async with first.stream() as seen:
            created = await first.request("tools/call", {
                "name": "simulate-research-query", "arguments": {"topic": "python", "ambiguous": True}, "task": {"ttl": 60000}})
            task_id = created["task"]["taskId"]
            assert (await other.request("tasks/get", {"taskId": task_id}))["taskId"] == task_id
            result = await other.request("tasks/result", {"taskId": task_id})
            with anyio.fail_after(10):  # the last status notice follows the result
                while not any(m.get("params", {}).get("status") == "completed" for m in seen):
                    await anyio.sleep(0.05)
        statuses = [m["params"] for m in seen if m.get("method") == "notifications/tasks/status"]
        return Researched(task_id, first.asked + other.asked, result, statuses)


@pytest.mark.skipif(everything_missing() is not None, reason=str(everything_missing()))
async def test_a_task_that_asks_its_client_asks_the_agent_and_tells_its_status_as_it_does_directly(tmp_path: Path) -> None:
    """The task asks for a clarification while the client waits on `tasks/result` (delivered on that
    request's stream), and reports each stage on the session's GET stream: through the gateway the
    agent is asked the same, its answer reaches the task, and the notices name the gateway's task id."""
    with everything_server() as upstream, gateway_in_front("everything", upstream.url, RESEARCH, tmp_path) as fronted:
        with anyio.fail_after(60):
            direct = await _research(upstream.url, None)
            through = await _research(fronted.url, fronted.token)
    assert [m for m, _ in through.asked] == ["elicitation/create"]
    assert [without_upstream_identity(p) for _, p in through.asked] == [without_upstream_identity(p) for _, p in direct.asked]
    assert through.asked[0][1]["_meta"][RELATED] == {"taskId": through.task_id}
    assert "python (programming)" in json.dumps(through.result["content"])
    assert without_upstream_identity(through.result) == without_upstream_identity(direct.result)
    assert through.result["_meta"][RELATED] == {"taskId": through.task_id}

    def stages(statuses: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return [(s["status"], s.get("statusMessage", "")) for s in statuses]

    assert stages(through.statuses) == stages(direct.statuses)
    assert ("input_required", 'Found multiple interpretations for "python". Requesting clarification...') in stages(through.statuses)
    assert {s["taskId"] for s in through.statuses} == {through.task_id}


@pytest.mark.skipif(everything_missing() is not None, reason=str(everything_missing()))
async def test_a_task_made_through_one_replica_is_polled_asked_and_fetched_through_another(tmp_path: Path) -> None:
    """The TypeScript SDK binds a task to the session that made it: the agent's upstream session is the
    same on every replica, so the second finds it, and the question is asked of the agent there."""
    with everything_server() as upstream, gateways_in_front("everything", upstream.url, RESEARCH, tmp_path, replicas=2) as (one, two):
        with anyio.fail_after(60):
            through = await _research(one.url, one.token, then=two.url)
    assert [m for m, _ in through.asked] == ["elicitation/create"]
    assert "python (programming)" in json.dumps(through.result["content"])
    assert len(upstream.received("initialize")) >= 1 and upstream.received("tasks/result")


ASYNC_ELICITATION = Catalog(tools=("trigger-elicitation-request-async",), prompts=(), resources=(), templates=())
CLIENT_TASKS = {"elicitation": {"form": {}}, "tasks": {"list": {}, "cancel": {}, "requests": {"elicitation": {"create": {}}}}}


@dataclass
class AgentTasks:
    """An agent that runs what it is asked to elicit as a task of its own, done by its first poll."""

    polls: int = 0

    async def answer(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        task = {"taskId": "agent-task-1", "createdAt": "2026-12-01T00:00:00Z", "lastUpdatedAt": "2026-12-01T00:00:00Z", "ttl": 60000}
        if method == "elicitation/create":
            assert "task" in params
            return {"task": {**task, "status": "working", "pollInterval": 100}}
        if method == "tasks/get":
            self.polls += 1
            return {**task, "status": "completed"}
        if method == "tasks/result":
            return {"action": "accept", "content": {"name": "Ada", "favoriteColor": "Blue"}}
        raise AssertionError(method)


async def _run_async_elicitation(url: str, token: str | None) -> tuple[list[str], dict[str, Any]]:
    agent = AgentTasks()
    async with httpx2.AsyncClient(timeout=30) as http:
        session = RawSession(url, token, http, agent.answer)
        await session.initialize(CLIENT_TASKS)
        result = await session.request("tools/call", {"name": "trigger-elicitation-request-async", "arguments": {}})
    return [m for m, _ in session.asked], result


@pytest.mark.skipif(everything_missing() is not None, reason=str(everything_missing()))
async def test_an_agent_that_runs_what_it_is_asked_as_tasks_is_polled_for_them_as_it_is_directly(tmp_path: Path) -> None:
    """The upstream asks the agent to elicit as a task of the agent's, then polls that task and fetches
    its result (requests to the client): the tool is offered through the gateway, and each is relayed."""
    with everything_server() as upstream, gateway_in_front("everything", upstream.url, ASYNC_ELICITATION, tmp_path) as fronted:
        with anyio.fail_after(60):
            direct = await _run_async_elicitation(upstream.url, None)
            through = await _run_async_elicitation(fronted.url, fronted.token)
    assert direct[0] == ["elicitation/create", "tasks/get", "tasks/result"]
    assert through[0] == direct[0]
    assert "Ada" in json.dumps(through[1]["content"])
    assert without_upstream_identity(through[1]) == without_upstream_identity(direct[1])


MALFORMED = [
    ("tools/call", {"name": 5, "arguments": {}, "task": {}}),
    ("tools/call", {"name": "report", "arguments": {}, "task": "soon"}),
    ("tools/call", {"name": "report", "arguments": [1], "task": {}}),
    ("tools/call", {"name": "report", "arguments": {}, "task": {"ttl": "long"}}),
    ("tasks/get", {"taskId": 5}),
    ("tasks/result", {}),
    ("tasks/cancel", {"taskId": None}),
    ("tasks/list", {"cursor": 5}),
]


@pytest.mark.parametrize("in_session", [True, False], ids=["session", "no-session"])
async def test_malformed_task_requests_are_invalid_params_and_reach_no_upstream(stack: Stack, in_session: bool) -> None:
    ada = stack.mint(ADA)
    with anyio.fail_after(20):
        session = (await _session(stack.first.url, ada))[0] if in_session else None
        before = len(stack.reports.seen), len(stack.jobs.seen)
        answers = [await _rpc(stack.first.url, ada, session, method, params) for method, params in MALFORMED]
        after = len(stack.reports.seen), len(stack.jobs.seen)
        task = await _create(stack, ada, session=session)  # and the gateway goes on serving
    assert [a.get("error", {}).get("code") for a in answers] == [-32602] * len(MALFORMED), answers
    assert after == before
    assert task["status"] == "working"
