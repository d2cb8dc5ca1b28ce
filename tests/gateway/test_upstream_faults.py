"""An upstream that times out, errors or answers garbage gives a clear tool error naming it.

The faulty upstream lists its tools properly (so they are exposed) and then misbehaves on
each call in its own way; the gateway must answer every call promptly and keep serving.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from portcullis.gateway.audit import MemoryAuditSink
from portcullis.gateway.local import admin_secret
from portcullis.serve import LocalGateway, local_gateway
from tests.support.agent import MODES, Mode, agent, result_text
from tests.support.servers import run_asgi

pytestmark = pytest.mark.anyio
FAULTS = ["garbage", "nested", "html_500", "no_result", "hang", "empty"]


def faulty_upstream() -> Starlette:
    async def mcp(request: Request) -> Response:
        body = json.loads(await request.body())
        rid, method = body.get("id"), body.get("method")
        if method in ("server/discover", "initialize"):
            result: dict[str, Any] = {"supportedVersions": ["2026-07-28"], "capabilities": {"tools": {}}, "resultType": "complete"}
            if method == "initialize":
                result = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}}, "serverInfo": {"name": "faulty", "version": "1"}}
            return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": result})
        if method == "tools/list":
            tools = [{"name": name, "inputSchema": {"type": "object"}} for name in FAULTS]
            return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": {"tools": tools, "resultType": "complete", "ttlMs": 0, "cacheScope": "private"}})
        if rid is None:
            return Response(status_code=202)
        name = body["params"]["name"]
        if name == "garbage":
            return PlainTextResponse("this is not JSON-RPC", media_type="application/json")
        if name == "nested":  # deeper than json.loads can recurse
            return Response(b"[" * 5000, media_type="application/json")
        if name == "html_500":
            return Response("<html>boom</html>", status_code=500, media_type="text/html")
        if name == "no_result":
            return JSONResponse({"jsonrpc": "2.0", "id": rid})
        if name == "empty":
            return Response(b"", media_type="application/json")
        await anyio.sleep(30)  # "hang": far beyond the connection's timeout
        return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": {"content": []}})

    return Starlette(routes=[Route("/mcp", mcp, methods=["POST"])])


MANIFESTS = """
apiVersion: portcullis.dev/v1alpha1
kind: MCPConnection
metadata: {{name: flaky, namespace: acme}}
spec: {{url: "{url}", timeoutSeconds: 1, credential: {{source: none}}}}
---
apiVersion: portcullis.dev/v1alpha1
kind: VirtualMCPServer
metadata: {{name: s, namespace: acme}}
---
apiVersion: portcullis.dev/v1alpha1
kind: ToolMapping
metadata: {{name: m, namespace: acme}}
spec:
  serverRef: {{name: s}}
  connectionRef: {{name: flaky}}
  tools: [{tools}]
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalGateway, str]]:
    directory = tmp_path_factory.mktemp("faults")
    state = directory / "state"
    with run_asgi(faulty_upstream()) as url:
        (directory / "m.yaml").write_text(MANIFESTS.format(url=url, tools=", ".join(f"{{name: {n}}}" for n in FAULTS)))
        with local_gateway([directory / "m.yaml"], state_dir=state, port=0, admin_port=0, audit=MemoryAuditSink()) as gw:
            import httpx2

            token = httpx2.post(
                gw.admin_url + "/v1/tokens", json={"user": "u"}, headers={"Authorization": f"Bearer {admin_secret(state)}"}, timeout=10
            ).json()["token"]
            yield gw, token


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("mode", MODES)
async def test_a_misbehaving_upstream_gives_a_prompt_clear_tool_error(gateway: tuple[LocalGateway, str], fault: str, mode: Mode) -> None:
    gw, token = gateway
    async with agent(gw.url, token, mode) as client:
        with anyio.fail_after(10):  # the connection's timeout is 1 s: never a hang
            result = await client.call_tool(fault, {})
        assert result.is_error
        text = result_text(result)
        assert "upstream 'flaky'" in text, text
        if fault == "hang":
            assert "sent nothing for 1s" in text


async def test_the_gateway_keeps_serving_calls_while_another_hangs(gateway: tuple[LocalGateway, str]) -> None:
    gw, token = gateway
    async with agent(gw.url, token, "2026-07-28") as client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.call_tool, "hang", {})
            with anyio.fail_after(5):
                for _ in range(5):
                    assert (await client.list_tools()).tools
        memory = next(s for s in gw.gateway.audit.sinks if isinstance(s, MemoryAuditSink))
        events = [e for e in memory.events if e.tool == "hang"]
        assert events and events[-1].outcome == "upstream_error"


