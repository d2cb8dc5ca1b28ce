"""An upstream's list_changed reaches the gateway's catalog, and its agents, without waiting for the refresh timer.

The upstream here is a small SDK server whose tool and prompt lists grow when told
to (an `add` tool, called directly, not through the gateway). It announces each
change the way its protocol era does: on `subscriptions/listen` streams
(2026-07-28) and on each session's standalone GET stream (the session protocol).
For the session protocol it is wrapped so that it refuses `server/discover`, as a
server that predates 2026-07-28 does, which makes the gateway speak sessions to it.

The gateway's refresh timer is left at its default (minutes), far beyond the
bounded waits here, so a pass means the change arrived by notification.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest
import yaml
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import NotificationOptions, Server
from mcp.server.models import InitializationOptions
from mcp.server.session import ServerSession
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, PromptsListChanged, ToolsListChanged
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from portcullis.gateway.audit import MemoryAuditSink
from portcullis.gateway.local import admin_secret
from portcullis.serve import LocalGateway, local_gateway
from tests.support.agent import agent
from tests.support.clients import mcp_client
from tests.support.servers import run_asgi

pytestmark = pytest.mark.anyio

MODERN = "2026-07-28"
ERAS = (MODERN, "legacy")
WAIT_SECONDS = 15
Ctx = ServerRequestContext[Any, Any]


def _tool(name: str) -> types.Tool:
    return types.Tool(name=name, description=f"The {name} tool.", input_schema={"type": "object", "properties": {}})


class ChangingUpstream:
    """An upstream whose lists grow on request, announcing each change to every listener it has."""

    def __init__(self) -> None:
        self.tools = [_tool("stable"), _tool("add")]
        self.prompts = [types.Prompt(name="greeting", description="Say hello.")]
        self.bus = InMemorySubscriptionBus()
        self.sessions: list[ServerSession] = []  # session-protocol peers, told on their GET streams
        self.requests: list[tuple[str, str | None]] = []  # (HTTP method, Mcp-Method header)

    def server(self) -> Server[Any]:
        async def list_tools(ctx: Ctx, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
            self._remember(ctx)
            return types.ListToolsResult(tools=list(self.tools))

        async def list_prompts(ctx: Ctx, params: types.PaginatedRequestParams | None) -> types.ListPromptsResult:
            self._remember(ctx)
            return types.ListPromptsResult(prompts=list(self.prompts))

        async def call_tool(ctx: Ctx, params: types.CallToolRequestParams) -> types.CallToolResult:
            args = params.arguments or {}
            if params.name == "add" and "tool" in args:
                self.tools.append(_tool(str(args["tool"])))
                await self.bus.publish(ToolsListChanged())
                for session in self.sessions:
                    await session.send_tool_list_changed()
            elif params.name == "add" and "prompt" in args:
                self.prompts.append(types.Prompt(name=str(args["prompt"])))
                await self.bus.publish(PromptsListChanged())
                for session in self.sessions:
                    await session.send_prompt_list_changed()
            return types.CallToolResult(content=[types.TextContent(text=params.name)])

        return _ChangingServer(
            "changing",
            version="1.0.0",
            on_list_tools=list_tools,
            on_call_tool=call_tool,
            on_list_prompts=list_prompts,
            on_subscriptions_listen=ListenHandler(self.bus),
        )

    def _remember(self, ctx: Ctx) -> None:
        if ctx.protocol_version != MODERN and ctx.session not in self.sessions:
            self.sessions.append(ctx.session)

    def app(self, era: str) -> ASGIApp:
        inner = self.server().streamable_http_app(stateless_http=False)

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await inner(scope, receive, send)
                return
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            self.requests.append((scope["method"], headers.get("mcp-method")))
            if era == MODERN or scope["method"] != "POST":
                await inner(scope, receive, send)
                return
            body = await _read_body(receive)
            message = json.loads(body) if body else {}
            if isinstance(message, dict) and message.get("method") == "server/discover":
                # What a server from before 2026-07-28 answers: it has no such method.
                error = {"jsonrpc": "2.0", "id": message.get("id"), "error": {"code": -32601, "message": "Method not found"}}
                await JSONResponse(error, status_code=404)(scope, receive, send)
                return
            await inner(scope, _replay(body, receive), send)

        return app


class _ChangingServer(Server[Any]):
    """Declares listChanged on the session protocol too (the HTTP manager passes no NotificationOptions)."""

    def create_initialization_options(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
    ) -> InitializationOptions:
        options = notification_options or NotificationOptions(tools_changed=True, prompts_changed=True)
        return super().create_initialization_options(options, experimental_capabilities, extensions)


async def _read_body(receive: Receive) -> bytes:
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def manifests(url: str) -> list[dict[str, Any]]:
    meta = {"namespace": "acme"}
    return [
        {"apiVersion": "portcullis.dev/v1alpha1", "kind": "MCPConnection", "metadata": {"name": "changing", **meta},
         "spec": {"url": url, "timeoutSeconds": 5, "credential": {"source": "none"}}},
        {"apiVersion": "portcullis.dev/v1alpha1", "kind": "VirtualMCPServer", "metadata": {"name": "watcher", **meta}},
        {"apiVersion": "portcullis.dev/v1alpha1", "kind": "ToolMapping", "metadata": {"name": "watcher-changing", **meta},
         "spec": {"serverRef": {"name": "watcher"}, "connectionRef": {"name": "changing"},
                  # `late` does not exist upstream yet: allowlisted, not served until the upstream lists it.
                  "tools": [{"name": "stable"}, {"name": "late"}], "prompts": [{"name": "greeting"}]}},
    ]


@contextmanager
def gateway_in_front(upstream: ChangingUpstream, era: str, workdir: Path) -> Iterator[tuple[str, LocalGateway, str]]:
    """Yields the upstream's URL, the gateway, and a session token for it."""
    (workdir / "manifests").mkdir()
    with run_asgi(upstream.app(era)) as upstream_url:
        (workdir / "manifests" / "all.yaml").write_text(yaml.safe_dump_all(manifests(upstream_url)))
        with local_gateway([workdir / "manifests"], state_dir=workdir / "state", port=0, admin_port=0, audit=MemoryAuditSink()) as gw:
            yield upstream_url, gw, mint(gw, workdir / "state")


