"""`completion/complete` through the gateway: relayed for what is exposed, refused like a missing thing otherwise."""

from __future__ import annotations

import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError

from tests.gateway.conftest import Stack
from tests.support.agent import MODES, Mode, agent

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("mode", MODES)
async def test_an_exposed_prompt_is_completed_by_its_upstream(stack: Stack, mode: Mode) -> None:
    async with agent(stack.url, stack.mint("alice@example.com"), mode) as client:
        result = await client.complete(types.PromptReference(name="summarize_inbox"), {"name": "max_items", "value": "1"})
    assert result.completion.values == ["10"]  # the inbox's own suggestions, filtered by the typed prefix


@pytest.mark.parametrize("mode", MODES)
async def test_a_hidden_prompt_gets_the_error_of_a_missing_one(stack: Stack, mode: Mode) -> None:
    async with agent(stack.url, stack.mint("alice@example.com"), mode) as client:
        with pytest.raises(MCPError) as hidden:
            await client.complete(types.PromptReference(name="draft_reply"), {"name": "tone", "value": "f"})
        with pytest.raises(MCPError) as missing:
            await client.complete(types.PromptReference(name="no_such_prompt"), {"name": "tone", "value": "f"})
    assert hidden.value.error.code == missing.value.error.code == -32602
    assert hidden.value.error.message == "Unknown prompt: draft_reply"
    assert missing.value.error.message == "Unknown prompt: no_such_prompt"
    denied = [e for e in stack.audit.events if e.method == "completion/complete" and e.tool == "draft_reply"]
    assert denied and denied[-1].decision == "deny" and denied[-1].connection is None


async def test_an_allowed_completion_is_audited_with_its_connection(stack: Stack) -> None:
    async with agent(stack.url, stack.mint("bob@example.com"), "2026-07-28") as client:
        await client.complete(types.PromptReference(name="summarize_inbox"), {"name": "max_items", "value": ""})
    allowed = [e for e in stack.audit.events if e.method == "completion/complete" and e.user == "bob@example.com"]
    assert [(e.decision, e.tool, e.connection) for e in allowed] == [("allow", "summarize_inbox", "inbox")]
@pytest.mark.parametrize("mode", MODES)
async def test_an_exposed_template_is_completed_and_a_hidden_one_is_not(stack: Stack, mode: Mode) -> None:
    async with agent(stack.url, stack.mint("alice@example.com"), mode) as client:
        mail = await client.complete(types.ResourceTemplateReference(uri="inbox://mails/{mail_id}"), {"name": "mail_id", "value": "m-00"})
        with pytest.raises(MCPError) as hidden:
            await client.complete(types.ResourceTemplateReference(uri="inbox://folders/{folder}"), {"name": "folder", "value": "i"})
    assert mail.completion.values and all(v.startswith("m-00") for v in mail.completion.values)
    assert hidden.value.error.code == -32602
    assert hidden.value.error.message == "Resource not found: inbox://folders/{folder}"


