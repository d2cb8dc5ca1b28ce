"""`portcullis demo`: the whole idea in one run, with real parts only.

1. start the sample inbox upstream (about 30 tools) on loopback;
2. serve the virtual server `summarizer` from examples/inbox/manifests, exposing 2 of them;
3. seal a demo user's inbox credential into the local vault;
4. mint a session token through the admin API, as an application backend would;
5. connect as an agent does (the MCP SDK client, bearer token), list tools, call one,
   and try a tool outside the allowlist;
6. print what happened: URL, token, tools and schema tokens exposed vs upstream, audit.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from portcullis.api.manifests import Manifests, load_manifests
from portcullis.api.resources import MCPConnection
from portcullis.gateway.audit import FanoutAuditSink, FileAuditSink, MemoryAuditSink
from portcullis.gateway.local import LocalState, admin_secret, default_state_dir
from portcullis.gateway.runtime import Listener, Servers, bind, run_in_thread
from portcullis.serve import local_gateway

DEMO_USER = "ada@example.com"
DEMO_CREDENTIAL = "inbox-oauth-token-for-ada"
REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples" / "inbox"


def load_inbox() -> ModuleType:
    """The sample upstream ships under examples/ in the repository, not in the wheel."""
    path = EXAMPLES / "server.py"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the demo from a clone of the Portcullis repository")
    spec = importlib.util.spec_from_file_location("portcullis_example_inbox", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@contextmanager
def inbox_upstream() -> Iterator[str]:
    inbox = load_inbox()
    app = inbox.build_app(required_auth={f"Bearer {DEMO_CREDENTIAL}": DEMO_USER})
    servers = Servers([Listener(app, bind("127.0.0.1", 0), "inbox")])
    with run_in_thread(servers):
        yield f"http://127.0.0.1:{servers.listeners[0].port}/mcp"


def demo_manifests(upstream_url: str) -> Manifests:
    manifests = load_manifests([EXAMPLES / "manifests"])
    manifests.connections = [
        MCPConnection.model_validate(
            {**c.model_dump(by_alias=True), "spec": {**c.spec.model_dump(by_alias=True), "url": upstream_url}}
        )
        for c in manifests.connections
    ]
    return manifests


def _post(url: str, secret: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def _get(url: str, secret: str) -> dict[str, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {secret}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


async def agent_session(url: str, token: str) -> dict[str, Any]:
    """What an agent sees: the MCP SDK client with a bearer token."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        async with Client(streamable_http_client(url, http_client=http)) as client:
            tools = await client.list_tools()
            result = await client.call_tool("inbox_fetch_mails", {"limit": 3})
            try:
                denied = await client.call_tool("send_mail", {"to": "x@example.com", "subject": "hi", "body": "!"})
                denied_text = _text(denied.model_dump(by_alias=True, exclude_none=True))
            except Exception as exc:  # the SDK raises on a JSON-RPC error
                denied_text = str(exc)
    return {
        "tools": [t.name for t in tools.tools],
        "result": _text(result.model_dump(by_alias=True, exclude_none=True)),
        "denied": denied_text,
    }


def _text(result: dict[str, Any]) -> str:
    parts = [c.get("text", "") for c in result.get("content", []) if c.get("type") == "text"]
    return " ".join(parts)[:300]


def run_demo(*, serve: bool = False, port: int = 8080, state_dir: Path | None = None, out: Any = None) -> int:
    out = out or sys.stdout
    state = state_dir or (default_state_dir() / "demo")
    memory = MemoryAuditSink()
    audit_dir = Path(tempfile.mkdtemp(prefix="portcullis-demo-audit-")) if not serve else state
    audit_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    audit_path = audit_dir / "audit.jsonl"
    audit = FanoutAuditSink(memory, FileAuditSink(str(audit_path)))
    with inbox_upstream() as upstream_url:
        manifests = demo_manifests(upstream_url)
        with local_gateway(
            manifests, state_dir=state, port=port if serve else 0, admin_port=port + 1 if serve and port else 0, audit=audit
        ) as gw:
            tenant = gw.gateway.config.tenant
            asyncio.run(gw.gateway.vault.put(tenant, DEMO_USER, "inbox", DEMO_CREDENTIAL))
            minted = _post(gw.admin_url + "/v1/tokens", admin_secret(state), {"user": DEMO_USER, "ttl": "15m"})
            token = minted["token"]
            seen = asyncio.run(agent_session(gw.url, token))
            status = json.loads(urllib.request.urlopen(gw.admin_url + "/v1/status", timeout=10).read())
            verified = _get(gw.admin_url + "/v1/audit/verify", admin_secret(state))
            _summary(out, gw.url, gw.admin_url, token, seen, status, memory, audit_path, serve=serve)
            print(
                f"  audit store: {LocalState(state).audit_db} (SQLite): chains verified "
                f"{'intact' if verified['ok'] else 'BROKEN'} over {verified['events']} events\n"
                f"  query it: portcullis audit query --state-dir {state} --user {DEMO_USER}",
                file=out,
            )
            if serve:
                print(
                    "\nServing until Ctrl-C. Point an agent at the URL above with the token as its bearer token,\n"
                    f"or mint another: portcullis token mint --state-dir {state} --admin-url {gw.admin_url} --user {DEMO_USER}",
                    file=out,
                )
                try:
                    asyncio.run(_forever())
                except KeyboardInterrupt:
                    pass
    return 0


async def _forever() -> None:
    await asyncio.Event().wait()


def _summary(
    out: Any, url: str, admin_url: str, token: str, seen: dict[str, Any], status: dict[str, Any],
    memory: MemoryAuditSink, audit_path: Path, *, serve: bool = False,
) -> None:
    tools = status
    exposed_tokens, upstream_tokens = tools["schemaTokens"]["exposed"], tools["schemaTokens"]["upstream"]
    reduction = 100 * (1 - exposed_tokens / upstream_tokens) if upstream_tokens else 0.0
    allowed = [e for e in memory.events if e.decision == "allow"]
    denied = [e for e in memory.events if e.decision == "deny"]
    print(
        f"\nPortcullis demo: one virtual MCP server in front of a {tools['upstream']}-tool inbox\n"
        f"  MCP URL (mcp_server_url): {url}\n"
        f"  admin API:                {admin_url}\n"
        f"  session token ({DEMO_USER}, 15m): {token if serve else token[:24] + '...' + token[-8:]}\n"
        f"  tools exposed / upstream: {tools['exposed']} / {tools['upstream']}  ({', '.join(seen['tools'])})\n"
        f"  tool-schema tokens (est.): {exposed_tokens} exposed vs {upstream_tokens} upstream: {reduction:.1f}% fewer\n"
        f"  allowed call inbox_fetch_mails: {seen['result'][:100]}...\n"
        f"  call to send_mail (not exposed): refused before the upstream: {seen['denied'][:80]}\n"
        f"  audit: {len(allowed)} allowed, {len(denied)} denied; JSON lines in {audit_path}",
        file=out,
    )
