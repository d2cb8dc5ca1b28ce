"""Many servers sharing one MCPConnection: each costs what one costs, and a change still reaches all.

What grew with the namespace (benchmarks/results/operator-scale-2026-12-02.md) was work per
reconcile: every reconcile parsed every ToolMapping of the namespace and rewrote every
connection's status. These tests count that work (what each reconcile parses), not time.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from portcullis.api.resources import API_VERSION
from portcullis.controller import reconcile
from tests.controller.test_reconcile import CONNS, condition, crd_path, delete, exists, obj, patch, post
from tests.support.operator_runner import eventually, operator_emulator, running_operator

SERVERS = [f"role{i}" for i in range(4)]


async def create_connection(k8s: Any, name: str, url: str = "http://gmail-mcp.tools.svc:8080/mcp") -> None:
    await post(k8s, crd_path("mcpconnections"), {
        "apiVersion": API_VERSION, "kind": "MCPConnection", "metadata": {"name": name},
        "spec": {"url": url, "credential": {"source": "user"}},
    })


async def create_role(k8s: Any, server: str, connection: str, *, mapping: str | None = None) -> None:
    await post(k8s, crd_path("toolmappings"), {
        "apiVersion": API_VERSION, "kind": "ToolMapping", "metadata": {"name": mapping or f"{server}-{connection}"},
        "spec": {"serverRef": {"name": server}, "connectionRef": {"name": connection}, "tools": [{"name": "fetch_mails"}]},
    })
    await post(k8s, crd_path("virtualmcpservers"), {
        "apiVersion": API_VERSION, "kind": "VirtualMCPServer", "metadata": {"name": server}, "spec": {"replicas": 1},
    })


def connection_url(k8s: Any, server: str) -> str | None:
    if not exists(k8s, "v1/configmaps", f"{server}-config"):
        return None
    config = json.loads(obj(k8s, "v1/configmaps", f"{server}-config")["data"]["config.json"])
    gmail = config["connections"].get("gmail")
    return None if gmail is None else str(gmail["url"])


@pytest.mark.anyio
async def test_a_shared_connection_change_reaches_every_server_and_each_reads_only_its_own_mappings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parsed: list[tuple[list[str], list[str]]] = []  # what each parse saw: mapping names, connection names
    original = reconcile.parse_world

    def spy(raw_mappings: Any, raw_connections: Any) -> reconcile.Parsed:
        mappings, connections = list(raw_mappings), list(raw_connections)
        parsed.append(([m["metadata"]["name"] for m in mappings], [c["metadata"]["name"] for c in connections]))
        return original(mappings, connections)

    monkeypatch.setattr(reconcile, "parse_world", spy)
    async with operator_emulator() as k8s, running_operator(k8s):
        await create_connection(k8s, "gmail")
        await create_connection(k8s, "calendar", "http://calendar.tools.svc:8080/mcp")  # used by nobody here
        for server in SERVERS:
            await create_role(k8s, server, "gmail")
        await eventually(lambda: all(connection_url(k8s, s) == "http://gmail-mcp.tools.svc:8080/mcp" for s in SERVERS))
        created = len(parsed)

        await patch(k8s, crd_path("mcpconnections", "gmail"), {"spec": {"url": "http://gmail-v2.tools.svc:8080/mcp"}})
        await eventually(lambda: all(connection_url(k8s, s) == "http://gmail-v2.tools.svc:8080/mcp" for s in SERVERS))

    # A server reconcile parses its mappings; a connection's status parses that connection alone.
    by_servers = [(mappings, connections) for mappings, connections in parsed if mappings]
    after_change = [mappings for mappings, _ in parsed[created:] if mappings]
    assert sorted({m for mappings in after_change for m in mappings}) == [f"{s}-gmail" for s in SERVERS]
    # Each reconcile read its own mapping and the one connection it names: nothing of the other
    # servers (before the fix, each of them parsed all four mappings and both connections).
    assert by_servers and all(len(mappings) == 1 and connections == ["gmail"] for mappings, connections in by_servers), by_servers
    assert all(len(connections) == 1 for mappings, connections in parsed if not mappings)


def accepted(k8s: Any, connection: str) -> tuple[str | None, str | None]:
    found = condition(obj(k8s, CONNS, connection), "Accepted") if exists(k8s, CONNS, connection) else {}
    return found.get("status"), found.get("reason")


@pytest.mark.anyio
async def test_a_connections_status_follows_the_mappings_that_name_it() -> None:
    async with operator_emulator() as k8s, running_operator(k8s):
        await create_connection(k8s, "gmail")
        await create_connection(k8s, "calendar", "http://calendar.tools.svc:8080/mcp")
        await post(k8s, crd_path("mcpconnections"), {
            "apiVersion": API_VERSION, "kind": "MCPConnection", "metadata": {"name": "broken"},
            "spec": {"url": "ftp://nowhere", "credential": {"source": "user"}},
        })
        await eventually(lambda: accepted(k8s, "gmail") == ("True", "Unused"))
        await eventually(lambda: accepted(k8s, "calendar") == ("True", "Unused"))
        await eventually(lambda: accepted(k8s, "broken") == ("False", "InvalidSpec"))

        await create_role(k8s, "summarizer", "gmail", mapping="summarizer-tools")
        await eventually(lambda: accepted(k8s, "gmail") == ("True", "Accepted"))

        # Retargeted: the connection it named before is unused now, the new one used.
        await patch(k8s, crd_path("toolmappings", "summarizer-tools"), {"spec": {"connectionRef": {"name": "calendar"}}})
        await eventually(lambda: accepted(k8s, "calendar") == ("True", "Accepted"))
        await eventually(lambda: accepted(k8s, "gmail") == ("True", "Unused"))

        await delete(k8s, crd_path("toolmappings", "summarizer-tools"))
        await eventually(lambda: accepted(k8s, "calendar") == ("True", "Unused"))
        assert accepted(k8s, "broken") == ("False", "InvalidSpec")
