"""A session-era (2025-11-25) MCP client on the wire, for what the SDK's client does not speak.

The MCP SDK's Python client has no client side of the task extension: it validates a
task-augmented call's answer as a tool result and cannot poll a task. This client sends
JSON-RPC over Streamable HTTP itself, reads each answer's event stream, and answers what
the server asks on it (elicitation, sampling, a task poll) with the `answer` it was given,
so a test can hold a direct session and a gateway session to the same standard.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2

VERSION = "2025-11-25"
Answer = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
"""What the client answers a request the server sends it: (method, params) -> result."""


async def refuse(method: str, params: dict[str, Any]) -> dict[str, Any]:
    raise AssertionError(f"the server asked {method}, which this test does not expect")


@dataclass
class RawSession:
    url: str
    token: str | None
    http: httpx2.AsyncClient
    answer: Answer = refuse
    session_id: str | None = None
    asked: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    """Every request the server sent this client, in order."""
    notices: list[dict[str, Any]] = field(default_factory=list)
    """Every notification that came on a request's stream."""
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": VERSION}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.session_id:
            headers["Mcp-Session-Id"] = self.session_id
        return headers

    async def initialize(self, capabilities: dict[str, Any] | None = None) -> dict[str, Any]:
        params = {"protocolVersion": VERSION, "capabilities": capabilities or {}, "clientInfo": {"name": "raw", "version": "1"}}
        result = await self.request("initialize", params)
        await self.notify("notifications/initialized", {})
        return result

    async def notify(self, method: str, params: dict[str, Any]) -> None:
        response = await self.http.post(self.url, json={"jsonrpc": "2.0", "method": method, "params": params}, headers=self.headers())
        assert response.status_code in (200, 202), response.text

    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """The result (an error answer fails the test with its text; use `call` to see errors)."""
        answer = await self.call(method, params)
        assert "result" in answer, answer
        result = answer["result"]
        assert isinstance(result, dict)
        return result

    async def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """The whole JSON-RPC answer to one request, answering what the server asks meanwhile."""
        request_id = next(self._ids)
        body = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        async with self.http.stream("POST", self.url, json=body, headers=self.headers()) as response:
            assert response.status_code == 200, (await response.aread()).decode()
            if self.session_id is None and "mcp-session-id" in response.headers:
                self.session_id = response.headers["mcp-session-id"]
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                message = json.loads(await response.aread())
                assert isinstance(message, dict)
                return message
            async for message in _messages(response):
                if message.get("id") == request_id and "method" not in message:
                    return message
                await self._take(message)
        raise AssertionError(f"the stream of {method} ended without its answer")

    async def _take(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params") or {}
        if not isinstance(method, str):
            return
        if "id" not in message:
            self.notices.append(message)
            return
        self.asked.append((method, params))
        reply = {"jsonrpc": "2.0", "id": message["id"], "result": await self.answer(method, params)}
        response = await self.http.post(self.url, json=reply, headers=self.headers())
        assert response.status_code in (200, 202), response.text

    @asynccontextmanager
    async def stream(self) -> AsyncIterator[list[dict[str, Any]]]:
        """The session's GET stream, open until the block ends: the messages it brings, as they come."""
        seen: list[dict[str, Any]] = []
        async with self.http.stream("GET", self.url, headers=self.headers(), timeout=httpx2.Timeout(30, read=None)) as response:
            assert response.status_code == 200

            async def read() -> None:
                async for message in _messages(response):
                    seen.append(message)

            async with anyio.create_task_group() as group:
                group.start_soon(read)
                try:
                    yield seen
                finally:
                    group.cancel_scope.cancel()


async def _messages(response: httpx2.Response) -> AsyncIterator[dict[str, Any]]:
    data: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            text, data = "\n".join(data), []
            message = json.loads(text) if text else None  # an event with no data primes a resumable stream
            if isinstance(message, dict):
                yield message
