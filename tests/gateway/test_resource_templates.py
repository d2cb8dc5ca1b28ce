"""Resource templates: deny by default; an exposed one is listed as the upstream lists it, and URIs it matches are read."""

from __future__ import annotations

import json

import pytest
from mcp.shared.exceptions import MCPError

from tests.gateway.conftest import Stack
from tests.support.agent import MODES, Mode, agent

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("mode", MODES)
async def test_only_the_exposed_template_is_listed_as_the_upstream_lists_it(stack: Stack, mode: Mode) -> None:
    async with agent(stack.url, stack.mint("alice@example.com"), mode) as client:
        templates = (await client.list_resource_templates()).resource_templates
    assert [(t.uri_template, t.name, t.mime_type) for t in templates] == [("inbox://mails/{mail_id}", "mail", "application/json")]


@pytest.mark.parametrize("mode", MODES)
async def test_a_uri_the_exposed_template_matches_is_read_from_the_upstream(stack: Stack, mode: Mode) -> None:
    async with agent(stack.url, stack.mint("alice@example.com"), mode) as client:
        result = await client.read_resource("inbox://mails/m-001")
    assert json.loads(result.contents[0].text)["id"] == "m-001"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "uri",
    [
        "inbox://folders/inbox",  # the upstream's other template, not exposed
        "inbox://mails/m-001/extra",  # {mail_id} is one segment, never a path
        "inbox://mails",  # the literal part alone
        "inbox://stats",  # a static resource that is not exposed
    ],
)
async def test_a_uri_no_exposed_template_matches_is_refused_like_a_missing_one(stack: Stack, uri: str) -> None:
    async with agent(stack.url, stack.mint("alice@example.com"), "2026-07-28") as client:
        with pytest.raises(MCPError) as refused:
            await client.read_resource(uri)
    assert (refused.value.error.code, refused.value.error.message) == (-32602, f"Resource not found: {uri}")
    denied = [e for e in stack.audit.events if e.method == "resources/read" and e.tool == uri]
    assert denied and denied[-1].decision == "deny"
