"""Approvals through the admin API: bound to the exact tool and arguments, single use, expiring.

The inbox's call record shows that nothing unapproved ever reached it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
import yaml

from portcullis.gateway.audit import MemoryAuditSink
from portcullis.gateway.local import admin_secret
from portcullis.gateway.policy.approvals import MemoryApprovals, digest
from portcullis.serve import LocalGateway, local_gateway
from tests.support.agent import MODES, Mode, agent, result_text
from tests.support.one_upstream import mint, sample_inbox
from tests.support.servers import portcullis_serve, serve_asgi

NS = "acme"
MAIL = {"to": ["bob@acme.example"], "subject": "quarterly numbers", "body": "attached"}


@dataclass
class Stack:
    gw: LocalGateway
    state: Path
    record: Any
    audit: MemoryAuditSink
    token: str

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx2.Response:
        return httpx2.request(method, self.gw.admin_url + path, headers={"Authorization": f"Bearer {admin_secret(self.state)}"},
                              timeout=15, **kwargs)

    def send(self, mode: Mode = "2026-07-28", arguments: dict[str, Any] | None = None) -> tuple[bool, str]:
        async def run() -> tuple[bool, str]:
            async with agent(self.gw.url, self.token, mode) as client:
                result = await client.call_tool("send_mail", arguments or MAIL)
                return bool(result.is_error), result_text(result)

        return anyio.run(run)


def make_stack(tmp_path: Path, approval: dict[str, Any]) -> Iterator[Stack]:
    with sample_inbox() as (url, record):
        docs = [
            {"apiVersion": "portcullis.dev/v1alpha1", "kind": "MCPConnection", "metadata": {"name": "inbox", "namespace": NS},
             "spec": {"url": url}},
            {"apiVersion": "portcullis.dev/v1alpha1", "kind": "VirtualMCPServer", "metadata": {"name": "s", "namespace": NS}},
            {"apiVersion": "portcullis.dev/v1alpha1", "kind": "ToolMapping", "metadata": {"name": "m", "namespace": NS},
             "spec": {"serverRef": {"name": "s"}, "connectionRef": {"name": "inbox"},
                      "tools": [{"name": "send_mail", "approval": approval}, {"name": "get_mail"}]}},
        ]
        path = tmp_path / "m.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        audit = MemoryAuditSink()
        state = tmp_path / "state"
        with local_gateway([path], state_dir=state, port=0, admin_port=0, audit=audit) as gw:
            yield Stack(gw, state, record, audit, mint(gw, state, "ada"))


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    yield from make_stack(tmp_path, {})


def pending_id(text: str) -> str:
    assert "needs a person's approval: approval " in text, text
    return text.split("approval ")[1].split(" ")[0]


@pytest.mark.parametrize("mode", MODES)
def test_approve_then_exactly_one_call_goes_through(stack: Stack, mode: Mode) -> None:
    failed, text = stack.send(mode)
    assert failed
    approval = pending_id(text)
    assert stack.record.tools() == []  # nothing reached the inbox before the approval
    (listed,) = stack.admin("GET", "/v1/approvals").json()["approvals"]
    assert (listed["id"], listed["user"], listed["tool"], listed["arguments"], listed["state"]) == (approval, "ada", "send_mail", MAIL, "pending")
    assert stack.send(mode)[1] == text  # asking again while pending: the same approval
    decided = stack.admin("POST", f"/v1/approvals/{approval}", json={"decision": "approve"})
    assert decided.status_code == 200 and decided.json()["state"] == "approved"
    failed, text = stack.send(mode)
    assert not failed and text.startswith("Sent ")
    assert stack.record.tools() == ["send_mail"]
    allowed = [e for e in stack.audit.events if e.decision == "allow" and e.tool == "send_mail"]
    assert len(allowed) == 1 and allowed[0].detail is not None and allowed[0].detail.startswith(f"approval {approval} by ")
    # Single use: the same mail again needs a new approval.
    failed, text = stack.send(mode)
    assert failed and pending_id(text) != approval
    assert stack.record.tools() == ["send_mail"]


def test_an_approval_covers_only_its_own_arguments(stack: Stack) -> None:
    approval = pending_id(stack.send()[1])
    assert stack.admin("POST", f"/v1/approvals/{approval}", json={"decision": "approve"}).status_code == 200
    other = {**MAIL, "to": ["eve@evil.example"]}
    failed, text = stack.send(arguments=other)
    assert failed and pending_id(text) != approval  # approving one mail never approves another
    assert stack.record.tools() == []
    assert not stack.send()[0]  # the approved one still goes through, once
    assert [c.tool for c in stack.record.calls] == ["send_mail"]


def test_a_denied_call_is_refused_and_decisions_are_final(stack: Stack) -> None:
    approval = pending_id(stack.send()[1])
    assert stack.admin("POST", f"/v1/approvals/{approval}", json={"decision": "deny"}).json()["state"] == "denied"
    failed, text = stack.send()
    assert failed and "A person denied this call" in text
    assert stack.audit.events[-1].reason == "approval_denied"
    again = stack.admin("POST", f"/v1/approvals/{approval}", json={"decision": "approve"})
    assert again.status_code == 409 and "denied" in again.json()["message"]
    assert stack.admin("POST", "/v1/approvals/nope", json={"decision": "approve"}).status_code == 404
    assert stack.admin("POST", f"/v1/approvals/{approval}", json={"decision": "maybe"}).status_code == 400
    assert stack.record.tools() == []


def test_the_admin_api_needs_the_admin_secret(stack: Stack) -> None:
    assert httpx2.get(stack.gw.admin_url + "/v1/approvals", timeout=10).status_code == 401
    answer = httpx2.post(stack.gw.admin_url + "/v1/approvals/x", json={"decision": "approve"},
                         headers={"Authorization": f"Bearer {stack.token}"}, timeout=10)  # a session token opens nothing here
    assert answer.status_code == 403


def test_a_waiting_call_goes_through_when_approved_meanwhile(tmp_path: Path) -> None:
    for stack in make_stack(tmp_path, {"waitSeconds": 20}):
        async def run() -> tuple[bool, str]:
            async def approve_when_asked() -> None:
                with anyio.fail_after(15):
                    while not (listed := (await anyio.to_thread.run_sync(stack.admin, "GET", "/v1/approvals")).json()["approvals"]):
                        await anyio.sleep(0.1)
                await anyio.to_thread.run_sync(lambda: stack.admin("POST", f"/v1/approvals/{listed[0]['id']}", json={"decision": "approve"}))

            async with anyio.create_task_group() as group, agent(stack.gw.url, stack.token, "2026-07-28") as client:
                group.start_soon(approve_when_asked)
                result = await client.call_tool("send_mail", MAIL)
                return bool(result.is_error), result_text(result)

        failed, text = anyio.run(run)
        assert not failed and text.startswith("Sent "), text
        assert stack.record.tools() == ["send_mail"]


def test_nobody_deciding_within_the_wait_answers_pending(tmp_path: Path) -> None:
    for stack in make_stack(tmp_path, {"waitSeconds": 1}):
        failed, text = stack.send()
        assert failed and pending_id(text)
        assert stack.record.tools() == []


@pytest.mark.anyio
async def test_an_approval_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemoryApprovals()
    wanted = digest("send_mail", MAIL)
    approval = await store.open_for("ada", "send_mail", wanted, MAIL, ttl=60)
    assert (await store.decide(approval.id, True, "boss")) is not None
    later = time.time() + 61
    monkeypatch.setattr("portcullis.gateway.policy.approvals.time.time", lambda: later)
    assert await store.consume(approval.id) is None  # too late: it lets nothing through
    fresh = await store.open_for("ada", "send_mail", wanted, MAIL, ttl=60)
    assert fresh.id != approval.id and fresh.state == "pending"


def test_the_digest_binds_tool_and_arguments_canonically() -> None:
    assert digest("send_mail", {"a": 1, "b": [1, 2]}) == digest("send_mail", {"b": [1, 2], "a": 1})
    assert digest("send_mail", {"a": 1}) != digest("send_mail", {"a": 2})
    assert digest("send_mail", {"a": 1}) != digest("delete_mail", {"a": 1})
    assert digest("t", None) == digest("t", {})


def test_two_replicas_share_approvals_in_postgres(tmp_path: Path, database: str) -> None:
    """Asked on one replica, approved through the other's admin port, used on either, once."""
    with sample_inbox() as (url, record):
        docs = [
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "policy-db", "namespace": NS}, "stringData": {"url": database}},
            {"apiVersion": "portcullis.dev/v1alpha1", "kind": "MCPConnection", "metadata": {"name": "inbox", "namespace": NS},
             "spec": {"url": url}},
            {"apiVersion": "portcullis.dev/v1alpha1", "kind": "VirtualMCPServer", "metadata": {"name": "s", "namespace": NS},
             "spec": {"limits": {"store": "postgres", "postgres": {"urlSecretRef": {"name": "policy-db", "key": "url"}}}}},
            {"apiVersion": "portcullis.dev/v1alpha1", "kind": "ToolMapping", "metadata": {"name": "m", "namespace": NS},
             "spec": {"serverRef": {"name": "s"}, "connectionRef": {"name": "inbox"}, "tools": [{"name": "send_mail", "approval": {}}]}},
        ]
        path = tmp_path / "m.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        state = tmp_path / "state"
        with portcullis_serve(path, state_dir=state) as one, portcullis_serve(path, state_dir=state) as two:
            headers = {"Authorization": f"Bearer {admin_secret(state)}"}
            tokens = [mint(p.admin, state, "ada") for p in (one, two)]

            def send(url: str, token: str) -> tuple[bool, str]:
                async def run() -> tuple[bool, str]:
                    async with agent(url, token, "2026-07-28") as client:
                        result = await client.call_tool("send_mail", MAIL)
                        return bool(result.is_error), result_text(result)

                return anyio.run(run)

            approval = pending_id(send(one.mcp, tokens[0])[1])
            listed = httpx2.get(two.admin + "/v1/approvals", headers=headers, timeout=10).json()
            assert [a["id"] for a in listed["approvals"]] == [approval] and listed["shared"] is True
            assert httpx2.post(two.admin + f"/v1/approvals/{approval}", json={"decision": "approve"}, headers=headers, timeout=10).status_code == 200
            assert not send(two.mcp, tokens[1])[0]
            failed, text = send(one.mcp, tokens[0])
            assert failed and pending_id(text) != approval  # used once, on whichever replica
    assert record.tools() == ["send_mail"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("answer", ["accept", "decline", "cancel"])
def test_an_interactive_agents_person_approves_through_elicitation(stack: Stack, mode: Mode, answer: str) -> None:
    """A client that declares elicitation is asked directly: on 2026-07-28 by `input_required`
    and a retry, on 2025-11-25 by an `elicitation/create` request on the call's stream."""
    import mcp_types as types
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    asked: list[str] = []

    async def person(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        if answer == "accept":
            return types.ElicitResult(action="accept", content={"approve": True})
        return types.ElicitResult(action=answer)  # type: ignore[arg-type]

    async def run() -> tuple[bool, str]:
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {stack.token}"}, timeout=30) as http:
            async with Client(streamable_http_client(stack.gw.url, http_client=http), mode=mode, elicitation_callback=person) as client:
                result = await client.call_tool("send_mail", MAIL)
                return bool(result.is_error), result_text(result)

    failed, text = anyio.run(run)
    assert len(asked) == 1 and "Approve this call of send_mail?" in asked[0] and "quarterly numbers" in asked[0]
    if answer == "accept":
        assert not failed and text.startswith("Sent "), text
        assert stack.record.tools() == ["send_mail"]
        approved = [e.detail for e in stack.audit.events if e.decision == "allow" and e.tool == "send_mail" and e.detail]
        assert any(d.startswith("approval ") and " by ada (at the client) at " in d for d in approved), [
            (e.decision, e.reason, e.detail) for e in stack.audit.events]
    elif answer == "decline":
        assert failed and "A person denied this call" in text
        assert stack.record.tools() == []
    else:
        assert failed and pending_id(text)  # dismissed: left for the admin API
        assert stack.admin("GET", "/v1/approvals").json()["approvals"][0]["state"] == "pending"
        assert stack.record.tools() == []


def test_a_webhook_is_told_of_each_new_request_without_the_arguments(tmp_path: Path) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    told: list[dict[str, Any]] = []

    async def hook(request: Request) -> Response:
        told.append(await request.json())
        return Response(status_code=204)

    with serve_asgi(Starlette(routes=[Route("/approvals", hook, methods=["POST"])])) as receiver:
        for stack in make_stack(tmp_path, {"webhook": receiver.url("/approvals")}):
            approval = pending_id(stack.send()[1])
            assert pending_id(stack.send()[1]) == approval  # asked again: no second notice

            async def until_told() -> None:
                with anyio.fail_after(10):
                    while not told:
                        await anyio.sleep(0.05)

            anyio.run(until_told)
    (notice,) = told
    assert notice["id"] == approval and notice["tool"] == "send_mail" and notice["user"] == "ada" and notice["server"] == "acme/s"
    assert "arguments" not in notice and "quarterly" not in str(notice)
