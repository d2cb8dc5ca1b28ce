"""The short path for 2026-07-28 tools/call answers exactly as the SDK's general path does.

Two gateways front the same upstream, one with the short path and one without; the same
raw requests go to both and the answers (status, content type, body) must be equal.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from portcullis.gateway.audit import MemoryAuditSink
from portcullis.gateway.local import admin_secret
from portcullis.serve import LocalGateway, local_gateway
from tests.gateway.conftest import ALICE_SECRET, MANIFESTS, inbox
from tests.support.servers import free_port, run_asgi

ENVELOPE = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}


def call(name: str, arguments: Any = None, *, request_id: Any = 7, meta: Any = ENVELOPE, **extra: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name, **extra}
    if arguments is not None:
        params["arguments"] = arguments
    if meta is not None:
        params["_meta"] = meta
    body: dict[str, Any] = {"jsonrpc": "2.0", "method": "tools/call", "params": params}
    if request_id is not None:
        body["id"] = request_id
    return body


def headers(name: str, **extra: str) -> dict[str, str]:
    return {
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call",
        "Mcp-Name": name,
        **extra,
    }


# (label, body, headers, served by the short path?)
CASES: list[tuple[str, dict[str, Any], dict[str, str], bool]] = [
    ("plain call", call("whoami", {}), headers("whoami"), True),
    ("renamed tool with arguments", call("inbox_fetch_mails", {"limit": 2}), headers("inbox_fetch_mails"), True),
    ("string id", call("whoami", {}, request_id="req-1"), headers("whoami"), True),
    ("no arguments", call("whoami"), headers("whoami"), True),
    ("structured result", call("get_mailbox_stats", {}), headers("get_mailbox_stats"), True),
    ("mixed content", call("get_attachment", {"mail_id": "m-006", "attachment_id": "a-2"}), headers("get_attachment"), True),
    ("tool error result", call("export_mailbox", {}), headers("export_mailbox"), True),
    ("tool outside the allowlist", call("send_mail", {"to": ["x@example.com"]}), headers("send_mail"), True),
    ("arguments not an object", call("whoami", [1, 2]), headers("whoami"), False),
    ("Mcp-Name disagrees with the body", call("whoami", {}), headers("get_mailbox_stats"), False),
    ("no envelope", call("whoami", {}, meta=None), headers("whoami"), False),
    ("envelope version disagrees", call("whoami", {}, meta={**ENVELOPE, "io.modelcontextprotocol/protocolVersion": "2025-11-25"}), headers("whoami"), False),
    ("progress token", call("whoami", {}, meta={**ENVELOPE, "progressToken": "p1"}), headers("whoami"), False),
    ("multi-round-trip retry", call("whoami", {}, requestState="opaque"), headers("whoami"), False),
    ("notification", call("whoami", {}, request_id=None), headers("whoami"), False),
    ("SSE only accepted", call("whoami", {}), headers("whoami", Accept="text/event-stream"), False),
]


def mint(gw: LocalGateway, state: Path) -> str:
    response = httpx2.post(
        gw.admin_url + "/v1/tokens",
        json={"user": "alice@example.com"},
        headers={"Authorization": f"Bearer {admin_secret(state)}"},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[tuple[LocalGateway, str], tuple[LocalGateway, str]]]:
    upstream = inbox.build_app(required_auth={f"Bearer {ALICE_SECRET}": "alice@example.com"})
    manifest_dir = tmp_path_factory.mktemp("manifests")
    with run_asgi(upstream) as inbox_url:
        (manifest_dir / "all.yaml").write_text(MANIFESTS.format(inbox_url=inbox_url, down_url=f"http://127.0.0.1:{free_port()}/mcp"))
        gateways = []
        states = [tmp_path_factory.mktemp("fast"), tmp_path_factory.mktemp("sdk")]
        with local_gateway([manifest_dir], state_dir=states[0], port=0, admin_port=0, audit=MemoryAuditSink()) as fast, \
             local_gateway([manifest_dir], state_dir=states[1], port=0, admin_port=0, audit=MemoryAuditSink(), fast_path=False) as sdk:
            for gw, state in ((fast, states[0]), (sdk, states[1])):
                asyncio.run(gw.gateway.vault.put("acme", "alice@example.com", "inbox", ALICE_SECRET))
                gateways.append((gw, mint(gw, state)))
            yield gateways[0], gateways[1]


def answer(gw: LocalGateway, token: str, body: dict[str, Any], hdrs: dict[str, str]) -> tuple[int, str, Any]:
    response = httpx2.post(gw.url, content=json.dumps(body).encode(), headers={**hdrs, "Authorization": f"Bearer {token}"}, timeout=30)
    parsed = response.json() if response.content and response.headers.get("content-type", "").startswith("application/json") else response.text
    return response.status_code, response.headers.get("content-type", ""), parsed


@pytest.mark.parametrize(("label", "body", "hdrs", "short"), CASES, ids=[c[0] for c in CASES])
def test_both_paths_answer_alike(
    pair: tuple[tuple[LocalGateway, str], tuple[LocalGateway, str]], label: str, body: dict[str, Any], hdrs: dict[str, str], short: bool
) -> None:
    (fast, fast_token), (sdk, sdk_token) = pair
    served_before = _served(fast)
    got = answer(fast, fast_token, body, hdrs)
    expected = answer(sdk, sdk_token, body, hdrs)
    assert got == expected
    assert _served(fast) == served_before + (1 if short else 0), f"{label}: expected the {'short' if short else 'SDK'} path"
    assert sdk.endpoint.fast is None


def _served(gw: LocalGateway) -> int:
    assert gw.endpoint.fast is not None
    return gw.endpoint.fast.served
