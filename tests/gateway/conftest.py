"""A real gateway in front of the real inbox upstream, both on loopback."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from portcullis.gateway.audit import MemoryAuditSink
from portcullis.gateway.local import admin_secret
from portcullis.serve import LocalGateway, local_gateway
from tests.support.servers import run_asgi

REPO = Path(__file__).resolve().parents[2]
ALICE_SECRET = "alice-inbox-token"
BOB_SECRET = "bob-inbox-token"


def load_inbox() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_inbox", REPO / "examples" / "inbox" / "server.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["example_inbox"] = module
    spec.loader.exec_module(module)
    return module


inbox = load_inbox()

MANIFESTS = """
apiVersion: portcullis.dev/v1alpha1
kind: MCPConnection
metadata: {{name: inbox, namespace: acme}}
spec:
  url: {inbox_url}
  timeoutSeconds: 5
  credential: {{source: user, header: Authorization, scheme: Bearer}}
---
apiVersion: portcullis.dev/v1alpha1
kind: MCPConnection
metadata: {{name: down, namespace: acme}}
spec:
  url: {down_url}
  timeoutSeconds: 2
  credential: {{source: none}}
---
apiVersion: portcullis.dev/v1alpha1
kind: VirtualMCPServer
metadata: {{name: summarizer, namespace: acme}}
spec:
  sessionTokens: {{defaultTTL: 15m, maxTTL: 1h}}
---
apiVersion: portcullis.dev/v1alpha1
kind: ToolMapping
metadata: {{name: summarizer-inbox, namespace: acme}}
spec:
  serverRef: {{name: summarizer}}
  connectionRef: {{name: inbox}}
  tools:
    - name: fetch_mails
      as: inbox_fetch_mails
    - name: search_mails
      description: Search the user's mail (read only).
    - name: get_attachment
    - name: export_mailbox
    - name: sync_mailbox
    - name: whoami
    - name: get_mailbox_stats
  prompts:
    - name: summarize_inbox
  resources:
    - uri: inbox://signature
  resourceTemplates:
    - uriTemplate: "inbox://mails/{{mail_id}}"
---
apiVersion: portcullis.dev/v1alpha1
kind: ToolMapping
metadata: {{name: summarizer-down, namespace: acme}}
spec:
  serverRef: {{name: summarizer}}
  connectionRef: {{name: down}}
  tools:
    - name: anything
"""


@dataclass
class Stack:
    gw: LocalGateway
    record: Any
    audit: MemoryAuditSink
    state_dir: Path

    @property
    def url(self) -> str:
        return self.gw.url

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None, secret: str | None = None) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.gw.admin_url + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Bearer {secret or admin_secret(self.state_dir)}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            return exc.code, json.loads(raw) if raw else None

    def mint(self, user: str, **extra: Any) -> str:
        status, answer = self.admin("POST", "/v1/tokens", {"user": user, **extra})
        assert status == 201, answer
        return str(answer["token"])

    def put_credential(self, user: str, secret: str, connection: str = "inbox") -> None:
        asyncio.run(self.gw.gateway.vault.put("acme", user, connection, secret))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    record = inbox.CallRecord()
    upstream = inbox.build_app(
        record=record,
        required_auth={f"Bearer {ALICE_SECRET}": "alice@example.com", f"Bearer {BOB_SECRET}": "bob@example.com"},
    )
    state_dir = tmp_path_factory.mktemp("state")
    manifest_dir = tmp_path_factory.mktemp("manifests")
    # A port nothing listens on: the "down" upstream refuses connections.
    from tests.support.servers import free_port

    down_url = f"http://127.0.0.1:{free_port()}/mcp"
    audit = MemoryAuditSink()
    with run_asgi(upstream) as inbox_url:
        (manifest_dir / "all.yaml").write_text(MANIFESTS.format(inbox_url=inbox_url, down_url=down_url))
        with local_gateway([manifest_dir], state_dir=state_dir, port=0, admin_port=0, audit=audit) as gw:
            stack = Stack(gw, record, audit, state_dir)
            stack.put_credential("alice@example.com", ALICE_SECRET)
            stack.put_credential("bob@example.com", BOB_SECRET)
            yield stack
