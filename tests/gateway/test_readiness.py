"""Readiness and status tell an unreachable connection from an empty one, and the log says what to check."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from portcullis.gateway.audit import MemoryAuditSink
from portcullis.serve import local_gateway
from tests.support.servers import free_port, run_asgi

MANIFESTS = """
apiVersion: portcullis.dev/v1alpha1
kind: MCPConnection
metadata: {{name: {name}, namespace: acme}}
spec: {{url: "{url}", timeoutSeconds: 1}}
---
apiVersion: portcullis.dev/v1alpha1
kind: VirtualMCPServer
metadata: {{name: s, namespace: acme}}
---
apiVersion: portcullis.dev/v1alpha1
kind: ToolMapping
metadata: {{name: m, namespace: acme}}
spec: {{serverRef: {{name: s}}, connectionRef: {{name: {name}}}, tools: [{{name: search}}]}}
"""


def empty_upstream() -> Starlette:
    async def mcp(request: Request) -> Response:
        body = json.loads(await request.body())
        rid, method = body.get("id"), body.get("method")
        if rid is None:
            return Response(status_code=202)
        if method == "server/discover":
            return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": {"supportedVersions": ["2026-07-28"], "capabilities": {"tools": {}}, "resultType": "complete"}})
        if method == "tools/list":
            return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": {"tools": [], "resultType": "complete", "ttlMs": 0, "cacheScope": "private"}})
        return JSONResponse({"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": "Method not found"}})

    return Starlette(routes=[Route("/mcp", mcp, methods=["POST"])])


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def settled(url: str) -> tuple[int, Any]:
    with anyio.fail_after(20):
        while True:
            status, body = get(url)
            if status == 200 or "pending" not in body or body.get("pending") == []:
                return status, body
            await anyio.sleep(0.05)


@pytest.mark.anyio
async def test_an_unreachable_only_connection_is_not_ready_and_the_log_names_the_url(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{free_port()}/mcp"
    (tmp_path / "m.yaml").write_text(MANIFESTS.format(name="search", url=url))
    with caplog.at_level(logging.WARNING, logger="portcullis.gateway"):
        with local_gateway([tmp_path / "m.yaml"], state_dir=tmp_path / "state", port=0, admin_port=0, audit=MemoryAuditSink()) as gw:
            status, body = await settled(gw.url.removesuffix("/mcp") + "/readyz")
            assert status == 503 and body["unreachable"][0]["connection"] == "search" and body["unreachable"][0]["url"] == url
            _, report = get(gw.admin_url + "/v1/status")
            assert report["ready"] is False and report["connections"]["search"]["state"] == "unreachable"
    assert any(url in r.getMessage() and "spec.url" in r.getMessage() for r in caplog.records)


@pytest.mark.anyio
async def test_an_empty_connection_is_ready_and_says_it_is_empty(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="portcullis.gateway")
    with run_asgi(empty_upstream()) as url:
        (tmp_path / "m.yaml").write_text(MANIFESTS.format(name="search", url=url))
        with local_gateway([tmp_path / "m.yaml"], state_dir=tmp_path / "state", port=0, admin_port=0, audit=MemoryAuditSink()) as gw:
            status, body = await settled(gw.url.removesuffix("/mcp") + "/readyz")
            assert status == 200 and "unreachable" not in body
            _, report = get(gw.admin_url + "/v1/status")
            assert report["connections"]["search"]["state"] == "empty" and report["connections"]["search"]["toolCount"] == 0
            assert report["unknownTools"][0]["name"] == "search"
    said = [r.getMessage() for r in caplog.records if "UnknownUpstreamTool" in r.getMessage()]
    assert len(said) == 1 and "ToolMapping m allowlists tool 'search'" in said[0]
