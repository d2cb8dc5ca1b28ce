"""The gateway as agents see it: real MCP clients (both protocol eras) against a real upstream."""

from __future__ import annotations

import anyio
import pytest
from mcp.shared.exceptions import MCPError

from tests.gateway.conftest import ALICE_SECRET, BOB_SECRET, Stack, inbox

pytestmark = pytest.mark.anyio
from tests.support.agent import MODES, Mode, agent, result_text

ALLOWED = {"fetch_mails": "inbox_fetch_mails", "search_mails": "search_mails", "get_attachment": "get_attachment",
           "export_mailbox": "export_mailbox", "sync_mailbox": "sync_mailbox", "whoami": "whoami",
           "get_mailbox_stats": "get_mailbox_stats"}  # the ToolMapping of conftest.py: upstream name -> exposed name
# In the upstream's own order (its tools/list), renamed: an agent sees what it would see directly, less what is hidden.
EXPOSED = [ALLOWED[name] for name in inbox.TOOLS if name in ALLOWED]


@pytest.mark.parametrize("mode", MODES)
async def test_tools_list_is_exactly_the_allowlist_renamed_with_overrides(stack: Stack, mode: Mode) -> None:
    token = stack.mint("alice@example.com")
    async with agent(stack.url, token, mode) as client:
        tools = (await client.list_tools()).tools
    assert [t.name for t in tools] == EXPOSED  # the "down" upstream's tool is absent
    by_name = {t.name: t for t in tools}
    assert by_name["search_mails"].description == "Search the user's mail (read only)."
    assert "query" in by_name["search_mails"].input_schema["properties"]
    assert by_name["get_mailbox_stats"].output_schema is not None


@pytest.mark.parametrize("mode", MODES)
async def test_an_allowed_call_reaches_the_upstream_under_its_upstream_name(stack: Stack, mode: Mode) -> None:
    token = stack.mint("alice@example.com")
    before = len(stack.record.calls_of("fetch_mails"))
    async with agent(stack.url, token, mode) as client:
        result = await client.call_tool("inbox_fetch_mails", {"limit": 2})
    assert not result.is_error
    assert result_text(result)
    assert len(stack.record.calls_of("fetch_mails")) == before + 1


@pytest.mark.parametrize("mode", MODES)
async def test_a_tool_outside_the_allowlist_is_refused_like_a_missing_one_and_never_arrives(stack: Stack, mode: Mode) -> None:
    token = stack.mint("alice@example.com")
    async with agent(stack.url, token, mode) as client:
        with pytest.raises(MCPError) as hidden:
            await client.call_tool("send_mail", {"to": ["x@example.com"], "subject": "s", "body": "b"})
        with pytest.raises(MCPError) as missing:
            await client.call_tool("no_such_tool_anywhere", {})
    assert "send_mail" not in stack.record.tools()
    assert hidden.value.error.code == missing.value.error.code
    assert hidden.value.error.message.replace("send_mail", "X") == missing.value.error.message.replace("no_such_tool_anywhere", "X")
    denial = [e for e in stack.audit.events if e.tool == "send_mail"][-1]
    assert (denial.decision, denial.reason, denial.user) == ("deny", "not_exposed", "alice@example.com")


@pytest.mark.parametrize("mode", MODES)
async def test_each_user_reaches_the_upstream_with_their_own_credential(stack: Stack, mode: Mode) -> None:
    stack.record.clear()
    async with agent(stack.url, stack.mint("alice@example.com"), mode) as alice:
        alice_seen = await alice.call_tool("whoami", {})
    async with agent(stack.url, stack.mint("bob@example.com"), mode) as bob:
        bob_seen = await bob.call_tool("whoami", {})
    assert alice_seen.structured_content == {"user": "alice@example.com", "authenticated": True}
    assert bob_seen.structured_content == {"user": "bob@example.com", "authenticated": True}
    assert [c.authorization for c in stack.record.calls_of("whoami")] == [f"Bearer {ALICE_SECRET}", f"Bearer {BOB_SECRET}"]