def mint(gw: LocalGateway, state_dir: Path) -> str:
    request = urllib.request.Request(
        gw.admin_url + "/v1/tokens",
        data=json.dumps({"user": "alice@example.com"}).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {admin_secret(state_dir)}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(json.loads(response.read())["token"])


async def change_upstream(url: str, era: str, **what: str) -> None:
    async with mcp_client(url, mode="legacy" if era != MODERN else MODERN) as client:
        await client.call_tool("add", what)


async def wait_for_tools(client: Any, subscription: Any, expected: list[str]) -> None:
    with anyio.fail_after(WAIT_SECONDS):
        async for _ in subscription:
            # An event from before the change (the first listing landing) is possible; the change is the one wanted.
            if [t.name for t in (await client.list_tools()).tools] == expected:
                return


@pytest.mark.parametrize("era", ERAS)
async def test_a_tool_the_upstream_adds_is_served_without_waiting_for_the_timer(era: str, tmp_path: Path) -> None:
    upstream = ChangingUpstream()
    with gateway_in_front(upstream, era, tmp_path) as (upstream_url, gw, token):
        assert gw.gateway.refresh_seconds >= 60  # far beyond the wait below: only a notification can explain a pass
        async with agent(gw.url, token, MODERN) as client:
            assert [t.name for t in (await client.list_tools()).tools] == ["stable"]
            async with client.listen(tools_list_changed=True) as subscription:
                await change_upstream(upstream_url, era, tool="late")
                await wait_for_tools(client, subscription, ["stable", "late"])
    # The change came down the stream the upstream's era offers.
    stream = ("POST", "subscriptions/listen") if era == MODERN else ("GET", None)
    assert stream in upstream.requests


@pytest.mark.parametrize("era", ERAS)
async def test_a_prompt_list_change_upstream_reaches_agents_listening_for_prompts(era: str, tmp_path: Path) -> None:
    upstream = ChangingUpstream()
    with gateway_in_front(upstream, era, tmp_path) as (upstream_url, gw, token):
        async with agent(gw.url, token, MODERN) as client:
            async with client.listen(tools_list_changed=True, prompts_list_changed=True) as subscription:
                # A tool change first: once it is served, the gateway's stream from the upstream is open,
                # and a prompt change (which has no cache to refresh when a stream opens) cannot be missed.
                await change_upstream(upstream_url, era, tool="late")
                await wait_for_tools(client, subscription, ["stable", "late"])
                await change_upstream(upstream_url, era, prompt="farewell")
                with anyio.fail_after(WAIT_SECONDS):
                    async for event in subscription:
                        if isinstance(event, PromptsListChanged):
                            break
            prompts = [p.name for p in (await client.list_prompts()).prompts]
    assert prompts == ["greeting"]  # told of the change; the new prompt is still not exposed
