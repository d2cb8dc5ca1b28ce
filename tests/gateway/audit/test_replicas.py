"""Two gateway processes (replicas) writing one durable store, and the store going down under load.

Each gateway is a real `portcullis serve` process; the store is the embedded SQLite file
they share through one state directory, or a real PostgreSQL server that the test suite
starts. The upstream is the example inbox, which counts every call it receives: that is
how "no call ran unrecorded" is checked from outside the gateway.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from portcullis.gateway.audit.keys import AuditKey, LocalAuditKeys
from portcullis.gateway.audit.sqlite import SqliteAuditStore
from portcullis.gateway.audit.store import AuditQuery, AuditStore
from portcullis.gateway.audit.trail import verify_audit
from portcullis.gateway.local import admin_secret
from tests.gateway.conftest import inbox
from tests.support.agent import agent, result_text
from tests.support.postgres import PostgresServer
from tests.support.servers import portcullis_serve, run_asgi

pytestmark = pytest.mark.anyio
SERVER = "acme/summarizer"
SECRET = "alice-inbox-token"

MANIFESTS = """
apiVersion: portcullis.dev/v1alpha1
kind: MCPConnection
metadata: {{name: inbox, namespace: acme}}
spec: {{url: "{url}", timeoutSeconds: 5, credential: {{source: user}}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: audit-db, namespace: acme}}
stringData: {{url: "{database}"}}
---
apiVersion: portcullis.dev/v1alpha1
kind: VirtualMCPServer
metadata: {{name: summarizer, namespace: acme}}
spec:
  audit: {audit}
---
apiVersion: portcullis.dev/v1alpha1
kind: ToolMapping
metadata: {{name: summarizer-inbox, namespace: acme}}
spec:
  serverRef: {{name: summarizer}}
  connectionRef: {{name: inbox}}
  tools: [{{name: fetch_mails}}, {{name: search_mails}}]
"""


@dataclass
class Replica:
    mcp: str
    admin: str
    state: Path
    jsonl: list[str]

    def call_admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.admin + path, data=None if body is None else json.dumps(body).encode(), method=method,
            headers={"Authorization": f"Bearer {admin_secret(self.state)}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=20) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def mint(self) -> str:
        status, answer = self.call_admin("POST", "/v1/tokens", {"user": "alice@example.com", "agentRunId": "replicas"})
        assert status == 201, answer
        return str(answer["token"])


@contextmanager
def replica(manifest: Path, state: Path) -> Iterator[Replica]:
    with portcullis_serve(manifest, state_dir=state) as served:
        yield Replica(served.mcp, served.admin, state, served.stdout)


def write_manifest(directory: Path, url: str, *, database: str = "", audit: str = "{}") -> Path:
    path = directory / "manifests.yaml"
    path.write_text(MANIFESTS.format(url=url, database=database, audit=audit))
    return path


async def mixed_calls(replica: Replica, rounds: int) -> int:
    """Allowed calls, denials and unauthenticated requests; the number of audited requests made."""
    token = replica.mint()
    made = 0
    async with agent(replica.mcp, token, "2026-07-28") as client:
        for i in range(rounds):
            await client.call_tool("fetch_mails", {"limit": 1})
            await client.call_tool("search_mails", {"query": f"q{i}"})
            with pytest.raises(Exception):
                await client.call_tool("send_mail", {"to": "x@example.com"})
            made += 3
    async with agent(replica.mcp, token + "tampered", "2026-07-28") as client:
        with pytest.raises(Exception):
            await client.list_tools()
    return made + 1


async def settle(*replicas: Replica) -> None:
    """Until every replica's audit queue is empty and its store healthy (bounded)."""
    with anyio.fail_after(30):
        for r in replicas:
            while True:
                audit = r.call_admin("GET", "/v1/status")[1]["audit"]
                if audit["queueDepth"] == 0 and audit["failing"] is None:
                    break
                await anyio.sleep(0.05)


async def stored_events(store: AuditStore) -> list[Any]:
    await store.open()
    try:
        events, cursor = [], None
        while True:
            page = await store.query(AuditQuery(server=SERVER, limit=1000, cursor=cursor))
            events += page.events
            if page.next_cursor is None:
                return events
            cursor = page.next_cursor
    finally:
        await store.close()