@pytest.mark.parametrize("mode", MODES)
async def test_results_are_relayed_faithfully(stack: Stack, mode: Mode) -> None:
    token = stack.mint("alice@example.com")
    async with agent(stack.url, token, mode) as client:
        mixed = await client.call_tool("get_attachment", {"mail_id": "m-006", "attachment_id": "a-2"})
        failing = await client.call_tool("export_mailbox", {})
        stats = await client.call_tool("get_mailbox_stats", {})
    kinds = [c.type for c in mixed.content]
    assert kinds == ["text", "image", "resource"], kinds
    assert mixed.content[1].data and mixed.content[2].resource.blob
    assert failing.is_error and "disabled" in result_text(failing)
    assert stats.structured_content is not None and stats.structured_content["owner"] == "alice@example.com"


async def test_the_upstream_identity_is_not_relayed_in_meta(stack: Stack) -> None:
    token = stack.mint("alice@example.com")
    async with agent(stack.url, token, "2026-07-28") as client:
        result = await client.call_tool("whoami", {})
    meta = result.meta or {}
    assert "inbox" not in str(meta)


async def test_a_user_without_a_credential_is_told_to_connect_first(stack: Stack) -> None:
    stack.record.clear()
    status, answer = stack.admin("POST", "/v1/tokens", {"user": "carol@example.com"})
    assert status == 409 and answer["missing"] == ["inbox"]
    # A token minted before the credential was deleted: the next call is cut off.
    await stack.gw.gateway.vault.put("acme", "dave@example.com", "inbox", "dave-secret")
    token = stack.mint("dave@example.com")
    await stack.gw.gateway.vault.delete("acme", "dave@example.com", "inbox")
    async with agent(stack.url, token, "2026-07-28") as client:
        result = await client.call_tool("whoami", {})
    assert result.is_error
    assert "connect inbox first" in result_text(result)
    assert stack.record.calls_of("whoami") == []


async def test_a_down_upstream_gives_a_clear_error_and_the_gateway_keeps_serving(stack: Stack) -> None:
    token = stack.mint("alice@example.com")
    # The down upstream's tool is allowlisted but unknown, so it is refused as unknown;
    # its connection is named in the gateway's status instead.
    status, body = stack.admin("GET", "/v1/status")
    assert body["connections"]["down"]["error"] and "unreachable" in body["connections"]["down"]["error"]
    async with agent(stack.url, token, "2026-07-28") as client:
        with pytest.raises(MCPError):
            await client.call_tool("anything", {})
        ok = await client.call_tool("whoami", {})
    assert not ok.is_error


async def test_a_slow_call_does_not_stall_other_calls(stack: Stack) -> None:
    token = stack.mint("alice@example.com")
    fast_done_while_slow_running = anyio.Event()
    slow_finished = False

    async def slow() -> None:
        nonlocal slow_finished
        async with agent(stack.url, token, "2026-07-28") as client:
            await client.call_tool("sync_mailbox", {"sleep_ms": 3000})
        slow_finished = True

    async def fast() -> None:
        async with agent(stack.url, token, "2026-07-28") as client:
            for _ in range(5):
                await client.call_tool("whoami", {})
        if not slow_finished:
            fast_done_while_slow_running.set()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            tg.start_soon(fast)
    assert fast_done_while_slow_running.is_set()


@pytest.mark.parametrize("mode", MODES)
async def test_prompts_and_resources_are_denied_unless_listed(stack: Stack, mode: Mode) -> None:
    token = stack.mint("alice@example.com")
    async with agent(stack.url, token, mode) as client:
        prompts = (await client.list_prompts()).prompts
        resources = (await client.list_resources()).resources
        prompt = await client.get_prompt("summarize_inbox", {})
        with pytest.raises(MCPError):
            await client.get_prompt("draft_reply", {"mail_id": "m-006"})
        with pytest.raises(MCPError):
            await client.read_resource("inbox://stats")
        signature = await client.read_resource("inbox://signature")
    assert [p.name for p in prompts] == ["summarize_inbox"]
    assert [str(r.uri) for r in resources] == ["inbox://signature"]
    assert prompt.messages
    assert signature.contents
