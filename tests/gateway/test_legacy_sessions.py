"""Towards a session-protocol upstream the gateway keeps sessions, and opens a new one when it forgets.

The upstream here speaks only the session protocol (it refuses `server/discover`) and
answers 404 to a session it no longer knows, as an upstream does after a restart.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


import httpx2
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from portcullis.gateway.audit import MemoryAuditSink
from portcullis.gateway.local import admin_secret
from portcullis.serve import LocalGateway, local_gateway
from tests.support.agent import agent, result_text
from tests.support.servers import run_asgi

pytestmark = pytest.mark.anyio


class SessionUpstream:
    def __init__(self, *, keeps_sessions: bool = True) -> None:
        self.sessions: set[str] = set()
        self.opened = 0
        self.keeps_sessions = keeps_sessions  # False: answers `initialize` without a session id, and serves anyone
        self._ids = itertools.count(1)

    def app(self) -> Starlette:
        async def mcp(request: Request) -> Response:
            body = json.loads(await request.body())
            rid, method = body.get("id"), body.get("method")
            if method == "server/discover":
                return JSONResponse({"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": "Method not found"}}, status_code=400)
            if method == "initialize":
                session = f"s{next(self._ids)}"
                self.sessions.add(session)
                self.opened += 1
                result = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}}, "serverInfo": {"name": "legacy", "version": "1"}}
                headers = {"mcp-session-id": session} if self.keeps_sessions else {}
                return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": result}, headers=headers)
            if self.keeps_sessions and request.headers.get("mcp-session-id") not in self.sessions:
                return Response("unknown session", status_code=404)
            if rid is None:
                return Response(status_code=202)
            if method == "tools/list":
                return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": {"tools": [{"name": "echo", "inputSchema": {"type": "object"}}]}})
            text = json.dumps(body["params"].get("arguments", {}))
            return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": {"content": [{"type": "text", "text": text}]}})

        async def no_stream(request: Request) -> Response:
            return Response(status_code=405)

        return Starlette(routes=[Route("/mcp", mcp, methods=["POST"]), Route("/mcp", no_stream, methods=["GET", "DELETE"])])


MANIFESTS = """
apiVersion: portcullis.dev/v1alpha1
kind: MCPConnection
metadata: {{name: old, namespace: acme}}
spec: {{url: "{url}", timeoutSeconds: 5, credential: {{source: none}}}}
---
apiVersion: portcullis.dev/v1alpha1
kind: VirtualMCPServer
metadata: {{name: s, namespace: acme}}
---
apiVersion: portcullis.dev/v1alpha1
kind: ToolMapping
metadata: {{name: m, namespace: acme}}
spec: {{serverRef: {{name: s}}, connectionRef: {{name: old}}, tools: [{{name: echo}}]}}
"""


@contextmanager
def in_front(upstream: SessionUpstream, directory: Path) -> Iterator[tuple[LocalGateway, str]]:
    """A gateway in front of `upstream`, and a session token for it."""
    with run_asgi(upstream.app()) as url:
        (directory / "m.yaml").write_text(MANIFESTS.format(url=url))
        with local_gateway([directory / "m.yaml"], state_dir=directory / "state", port=0, admin_port=0, audit=MemoryAuditSink()) as gw:
            token = httpx2.post(
                gw.admin_url + "/v1/tokens", json={"user": "u"},
                headers={"Authorization": f"Bearer {admin_secret(directory / 'state')}"}, timeout=10,
            ).json()["token"]
            yield gw, token


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SessionUpstream, LocalGateway, str]]:
    upstream = SessionUpstream()
    with in_front(upstream, tmp_path_factory.mktemp("legacy")) as (gw, token):
        yield upstream, gw, token


async def test_calls_share_one_session_and_a_forgotten_one_is_reopened(setup: tuple[SessionUpstream, LocalGateway, str]) -> None:
    upstream, gw, token = setup
    async with agent(gw.url, token, "2026-07-28") as client:
        first = await client.call_tool("echo", {"n": 1})
        opened = upstream.opened
        second = await client.call_tool("echo", {"n": 2})
        assert upstream.opened == opened  # the session was reused
        upstream.sessions.clear()  # the upstream restarted
        third = await client.call_tool("echo", {"n": 3})
    assert upstream.opened == opened + 1
    assert [result_text(r) for r in (first, second, third)] == ['{"n": 1}', '{"n": 2}', '{"n": 3}']
    assert not third.is_error




async def test_an_upstream_that_keeps_no_sessions_is_not_greeted_again_for_each_agent_session(tmp_path: Path) -> None:
    """It answered `initialize` without a session id: another handshake would open nothing it keeps. So a
    client that opens a session per call (LangChain's default) costs it the call alone, not three requests."""
    upstream = SessionUpstream(keeps_sessions=False)
    with in_front(upstream, tmp_path) as (gw, token):
        results = []
        for n in range(4):
            async with agent(gw.url, token, "legacy") as client:
                if n == 0:
                    greeted = upstream.opened  # the catalog's listing, and the first agent session's greeting
                results.append(result_text(await client.call_tool("echo", {"n": n})))
    assert results == [f'{{"n": {n}}}' for n in range(4)]
    assert upstream.opened == greeted
