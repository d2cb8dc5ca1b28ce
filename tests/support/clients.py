"""Real MCP clients for tests: the SDK `Client`, with a bearer token, in a chosen protocol era.

`mode` is the SDK's: "legacy" (the initialize handshake and a session,
2025-11-25 and older), "2026-07-28" (the stateless per-request protocol) or
"auto" (probe, then fall back). Tests that must hold for both eras
parametrize over `BOTH_MODES`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

BOTH_MODES = ("legacy", "2026-07-28")


@asynccontextmanager
async def mcp_client(
    url: str,
    *,
    mode: str = "auto",
    bearer: str | None = None,
    headers: dict[str, str] | None = None,
    read_timeout_seconds: float | None = None,
) -> AsyncIterator[Client]:
    """A connected `Client` to `url`, sending `Authorization: Bearer <bearer>` when given."""
    all_headers = dict(headers or {})
    if bearer is not None:
        all_headers["Authorization"] = f"Bearer {bearer}"
    http: httpx2.AsyncClient = create_mcp_http_client(headers=all_headers)
    async with http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, mode=mode, read_timeout_seconds=read_timeout_seconds) as client:
            yield client
