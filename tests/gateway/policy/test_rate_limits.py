"""Rate limits and quotas at the gateway: per user, per tool and per server, across replicas.

Limits are per day here, so a test never straddles a window (days turn at 00:00 UTC). The
inbox's own call record shows that a call refused by a limit never reached it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
import yaml

from portcullis.gateway.audit import MemoryAuditSink
from portcullis.serve import local_gateway
from tests.support.agent import agent, result_text
from tests.support.postgres import postgres_server
from tests.support.one_upstream import mint, sample_inbox
from tests.support.servers import portcullis_serve

NS = "acme"


def manifests(upstream: str, *, tool_limit: int, server_limit: int | None = None, postgres: str | None = None) -> list[dict[str, Any]]:
    limits: dict[str, Any] = {"perUser": [{"calls": server_limit, "per": "day"}] if server_limit else []}
    docs: list[dict[str, Any]] = []
    if postgres is not None:
        limits.update(store="postgres", postgres={"urlSecretRef": {"name": "limits-db", "key": "url"}})
        docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "limits-db", "namespace": NS}, "stringData": {"url": postgres}})
    return [
        *docs,
        {"apiVersion": "portcullis.dev/v1alpha1", "kind": "MCPConnection", "metadata": {"name": "inbox", "namespace": NS},
         "spec": {"url": upstream}},
        {"apiVersion": "portcullis.dev/v1alpha1", "kind": "VirtualMCPServer", "metadata": {"name": "s", "namespace": NS},
         "spec": {"limits": limits}},
        {"apiVersion": "portcullis.dev/v1alpha1", "kind": "ToolMapping", "metadata": {"name": "m", "namespace": NS},
         "spec": {"serverRef": {"name": "s"}, "connectionRef": {"name": "inbox"}, "tools": [
             {"name": "get_mail", "limits": [{"calls": tool_limit, "per": "day"}]},
             {"name": "list_labels"},
         ]}},
    ]


async def calls(url: str, token: str, tool: str, count: int) -> list[str]:
    arguments = {"mail_id": "m-001"} if tool == "get_mail" else {}
    async with agent(url, token, "2026-07-28") as client:
        out = []
        for _ in range(count):
            result = await client.call_tool(tool, arguments)
            out.append("limited" if result.is_error and "Rate limit reached" in result_text(result) else "error" if result.is_error else "ok")
        return out


@pytest.fixture
def inbox() -> Iterator[tuple[str, Any]]:
    with sample_inbox() as upstream:
        yield upstream


def test_a_tool_limit_and_a_server_quota_per_user(tmp_path: Path, inbox: tuple[str, Any]) -> None:
    url, record = inbox
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump_all(manifests(url, tool_limit=3, server_limit=5)))
    audit = MemoryAuditSink()
    with local_gateway([path], state_dir=tmp_path / "s", port=0, admin_port=0, audit=audit) as gw:
        ada, grace = (mint(gw, tmp_path / "s", user) for user in ("ada", "grace"))
        assert anyio.run(calls, gw.url, ada, "get_mail", 4) == ["ok", "ok", "ok", "limited"]
        # The server's quota counts every tool: 3 used, 2 left.
        assert anyio.run(calls, gw.url, ada, "list_labels", 3) == ["ok", "ok", "limited"]
        assert anyio.run(calls, gw.url, grace, "get_mail", 3) == ["ok", "ok", "ok"]  # another user counts alone
        assert record.tools().count("get_mail") == 6 and record.tools().count("list_labels") == 2
        limited = [e for e in audit.events if e.reason == "rate_limited"]
        assert [(e.user, e.tool, e.detail) for e in limited] == [
            ("ada", "get_mail", "limit at most 3 calls of get_mail per day"),
            ("ada", "list_labels", "limit at most 5 calls of this server's tools per day"),
        ]
        status = httpx2.get(gw.admin_url + "/v1/status", timeout=10).json()
        assert status["limits"] == {"store": "replica", "shared": False, "accuracy": "per replica: N replicas allow up to N times each limit"}


def test_the_refusal_says_when_to_retry(tmp_path: Path, inbox: tuple[str, Any]) -> None:
    url, _ = inbox
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump_all(manifests(url, tool_limit=1)))
    with local_gateway([path], state_dir=tmp_path / "s", port=0, admin_port=0, audit=MemoryAuditSink()) as gw:
        token = mint(gw, tmp_path / "s", "ada")

        async def run() -> str:
            async with agent(gw.url, token, "legacy") as client:
                await client.call_tool("get_mail", {"mail_id": "m-001"})
                return result_text(await client.call_tool("get_mail", {"mail_id": "m-001"}))

        text = anyio.run(run)
        assert "at most 1 calls of get_mail per day" in text and "Try again in " in text and "UTC" in text
        assert "m-001" not in text  # never the arguments


@pytest.mark.parametrize("store", ["postgres", "replica"])
def test_two_gateway_processes_count_together_only_with_a_shared_store(tmp_path: Path, inbox: tuple[str, Any], store: str) -> None:
    url, record = inbox
    limit, per_process = 10, 8
    with postgres_server() as pg:
        dsn = pg.create_database("limits") if store == "postgres" else None
        path = tmp_path / "m.yaml"
        path.write_text(yaml.safe_dump_all(manifests(url, tool_limit=limit, postgres=dsn)))
        state = tmp_path / "state"
        with portcullis_serve(path, state_dir=state) as one, portcullis_serve(path, state_dir=state) as two:
            tokens = [mint(p.admin, state, "ada") for p in (one, two)]

            async def both() -> list[str]:
                results: list[list[str]] = []

                async def run(url: str, token: str) -> None:
                    results.append(await calls(url, token, "get_mail", per_process))

                async with anyio.create_task_group() as group:
                    for process, token in zip((one, two), tokens):
                        group.start_soon(run, process.mcp, token)
                return [r for rs in results for r in rs]

            outcomes = anyio.run(both)
    allowed = outcomes.count("ok")
    if store == "postgres":
        assert allowed == limit and outcomes.count("limited") == 2 * per_process - limit  # exact across the two
    else:
        assert allowed == 2 * per_process  # each replica counts alone: up to 2 x the limit
    assert record.tools().count("get_mail") == allowed
