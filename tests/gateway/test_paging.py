"""The gateway pages its own lists, and refuses a cursor it did not issue.

The upstream pages its 138 tools 50/50/38 with cursors of its own; the gateway
follows them, exposes the whole allowlisted list and pages it again for agents
(`gateway/paging.py`), in both eras. An invalid cursor is -32602, never the full list.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from mcp.shared.exceptions import MCPError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from portcullis.gateway import paging
from portcullis.gateway.core import RPCError
from portcullis.serve import LocalGateway
from tests.support.agent import MODES, Mode, agent
from tests.support.one_upstream import one_upstream
from tests.support.servers import run_asgi

pytestmark = pytest.mark.anyio
TOOLS = [f"tool_{i:03d}" for i in range(138)]
UPSTREAM_PAGE = 50


def paging_upstream() -> Starlette:
    async def mcp(request: Request) -> Response:
        body = json.loads(await request.body())
        rid, method, params = body.get("id"), body.get("method"), body.get("params") or {}
        if rid is None:
            return Response(status_code=202)
        if method == "server/discover":
            result: dict[str, Any] = {"supportedVersions": ["2026-07-28"], "capabilities": {"tools": {}}, "resultType": "complete"}
        elif method == "initialize":
            result = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}}, "serverInfo": {"name": "pager", "version": "1"}}
        elif method == "tools/list":
            start = int(params.get("cursor") or 0)
            names = TOOLS[start : start + UPSTREAM_PAGE]
            result = {"tools": [{"name": n, "inputSchema": {"type": "object"}} for n in names], "resultType": "complete"}
            if start + UPSTREAM_PAGE < len(TOOLS):
                result["nextCursor"] = str(start + UPSTREAM_PAGE)
        else:
            result = {"content": [{"type": "text", "text": params.get("name", "")}], "resultType": "complete"}
        return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": result})

    return Starlette(routes=[Route("/mcp", mcp, methods=["POST"])])


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalGateway, str]]:
    with run_asgi(paging_upstream()) as url, one_upstream(url, TOOLS, tmp_path_factory.mktemp("paging"), timeoutSeconds=5) as stack:
        yield stack.gw, stack.token


@pytest.mark.parametrize("mode", MODES)
async def test_the_whole_list_comes_in_the_gateways_own_pages(gateway: tuple[LocalGateway, str], mode: Mode) -> None:
    gw, token = gateway
    pages: list[list[str]] = []
    async with agent(gw.url, token, mode) as client:
        with anyio.fail_after(20):
            cursor: str | None = None
            while True:
                result = await client.list_tools(cursor=cursor)
                pages.append([t.name for t in result.tools])
                cursor = result.next_cursor
                if cursor is None:
                    break
    assert [len(p) for p in pages] == [50, 50, 38]
    assert [name for p in pages for name in p] == TOOLS


@pytest.mark.parametrize("cursor", ["not-a-cursor", "NTA", paging._cursor(10_000), ""])
@pytest.mark.parametrize("mode", MODES)
async def test_a_cursor_the_gateway_did_not_issue_is_invalid_params(gateway: tuple[LocalGateway, str], mode: Mode, cursor: str) -> None:
    gw, token = gateway
    async with agent(gw.url, token, mode) as client:
        with anyio.fail_after(10), pytest.raises(MCPError) as raised:
            await client.list_tools(cursor=cursor)
    assert raised.value.error.code == -32602
    assert "Invalid cursor" in raised.value.error.message


def test_pages_and_cursors() -> None:
    items = list(range(7))
    first, cursor = paging.page(items, None, size=3)
    second, cursor2 = paging.page(items, cursor, size=3)
    third, end = paging.page(items, cursor2, size=3)
    assert (list(first), list(second), list(third), end) == ([0, 1, 2], [3, 4, 5], [6], None)
    assert paging.page([], None) == ([], None)
    assert paging.page(items, paging._cursor(7), size=3) == ([], None)  # exactly at the end: an empty last page
    for bad in ("", "%%%", paging._cursor(8), "cG9ydGN1bGxpcy1wYWdlOsKy"):  # the last: "portcullis-page:²"
        with pytest.raises(RPCError) as raised:
            paging.page(items, bad, size=3)
        assert raised.value.code == -32602