async def verified(store: AuditStore, state: Path) -> dict[str, Any]:
    key = AuditKey(await LocalAuditKeys(state).key("acme"))
    await store.open()
    try:
        return (await verify_audit(store, key.chain_key, SERVER, None, None)).to_dict()
    finally:
        await store.close()


def postgres_store(url: str) -> AuditStore:
    from portcullis.gateway.audit.postgres import PostgresAuditStore

    return PostgresAuditStore(url)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_two_gateway_processes_record_exactly_every_request_in_valid_chains(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    database = request.getfixturevalue("database") if kind == "postgres" else ""
    audit = "{store: postgres, postgres: {urlSecretRef: {name: audit-db, key: url}}}" if kind == "postgres" else "{}"
    with run_asgi(inbox.build_app(required_auth={f"Bearer {SECRET}": "alice@example.com"})) as url, ExitStack() as stack:
        manifest = write_manifest(tmp_path, url, database=database, audit=audit)
        a = stack.enter_context(replica(manifest, tmp_path / "state"))
        b = stack.enter_context(replica(manifest, tmp_path / "state"))
        assert a.call_admin("PUT", "/v1/users/alice@example.com/connections/inbox", {"secret": SECRET})[0] == 204
        made = sum(await asyncio.gather(mixed_calls(a, 10), mixed_calls(b, 12)))
        await settle(a, b)
        store = postgres_store(database) if kind == "postgres" else SqliteAuditStore(tmp_path / "state" / "audit" / "audit.db")
        events = [e for e in await stored_events(store) if e.event.method != "audit/prune"]
        assert len(events) == made == 3 * (10 + 12) + 2
        assert len({e.writer for e in events}) == 2
        assert sorted(e.event.outcome for e in events).count("unauthenticated") == 2
        store = postgres_store(database) if kind == "postgres" else SqliteAuditStore(tmp_path / "state" / "audit" / "audit.db")
        report = await verified(store, tmp_path / "state")
        assert report["ok"] and report["writers"] == 2, report


async def test_postgres_stopped_mid_load_loses_nothing_queued_and_with_refuse_no_call_runs_unrecorded(
    tmp_path: Path, postgres: PostgresServer, database: str
) -> None:
    record = inbox.CallRecord()
    app = inbox.build_app(record=record, required_auth={f"Bearer {SECRET}": "alice@example.com"})
    audit = "{store: postgres, postgres: {urlSecretRef: {name: audit-db, key: url}}, queueSize: 100, onStoreFailure: refuse}"
    with run_asgi(app) as url, replica(write_manifest(tmp_path, url, database=database, audit=audit), tmp_path / "state") as gw:
        assert gw.call_admin("PUT", "/v1/users/alice@example.com/connections/inbox", {"secret": SECRET})[0] == 204
        token = gw.mint()
        refused = 0
        async with agent(gw.mcp, token, "2026-07-28") as client:
            for i in range(30):
                await client.call_tool("search_mails", {"query": f"before {i}"})
            await settle(gw)
            postgres.stop()
            try:
                for i in range(250):  # more than the queue holds
                    result = await client.call_tool("search_mails", {"query": f"during {i}"})
                    if result.is_error:
                        assert "not made" in result_text(result) and "audit" in result_text(result)
                        refused += 1
            finally:
                postgres.start()
            await settle(gw)
            for i in range(10):
                assert not (await client.call_tool("search_mails", {"query": f"after {i}"})).is_error
        await settle(gw)
        made = len([c for c in record.calls if c.tool == "search_mails"])
        assert refused > 0 and made == 30 + (250 - refused) + 10
        events = [e for e in await stored_events(postgres_store(database)) if e.event.tool == "search_mails"]
        ok = [e for e in events if e.event.outcome == "ok"]
        assert len(ok) == made, (len(ok), made)  # every call the upstream saw is on record
        refusals = [json.loads(line) for line in gw.jsonl if '"audit_unavailable"' in line]
        assert len(refusals) == refused  # and every refusal is at least on stdout
        report = await verified(postgres_store(database), tmp_path / "state")
        assert report["ok"], report
