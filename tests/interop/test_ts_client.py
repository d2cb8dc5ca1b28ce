"""The official TypeScript SDK client against a gateway fronting the inbox example.

The Python tests drive the gateway with the Python SDK, the same SDK the
gateway is built on, so a shared misreading of the spec would go unnoticed.
This is the other side's client: `@modelcontextprotocol/sdk` (pinned in
package-lock.json) running tests/interop/ts_client.mjs, which connects with the
session protocol's handshake at the TypeScript SDK's own protocol version.

The stack is the one every gateway test uses (tests/gateway/conftest.py): the
inbox upstream demanding per-user credentials, a gateway exposing seven of its
tools (one renamed), and tokens minted on the admin API. Needs Node and the
npm packages (`npm ci` at the repository root); skips and says why otherwise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import pytest

from tests.gateway.conftest import ALICE_SECRET, Stack, stack  # noqa: F401 - `stack` is the fixture
from tests.support.servers import REPO_ROOT

pytestmark = pytest.mark.interop

SCRIPT = REPO_ROOT / "tests" / "interop" / "ts_client.mjs"
SDK = REPO_ROOT / "node_modules" / "@modelcontextprotocol" / "sdk"
LOCAL_NODE = REPO_ROOT / "node_modules" / ".bin" / "node"
CLIENT_TIMEOUT = 60

# What the summarizer's mappings allow (tests/gateway/conftest.py), under exposed names.
ALLOWLISTED = {
    "inbox_fetch_mails",
    "search_mails",
    "get_attachment",
    "export_mailbox",
    "sync_mailbox",
    "whoami",
    "get_mailbox_stats",
}


def node() -> str | None:
    if LOCAL_NODE.exists():
        return str(LOCAL_NODE)
    return shutil.which("node")


def missing() -> str | None:
    if node() is None:
        return "node is not installed"
    if not SDK.is_dir():
        return "the TypeScript SDK is not installed: run `npm ci` at the repository root"
    return None


needs_node = pytest.mark.skipif(missing() is not None, reason=str(missing()))


def ts_client(url: str, token: str | None, tool: str | None = None, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the TypeScript client once; its single line of JSON output."""
    argv = [str(node()), str(SCRIPT), "--url", url]
    if token is not None:
        argv += ["--token", token]
    if tool is not None:
        argv += ["--tool", tool, "--args", json.dumps(args or {})]
    completed = subprocess.run(
        argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=CLIENT_TIMEOUT, stdin=subprocess.DEVNULL
    )
    lines = completed.stdout.strip().splitlines()
    assert lines, f"no output (exit {completed.returncode}); stderr:\n{completed.stderr[-3000:]}"
    answer: dict[str, Any] = json.loads(lines[-1])
    assert (completed.returncode == 0) == answer["ok"], (completed.returncode, answer, completed.stderr[-2000:])
    return answer


@needs_node
def test_the_typescript_client_lists_exactly_the_allowlisted_tools(stack: Stack) -> None:
    answer = ts_client(stack.url, stack.mint("alice@example.com"))
    assert answer["ok"], answer
    assert sorted(answer["tools"]) == sorted(ALLOWLISTED)
    assert answer["serverInfo"]["name"] == "portcullis/acme/summarizer"
    # The session-protocol handshake was negotiated, not assumed.
    assert answer["protocolVersion"] in {"2025-11-25", "2025-06-18", "2025-03-26"}


@needs_node
def test_the_typescript_client_calls_an_allowed_tool_with_the_users_credential(stack: Stack) -> None:
    before = len(stack.record.calls_of("whoami"))
    answer = ts_client(stack.url, stack.mint("alice@example.com"), "whoami")
    assert answer["ok"], answer
    result = answer["result"]
    assert result.get("isError") is not True
    assert result["structuredContent"] == {"user": "alice@example.com", "authenticated": True}
    arrived = stack.record.calls_of("whoami")[before:]
    assert [c.authorization for c in arrived] == [f"Bearer {ALICE_SECRET}"]


@needs_node
def test_a_tool_outside_the_allowlist_is_an_error_and_never_reaches_the_upstream(stack: Stack) -> None:
    before = len(stack.record)
    # delete_mail exists upstream; the summarizer does not expose it.
    answer = ts_client(stack.url, stack.mint("alice@example.com"), "delete_mail", {"id": "m-001"})
    assert not answer["ok"], answer
    assert answer["code"] == -32602
    assert "delete_mail" in answer["error"]
    assert "delete_mail" not in stack.record.tools()[before:]


@needs_node
def test_the_typescript_client_without_a_token_is_refused_with_401(stack: Stack) -> None:
    before = len(stack.record)
    answer = ts_client(stack.url, None)
    assert not answer["ok"], answer
    # The SDK's StreamableHTTPError carries the HTTP status as its code.
    assert answer["code"] == 401, answer
    assert "missing bearer token" in answer["error"]
    assert len(stack.record) == before
