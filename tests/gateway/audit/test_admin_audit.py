"""The audit log through the admin API, the command line and Prometheus, against a real gateway."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import urllib.parse
from typing import Any

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.conftest import Stack
from tests.support.agent import agent

pytestmark = pytest.mark.anyio
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


async def some_calls(stack: Stack, run_id: str) -> None:
    token = stack.mint("alice@example.com", agentRunId=run_id)
    async with agent(stack.url, token, "2026-07-28") as client:
        with anyio.fail_after(20):
            await client.call_tool("inbox_fetch_mails", {"limit": 1})
            await client.call_tool("search_mails", {"query": "invoice"})
            with pytest.raises(Exception):
                await client.call_tool("send_mail", {"to": "x@example.com"})


def audit(stack: Stack, **params: str) -> tuple[int, Any]:
    return stack.admin("GET", "/v1/audit?" + urllib.parse.urlencode(params))


async def test_an_agent_runs_calls_are_found_by_its_run_id_with_digests_and_no_values(stack: Stack) -> None:
    await some_calls(stack, "run-42")
    status, page = audit(stack, runId="run-42")
    assert status == 200, page
    events = page["events"]
    assert [(e["tool"], e["decision"], e["outcome"]) for e in events] == [
        ("inbox_fetch_mails", "allow", "ok"), ("search_mails", "allow", "ok"), ("send_mail", "deny", "denied"),
    ]
    assert all(e["user"] == "alice@example.com" and e["agent_run_id"] == "run-42" for e in events)
    assert all(e["args_digest"].startswith("hmac-sha256:") for e in events)
    assert events[0]["result_digest"].startswith("hmac-sha256:") and events[2]["result_digest"] is None
    assert "invoice" not in json.dumps(page)
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)


async def test_filters_page_with_a_cursor_and_bad_parameters_name_the_field(stack: Stack) -> None:
    for _ in range(3):
        await some_calls(stack, "run-paging")
    seen: list[str] = []
    cursor: str | None = None
    while True:
        status, page = audit(stack, runId="run-paging", decision="allow", limit="2", **({"cursor": cursor} if cursor else {}))
        assert status == 200
        seen += [e["request_id"] for e in page["events"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 6
    assert audit(stack, runId="run-paging", tool="send_mail")[1]["events"][0]["reason"] == "not_exposed"
    for params, field in [({"outcome": "great"}, "outcome"), ({"limit": "0"}, "limit"), ({"since": "last tuesday"}, "since"),
                          ({"cursor": "!!"}, "cursor"), ({"colour": "red"}, "colour")]:
        status, answer = audit(stack, **params)
        assert (status, answer["field"]) == (400, field), answer
    assert stack.admin("GET", "/v1/audit", secret="wrong-secret-but-long-enough")[0] == 403


async def test_verify_through_the_api_and_the_command_line_and_both_name_a_tampered_row(stack: Stack) -> None:
    await some_calls(stack, "run-verify")
    status, report = stack.admin("GET", "/v1/audit/verify")
    assert status == 200 and report["ok"], report
    cli = [sys.executable, "-m", "portcullis.cli", "audit"]
    state = ["--state-dir", str(stack.state_dir)]
    listed = subprocess.run([*cli, "query", *state, "--run-id", "run-verify"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0].split()[:4] == ["TIME", "USER", "METHOD", "TOOL"] and "search_mails" in listed.stdout
    remote = subprocess.run(
        [*cli, "query", *state, "--admin-url", stack.gw.admin_url, "--run-id", "run-verify", "--json"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert remote.returncode == 0, remote.stderr
    assert [json.loads(line)["tool"] for line in remote.stdout.splitlines()] == ["inbox_fetch_mails", "search_mails", "send_mail"]
    ok = subprocess.run([*cli, "verify", *state], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert ok.returncode == 0 and ": intact" in ok.stdout, ok.stdout + ok.stderr

    request_id = [e for e in audit(stack, runId="run-verify")[1]["events"] if e["tool"] == "send_mail"][0]["request_id"]
    with sqlite3.connect(stack.state_dir / "audit" / "audit.db") as db:
        db.execute("UPDATE audit_events SET decision = 'allow', outcome = 'ok' WHERE request_id = ?", (request_id,))
    broken = subprocess.run([*cli, "verify", *state], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert broken.returncode == 1 and f"request {request_id}" in broken.stdout and "altered" in broken.stdout, broken.stdout
    status, report = stack.admin("GET", "/v1/audit/verify")
    assert status == 200 and not report["ok"] and report["first"]["request_id"] == request_id
    with sqlite3.connect(stack.state_dir / "audit" / "audit.db") as db:  # put it back for the other tests
        db.execute("UPDATE audit_events SET decision = 'deny', outcome = 'denied' WHERE request_id = ?", (request_id,))
    assert stack.admin("GET", "/v1/audit/verify")[1]["ok"]


def samples(stack: Stack) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, _ = stack.admin("GET", "/v1/status")
    assert status == 200
    import urllib.request

    with urllib.request.urlopen(stack.gw.admin_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in metrics.items() if n == name and set(labels.items()) <= ls)


async def test_the_metrics_endpoint_parses_and_its_counters_move(stack: Stack) -> None:
    server = "acme/summarizer"
    before = samples(stack)
    await some_calls(stack, "run-metrics")
    async with agent(stack.url, "not-a-token", "2026-07-28") as client:
        with pytest.raises(Exception):
            await client.list_tools()
    with anyio.fail_after(10):
        while value(after := samples(stack), "portcullis_audit_events_written_total", server=server) < value(
            before, "portcullis_audit_events_written_total", server=server
        ) + 3:
            await anyio.sleep(0.02)
    ok = dict(server=server, method="tools/call", outcome="ok")
    assert value(after, "portcullis_calls_total", tool="search_mails", **ok) == value(before, "portcullis_calls_total", tool="search_mails", **ok) + 1
    assert value(after, "portcullis_calls_total", tool="(not exposed)", server=server) > value(before, "portcullis_calls_total", tool="(not exposed)", server=server)
    assert value(after, "portcullis_denials_total", server=server, reason="not_exposed") > value(before, "portcullis_denials_total", server=server, reason="not_exposed")
    assert value(after, "portcullis_auth_failures_total", server=server) > value(before, "portcullis_auth_failures_total", server=server)
    assert value(after, "portcullis_upstream_duration_seconds_count", server=server, connection="inbox") >= 2
    assert value(after, "portcullis_gateway_duration_seconds_count", server=server) > value(before, "portcullis_gateway_duration_seconds_count", server=server)
    assert value(after, "portcullis_audit_write_duration_seconds_count", server=server, store="sqlite") > 0
    assert value(after, "portcullis_audit_queue_capacity", server=server) == 10_000
    assert value(after, "portcullis_tools_exposed", server=server) == stack.admin("GET", "/v1/status")[1]["exposed"]
    assert value(after, "portcullis_tool_schema_tokens", server=server, scope="upstream") > value(after, "portcullis_tool_schema_tokens", server=server, scope="exposed") > 0
