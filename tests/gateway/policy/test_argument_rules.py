"""Argument rules (CEL) at the gateway: compiled with the config, evaluated before forwarding.

The inbox's call record shows that a call a rule refused never reached the upstream, and the
denial names the rule, never the argument values.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from portcullis.compile import CompileError
from portcullis.gateway.audit import MemoryAuditSink
from portcullis.serve import LocalGateway, local_gateway
from tests.support.agent import MODES, Mode, agent, result_text
from tests.support.one_upstream import mint, sample_inbox

NS = "acme"
RULES = [
    {"name": "own-domain-only", "expression": 'args.to.all(a, a.endsWith("@acme.example"))',
     "message": "mail may only go to acme.example addresses"},
    {"name": "no-self-cc", "expression": '!has(args.cc) || !args.cc.exists(a, a == token.sub)'},
]


def manifests(upstream: str, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "portcullis.dev/v1alpha1", "kind": "MCPConnection", "metadata": {"name": "inbox", "namespace": NS},
         "spec": {"url": upstream}},
        {"apiVersion": "portcullis.dev/v1alpha1", "kind": "VirtualMCPServer", "metadata": {"name": "s", "namespace": NS}},
        {"apiVersion": "portcullis.dev/v1alpha1", "kind": "ToolMapping", "metadata": {"name": "m", "namespace": NS},
         "spec": {"serverRef": {"name": "s"}, "connectionRef": {"name": "inbox"},
                  "tools": [{"name": "send_mail", "rules": rules}, {"name": "get_mail"}]}},
    ]


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[LocalGateway, Any, MemoryAuditSink, str]]:
    with sample_inbox() as (url, record):
        path = tmp_path / "m.yaml"
        path.write_text(yaml.safe_dump_all(manifests(url, RULES)))
        audit = MemoryAuditSink()
        with local_gateway([path], state_dir=tmp_path / "s", port=0, admin_port=0, audit=audit) as gw:
            yield gw, record, audit, mint(gw, tmp_path / "s", "ada@acme.example")


def send(gw: LocalGateway, token: str, mode: Mode, arguments: dict[str, Any]) -> tuple[bool, str]:
    async def run() -> tuple[bool, str]:
        async with agent(gw.url, token, mode) as client:
            result = await client.call_tool("send_mail", arguments)
            return bool(result.is_error), result_text(result)

    return anyio.run(run)


@pytest.mark.parametrize("mode", MODES)
def test_rules_allow_deny_and_never_echo_the_arguments(gateway: tuple[LocalGateway, Any, MemoryAuditSink, str], mode: Mode) -> None:
    gw, record, audit, token = gateway
    ok = {"to": ["bob@acme.example"], "subject": "hi", "body": "!"}
    for _ in range(2):
        failed, text = send(gw, token, mode, ok)
        assert not failed and text.startswith("Sent ")
    outside = {"to": ["bob@acme.example", "eve@evil.example"], "subject": "secret plan", "body": "!"}
    failed, text = send(gw, token, mode, outside)
    assert failed and "mail may only go to acme.example addresses" in text
    assert "evil.example" not in text and "secret plan" not in text
    failed, text = send(gw, token, mode, {**ok, "cc": ["ada@acme.example"]})
    assert failed and "'no-self-cc'" in text  # the token's claims are in scope of a rule
    assert record.tools() == ["send_mail", "send_mail"]  # the refused ones never reached the inbox
    denied = [e for e in audit.events if e.decision == "deny"]
    assert [(e.reason, e.detail) for e in denied] == [("argument_rule", "rule own-domain-only"), ("argument_rule", "rule no-self-cc")]
    assert all("evil" not in (e.detail or "") for e in denied)


def test_a_rule_that_cannot_evaluate_fails_closed(gateway: tuple[LocalGateway, Any, MemoryAuditSink, str]) -> None:
    gw, record, audit, token = gateway
    failed, text = send(gw, token, "2026-07-28", {"to": "not-a-list@acme.example", "subject": "s", "body": "b"})
    assert failed and "own-domain-only" in text
    assert audit.events[-1].reason == "argument_rule" and audit.events[-1].detail is not None
    assert audit.events[-1].detail.startswith("rule own-domain-only: ") and "not-a-list" not in audit.events[-1].detail
    assert record.tools() == []


def test_a_rule_that_does_not_compile_is_reported_against_its_field(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump_all(manifests("http://127.0.0.1:1/mcp", [{"name": "broken", "expression": "args.to.all(a, "}])))
    with pytest.raises(CompileError) as caught:
        with local_gateway([path], state_dir=tmp_path / "s", port=0, admin_port=0, audit=MemoryAuditSink()):
            pass
    (problem,) = caught.value.problems
    assert (problem.kind, problem.name, problem.field, problem.reason) == ("ToolMapping", "m", "spec.tools[0].rules[0].expression", "InvalidRule")
    assert "broken" in problem.message
