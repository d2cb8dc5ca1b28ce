"""The example inbox server, driven over loopback HTTP by the SDK client in both protocol eras."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError

from tests.support.clients import BOTH_MODES, mcp_client
from tests.support.servers import load_example, run_asgi, run_script

inbox = load_example("examples/inbox/server.py")

ALICE = {"Bearer alice-secret": "alice"}
TIMEOUT = 20


def run(body: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        with anyio.fail_after(TIMEOUT):
            await body()

    anyio.run(bounded)


def only_text(result: types.CallToolResult) -> str:
    assert len(result.content) == 1
    block = result.content[0]
    assert isinstance(block, types.TextContent)
    return block.text


@pytest.mark.parametrize("mode", BOTH_MODES)
def test_lists_about_thirty_tools_each_described_with_an_object_schema(mode: str) -> None:
    async def body() -> None:
        with run_asgi(inbox.build_app()) as url:
            async with mcp_client(url, mode=mode) as client:
                tools = (await client.list_tools()).tools
        assert 30 <= len(tools) <= 40
        names = [t.name for t in tools]
        assert len(set(names)) == len(names)
        assert {"fetch_mails", "search_mails", "send_mail", "delete_mail", "get_thread"} <= set(names)
        for tool in tools:
            assert tool.description and len(tool.description) > 15, tool.name
            assert tool.input_schema["type"] == "object", tool.name
        by_name = {t.name: t for t in tools}
        assert by_name["fetch_mails"].output_schema is not None
        assert by_name["search_mails"].input_schema["required"] == ["query"]

    run(body)


@pytest.mark.parametrize("mode", BOTH_MODES)
def test_each_call_is_recorded_with_the_authorization_header_it_carried(mode: str) -> None:
    record = inbox.CallRecord()
    users = {"Bearer alice-secret": "alice", "Bearer bob-secret": "bob"}

    async def body() -> None:
        with run_asgi(inbox.build_app(record=record, required_auth=users)) as url:
            async with mcp_client(url, mode=mode, bearer="alice-secret") as alice:
                as_alice = await alice.call_tool("whoami", {})
            async with mcp_client(url, mode=mode, bearer="bob-secret") as bob:
                as_bob = await bob.call_tool("search_mails", {"query": "offsite"})
        assert as_alice.structured_content == {"user": "alice", "authenticated": True}
        assert not as_bob.is_error

    run(body)
    assert [(c.tool, c.arguments, c.authorization) for c in record.calls] == [
        ("whoami", {}, "Bearer alice-secret"),
        ("search_mails", {"query": "offsite"}, "Bearer bob-secret"),
    ]


@pytest.mark.parametrize("mode", BOTH_MODES)
def test_a_call_without_a_known_credential_gets_a_401_error_result(mode: str) -> None:
    record = inbox.CallRecord()

    async def body() -> None:
        with run_asgi(inbox.build_app(record=record, required_auth=ALICE)) as url:
            async with mcp_client(url, mode=mode) as anonymous:
                missing = await anonymous.call_tool("fetch_mails", {})
            async with mcp_client(url, mode=mode, bearer="guessed") as guesser:
                wrong = await guesser.call_tool("fetch_mails", {})
        for result in (missing, wrong):
            assert result.is_error
            assert only_text(result).startswith("401 Unauthorized")

    run(body)
    assert [c.authorization for c in record.calls] == [None, "Bearer guessed"]


@pytest.mark.parametrize("mode", BOTH_MODES)
def test_results_keep_their_shapes_structured_mixed_and_error(mode: str) -> None:
    async def body() -> None:
        with run_asgi(inbox.build_app()) as url:
            async with mcp_client(url, mode=mode) as client:
                fetched = await client.call_tool("fetch_mails", {"limit": 3})
                mixed = await client.call_tool("get_attachment", {"mail_id": "m-006", "attachment_id": "a-2"})
                failed = await client.call_tool("export_mailbox", {})
                not_found = await client.call_tool("get_mail", {"mail_id": "m-999"})
        assert not fetched.is_error
        assert isinstance(fetched.structured_content, dict)
        assert [m["id"] for m in fetched.structured_content["mails"]] == ["m-009", "m-008", "m-007"]
        assert fetched.structured_content["total"] == 9
        assert [block.type for block in mixed.content] == ["text", "image", "resource"]
        image = mixed.content[1]
        assert isinstance(image, types.ImageContent) and image.mime_type == "image/png"
        assert failed.is_error and "disabled" in only_text(failed)
        assert not_found.is_error and "m-999" in only_text(not_found)

    run(body)


@pytest.mark.parametrize("mode", BOTH_MODES)
def test_state_changes_are_visible_to_later_calls(mode: str) -> None:
    async def body() -> None:
        with run_asgi(inbox.build_app()) as url:
            async with mcp_client(url, mode=mode) as client:
                await client.call_tool("archive_mail", {"mail_id": "m-004"})
                inbox_after = await client.call_tool("fetch_mails", {"folder": "inbox", "limit": 100})
                archive_after = await client.call_tool("fetch_mails", {"folder": "archive"})
        assert isinstance(inbox_after.structured_content, dict) and isinstance(archive_after.structured_content, dict)
        assert "m-004" not in [m["id"] for m in inbox_after.structured_content["mails"]]
        assert "m-004" in [m["id"] for m in archive_after.structured_content["mails"]]

    run(body)


def test_an_unknown_tool_is_a_protocol_error() -> None:
    async def body() -> None:
        with run_asgi(inbox.build_app()) as url:
            async with mcp_client(url, mode="legacy") as client:
                with pytest.raises(MCPError, match="Unknown tool"):
                    await client.call_tool("no_such_tool", {})

    run(body)


def test_the_slow_tool_outlasts_a_short_client_timeout() -> None:
    async def body() -> None:
        with run_asgi(inbox.build_app()) as url:
            async with mcp_client(url, mode="legacy") as client:
                with pytest.raises(MCPError):
                    await client.call_tool("sync_mailbox", {"sleep_ms": 30_000}, read_timeout_seconds=0.2)
                quick = await client.call_tool("sync_mailbox", {"sleep_ms": 0})
        assert only_text(quick) == "Mailbox synchronised after 0 ms."

    run(body)


def test_the_session_protocol_declares_tools_list_changed() -> None:
    async def body() -> None:
        with run_asgi(inbox.build_app()) as url:
            async with mcp_client(url, mode="legacy") as client:
                capabilities = client.server_capabilities
        assert capabilities.tools is not None and capabilities.tools.list_changed is True

    run(body)


@pytest.mark.parametrize("mode", BOTH_MODES)
def test_prompts_and_resources_are_served_for_deny_by_default_tests(mode: str) -> None:
    async def body() -> None:
        with run_asgi(inbox.build_app()) as url:
            async with mcp_client(url, mode=mode) as client:
                prompts = await client.list_prompts()
                prompt = await client.get_prompt("draft_reply", {"mail_id": "m-004", "tone": "brief"})
                resources = await client.list_resources()
                signature = await client.read_resource("inbox://signature")
        assert [p.name for p in prompts.prompts] == ["summarize_inbox", "draft_reply"]
        message = prompt.messages[0].content
        assert isinstance(message, types.TextContent) and "ramen" in message.text
        assert [r.uri for r in resources.resources] == ["inbox://signature", "inbox://stats"]
        contents = signature.contents[0]
        assert isinstance(contents, types.TextResourceContents) and contents.text.startswith("Alice Example")

    run(body)


def test_the_seeded_mailbox_is_the_same_every_time() -> None:
    first: Any = inbox.seed_mailbox()
    second: Any = inbox.seed_mailbox()
    assert first == second
    assert first is not second and first.mails is not second.mails


def test_runs_as_a_process_and_prints_its_url_when_ready() -> None:
    argv = ["examples/inbox/server.py", "--port", "0", "--auth", "alice=alice-secret"]
    with run_script(argv) as script:
        assert script.ready_line.startswith("inbox MCP server ready at http://127.0.0.1:")

        async def body() -> None:
            async with mcp_client(script.url, mode="auto", bearer="alice-secret") as client:
                result = await client.call_tool("whoami", {})
            assert result.structured_content == {"user": "alice", "authenticated": True}

        run(body)
