"""Connecting to a gateway the way an agent does: the MCP SDK client with a bearer token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

Mode = Literal["legacy", "2026-07-28"]
MODES: tuple[Mode, ...] = ("2026-07-28", "legacy")


@asynccontextmanager
async def agent(url: str, token: str | None, mode: Mode) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        async with Client(streamable_http_client(url, http_client=http), mode=mode) as client:
            yield client


def result_text(result: Any) -> str:
    return " ".join(getattr(c, "text", "") for c in result.content)
