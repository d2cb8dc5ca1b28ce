"""Read-only session tokens: they see and call only read-only tools, on list and call alike.

The sample inbox (an MCP SDK server) annotates its tools with mixed `readOnlyHint`s, and a
ToolMapping can override them (`readOnly`). The inbox's own call record shows that nothing a
read-only token may not use ever reached it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
import yaml
from mcp.shared.exceptions import MCPError

from portcullis.gateway.audit import MemoryAuditSink
from portcullis.gateway.local import admin_secret
from portcullis.serve import LocalGateway, local_gateway
from tests.support.agent import MODES, Mode, agent
from tests.support.one_upstream import mint, sample_inbox

NS = "acme"
TOOLS = [
    {"name": "get_mail"},                     # readOnlyHint: true upstream
    {"name": "send_mail"},                    # readOnlyHint: false upstream
    {"name": "list_labels", "readOnly": False},  # readOnlyHint: true upstream, overridden by the mapping
    {"name": "list_drafts", "as": "drafts"},  # readOnlyHint: true upstream, renamed
    {"name": "delete_label", "readOnly": True},  # destructive upstream; the mapping's word wins (a test of the override only)
]
READ_ONLY_VISIBLE = {"get_mail", "drafts", "delete_label"}


@dataclass
class Stack:
    gw: LocalGateway
    state: Path
    record: Any
    audit: MemoryAuditSink

    def mint(self, **body: Any) -> str:
        return mint(self.gw, self.state, "ada", **body)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with sample_inbox() as (url, record):
        docs = [
            {"apiVersion": "portcullis.dev/v1alpha1", "kind": "MCPConnection", "metadata": {"name": "inbox", "namespace": NS},
             "spec": {"url": url}},
            {"apiVersion": "portcullis.dev/v1alpha1", "kind": "VirtualMCPServer", "metadata": {"name": "s", "namespace": NS}},
            {"apiVersion": "portcullis.dev/v1alpha1", "kind": "ToolMapping", "metadata": {"name": "m", "namespace": NS},
             "spec": {"serverRef": {"name": "s"}, "connectionRef": {"name": "inbox"}, "tools": TOOLS}},
        ]
        path = tmp_path / "m.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        audit = MemoryAuditSink()
        with local_gateway([path], state_dir=tmp_path / "state", port=0, admin_port=0, audit=audit) as gw:
            yield Stack(gw, tmp_path / "state", record, audit)


def session(stack: Stack, token: str, mode: Mode, calls: list[tuple[str, dict[str, Any]]]) -> tuple[set[str], list[str]]:
    """The names listed, and per call "ok", "tool error" or the JSON-RPC error's message."""

    async def run() -> tuple[set[str], list[str]]:
        async with agent(stack.gw.url, token, mode) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            outcomes = []
            for name, arguments in calls:
                try:
                    result = await client.call_tool(name, arguments)
                    outcomes.append("tool error" if result.is_error else "ok")
                except MCPError as exc:
                    outcomes.append(str(exc))
            return names, outcomes

    return anyio.run(run)


CALLS = [
    ("get_mail", {"mail_id": "m-001"}),
    ("send_mail", {"to": ["bob@example.com"], "subject": "hi", "body": "!"}),
    ("list_labels", {}),
    ("drafts", {}),
]


@pytest.mark.parametrize("mode", MODES)
def test_a_read_only_token_sees_and_calls_only_read_only_tools(stack: Stack, mode: Mode) -> None:
    names, outcomes = session(stack, stack.mint(access="read-only"), mode, CALLS)
    assert names == READ_ONLY_VISIBLE
    assert outcomes == ["ok", "Unknown tool: send_mail", "Unknown tool: list_labels", "ok"]
    assert stack.record.tools() == ["get_mail", "list_drafts"]  # nothing else reached the inbox
    denied = [e for e in stack.audit.events if e.decision == "deny"]
    assert [(e.tool, e.reason) for e in denied] == [("send_mail", "read_only_token"), ("list_labels", "read_only_token")]
    assert all(e.detail == "access level read-only" for e in denied)


@pytest.mark.parametrize("mode", MODES)
def test_a_full_token_sees_everything_the_mapping_exposes(stack: Stack, mode: Mode) -> None:
    names, outcomes = session(stack, stack.mint(), mode, CALLS)
    assert names == {"get_mail", "send_mail", "list_labels", "drafts", "delete_label"}
    assert outcomes == ["ok", "ok", "ok", "ok"]


def test_read_only_and_a_narrower_tools_scope_both_apply(stack: Stack) -> None:
    token = stack.mint(access="read-only", tools=["get_mail", "send_mail", "list_labels"])
    names, outcomes = session(stack, token, "2026-07-28", CALLS)
    assert names == {"get_mail"}
    assert outcomes == ["ok", "Unknown tool: send_mail", "Unknown tool: list_labels", "Unknown tool: drafts"]
    reasons = [e.reason for e in stack.audit.events if e.decision == "deny"]
    assert reasons == ["read_only_token", "read_only_token", "outside_token_scope"]


def test_minting_refuses_an_unknown_access_level(stack: Stack) -> None:
    answer = httpx2.post(stack.gw.admin_url + "/v1/tokens", json={"user": "ada", "access": "admin"},
                         headers={"Authorization": f"Bearer {admin_secret(stack.state)}"}, timeout=10)
    assert answer.status_code == 400 and answer.json()["field"] == "access"
