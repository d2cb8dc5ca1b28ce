"""`portcullis demo`: the whole idea in one run, with real parts only.

1. start the sample upstreams on loopback: the inbox (about 30 tools, a per-user secret) and the
   calendar (five tools, OAuth: it serves a toy authorization server beside it);
2. serve the virtual server `summarizer` from examples/inbox/manifests and
   examples/calendar/manifests, exposing 2 inbox and 2 calendar tools;
3. seal a demo user's inbox credential into the local vault;
4. connect the demo user's calendar, as a newcomer does once: minting a session token is refused
   while calendar is not connected; the admin API gives a connect link; a browser (played here
   over HTTP) opens it, consents, and comes back to the gateway's callback page;
5. mint a session token through the admin API, as an application backend would;
6. connect as an agent does (the MCP SDK client, bearer token), list tools, call an inbox tool
   and a calendar tool (which reaches the calendar with the demo user's own OAuth token), and
   try a tool outside the allowlist;
7. print what happened: URL, token, tools and schema tokens exposed vs upstream, the connected
   account (scopes, never a token), audit.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType
from typing import Any

from portcullis.api.manifests import Manifests, load_manifests
from portcullis.api.resources import MCPConnection
from portcullis.gateway.audit import FanoutAuditSink, FileAuditSink, MemoryAuditSink
from portcullis.gateway.local import LocalState, admin_secret, default_state_dir
from portcullis.gateway.oauth.flow import CLIENT_RECORD_USER
from portcullis.gateway.oauth.record import loads
from portcullis.gateway.runtime import Listener, Servers, bind, run_in_thread
from portcullis.serve import LocalGateway, local_gateway

DEMO_USER = "ada@example.com"
DEMO_CREDENTIAL = "inbox-oauth-token-for-ada"
CALENDAR = "calendar"
"""The OAuth connection's name (examples/calendar/manifests/connection.yaml)."""
REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples" / "inbox"
CALENDAR_EXAMPLES = REPO_ROOT / "examples" / "calendar"


def load_example(directory: Path) -> ModuleType:
    """The sample upstreams ship under examples/ in the repository, not in the wheel."""
    path = directory / "server.py"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the demo from a clone of the Portcullis repository")
    spec = importlib.util.spec_from_file_location(f"portcullis_example_{directory.name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_inbox() -> ModuleType:
    return load_example(EXAMPLES)


@contextmanager
def inbox_upstream() -> Iterator[str]:
    inbox = load_inbox()
    app = inbox.build_app(required_auth={f"Bearer {DEMO_CREDENTIAL}": DEMO_USER})
    servers = Servers([Listener(app, bind("127.0.0.1", 0), "inbox")])
    with run_in_thread(servers):
        yield f"http://127.0.0.1:{servers.listeners[0].port}/mcp"


@contextmanager
def calendar_upstream() -> Iterator[Any]:
    """The calendar and its demo authorization server, on one loopback port (bound first: the
    URL is part of its OAuth metadata). Yields examples/calendar/server.py's `Calendar`."""
    sock = bind("127.0.0.1", 0)
    calendar = load_example(CALENDAR_EXAMPLES).build(f"http://127.0.0.1:{sock.getsockname()[1]}", login=DEMO_USER)
    with run_in_thread(Servers([Listener(calendar.app, sock, "calendar")])):
        yield calendar


def demo_manifests(urls: dict[str, str]) -> Manifests:
    """The example manifests, each connection pointed at the upstream started for it (`urls`: name -> URL)."""
    manifests = load_manifests([EXAMPLES / "manifests", CALENDAR_EXAMPLES / "manifests"])
    manifests.connections = [
        MCPConnection.model_validate(
            {**c.model_dump(by_alias=True), "spec": {**c.spec.model_dump(by_alias=True), "url": urls[c.metadata.name]}}
        )
        for c in manifests.connections
    ]
    return manifests


def _admin(method: str, url: str, secret: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """One admin API call: the status and the JSON answer, error answers included."""
    request = urllib.request.Request(
        url, data=None if body is None else json.dumps(body).encode(), method=method,
        headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read() or b"{}")


def _post(url: str, secret: str, body: dict[str, Any]) -> dict[str, Any]:
    status, answer = _admin("POST", url, secret, body)
    if status >= 400:
        raise RuntimeError(f"POST {url}: HTTP {status}: {answer.get('message', answer)}")
    return answer


def _get(url: str, secret: str) -> dict[str, Any]:
    status, answer = _admin("GET", url, secret)
    if status >= 400:
        raise RuntimeError(f"GET {url}: HTTP {status}: {answer.get('message', answer)}")
    return answer


# --- the connect step ------------------------------------------------------------------------


class _Form(HTMLParser):
    """The first form of a page, as a browser sees it: where it posts, and its fields' values."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = {k: v or "" for k, v in attrs}
        if tag == "form" and self.action is None:
            self.action = named.get("action", "")
        elif tag == "input" and "name" in named:
            self.fields[named["name"]] = named.get("value", "")
        self._in_title = tag == "title"

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


def _read_page(page: str) -> _Form:
    form = _Form()
    form.feed(page)
    form.close()
    return form


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """So each hop of the browser's trip can be shown (and followed by hand)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@dataclass
class Connected:
    refused: str
    """What minting said before calendar was connected."""
    link: dict[str, Any]
    consent_title: str
    redirected_to: str
    """The gateway's callback URL the authorization server sent the browser to (no query: it holds the code)."""
    callback_title: str
    account: dict[str, Any] = field(default_factory=dict)
    """The connection as GET /v1/users/{user}/connections describes it: scopes and times, no token."""


def browse(authorization_url: str) -> tuple[str, str, str]:
    """Do what a person's browser does with a connect link: open it, press Allow, follow the
    redirect back to the gateway. Returns the consent page's title, where the browser was sent,
    and the title of the page it landed on."""
    browser = urllib.request.build_opener(_NoRedirects)
    with browser.open(authorization_url, timeout=30) as response:
        consent = _read_page(response.read().decode())
    if consent.action is None:
        raise RuntimeError(f"the consent page {consent.title!r} has no form")
    fields = {**consent.fields, "decision": "allow"}  # the Allow button: the login field keeps its default
    answer = urllib.parse.urljoin(authorization_url, consent.action)
    try:
        browser.open(urllib.request.Request(answer, data=urllib.parse.urlencode(fields).encode(), method="POST"), timeout=30)
        raise RuntimeError("the authorization server did not redirect back")
    except urllib.error.HTTPError as exc:  # a redirect not followed surfaces as an "error"
        with exc:
            if exc.code not in (302, 303) or not exc.headers.get("location"):
                raise RuntimeError(f"consent answered HTTP {exc.code}, not a redirect") from None
            location = urllib.parse.urljoin(answer, exc.headers["location"])
    try:
        with browser.open(location, timeout=30) as response:
            landed = response.read().decode()
    except urllib.error.HTTPError as exc:  # the callback page says what went wrong
        with exc:
            landed = exc.read().decode()
    parts = urllib.parse.urlsplit(location)
    return consent.title.strip(), f"{parts.scheme}://{parts.netloc}{parts.path}", _read_page(landed).title.strip()


def connect_calendar(gw: LocalGateway, secret: str, user: str) -> Connected:
    """The connect step, from the application's side: mint refused, ask for a link, the user consents."""
    status, refused = _admin("POST", gw.admin_url + "/v1/tokens", secret, {"user": user, "ttl": "15m"})
    if status != 409 or refused.get("missing") != [CALENDAR]:
        raise RuntimeError(f"minting before connecting {CALENDAR} should be refused, got HTTP {status}: {refused}")
    path = f"/v1/users/{urllib.parse.quote(user, safe='')}/connections"
    link = _post(f"{gw.admin_url}{path}/{CALENDAR}/authorize", secret, {})
    consent_title, redirected_to, callback_title = browse(link["authorizationUrl"])
    listed = _get(gw.admin_url + path, secret)["connections"]
    account: dict[str, Any] = next((c for c in listed if c["connection"] == CALENDAR), {})
    return Connected(f"HTTP {status} {refused['error']}: {refused['message']}", link, consent_title, redirected_to, callback_title, account)


def forget_calendar_grants(gw: LocalGateway, user: str) -> None:
    """The demo's authorization server keeps nothing across runs, so neither may the state
    directory: drop the user's old grant and the client registered with the old server."""
    tenant = gw.gateway.config.tenant

    async def forget() -> None:
        await gw.gateway.vault.delete(tenant, user, CALENDAR)
        await gw.gateway.vault.delete(tenant, CLIENT_RECORD_USER, CALENDAR)

    asyncio.run(forget())


def sealed_access_token(gw: LocalGateway, user: str) -> str | None:
    """The user's calendar access token as the vault holds it (to check what the upstream got; never printed)."""
    text = asyncio.run(gw.gateway.vault.get(gw.gateway.config.tenant, user, CALENDAR))
    record = loads(text) if text else None
    return record.grant.access_token if record and record.grant else None


# --- the agent -------------------------------------------------------------------------------


async def agent_session(url: str, token: str) -> dict[str, Any]:
    """What an agent sees: the MCP SDK client with a bearer token."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        async with Client(streamable_http_client(url, http_client=http)) as client:
            tools = await client.list_tools()
            result = await client.call_tool("inbox_fetch_mails", {"limit": 3})
            events = await client.call_tool("calendar_list_events", {"day": "2026-03-02"})
            try:
                denied = await client.call_tool("send_mail", {"to": "x@example.com", "subject": "hi", "body": "!"})
                denied_text = _text(denied.model_dump(by_alias=True, exclude_none=True))
            except Exception as exc:  # the SDK raises on a JSON-RPC error
                denied_text = str(exc)
    return {
        "tools": [t.name for t in tools.tools],
        "result": _text(result.model_dump(by_alias=True, exclude_none=True)),
        "calendar": _text(events.model_dump(by_alias=True, exclude_none=True)),
        "calendar_failed": bool(events.is_error),
        "denied": denied_text,
    }


def _text(result: dict[str, Any]) -> str:
    parts = [_one_line(c.get("text", "")) for c in result.get("content", []) if c.get("type") == "text"]
    return " ".join(parts)[:300]


def _one_line(text: str) -> str:
    """A JSON answer on one line (the calendar's is indented), anything else as it is."""
    try:
        return json.dumps(json.loads(text))
    except ValueError:
        return text


# --- the run ---------------------------------------------------------------------------------


def run_demo(*, serve: bool = False, port: int = 8080, state_dir: Path | None = None, out: Any = None) -> int:
    # As Python prints warnings when nothing is configured; configured first, so that the MCP
    # SDK's server (the calendar) does not install its own handler on the root logger.
    logging.basicConfig(format="%(message)s")
    return _run(serve=serve, port=port, state_dir=state_dir, out=out or sys.stdout)


def _run(*, serve: bool, port: int, state_dir: Path | None, out: Any) -> int:
    state = state_dir or (default_state_dir() / "demo")
    memory = MemoryAuditSink()
    audit_dir = Path(tempfile.mkdtemp(prefix="portcullis-demo-audit-")) if not serve else state
    audit_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    audit_path = audit_dir / "audit.jsonl"
    audit = FanoutAuditSink(memory, FileAuditSink(str(audit_path)))
    with inbox_upstream() as inbox_url, calendar_upstream() as calendar:
        manifests = demo_manifests({"inbox": inbox_url, CALENDAR: calendar.url})
        with local_gateway(
            manifests, state_dir=state, port=port if serve else 0, admin_port=port + 1 if serve and port else 0, audit=audit
        ) as gw:
            secret = admin_secret(state)
            tenant = gw.gateway.config.tenant
            asyncio.run(gw.gateway.vault.put(tenant, DEMO_USER, "inbox", DEMO_CREDENTIAL))
            forget_calendar_grants(gw, DEMO_USER)
            connected = connect_calendar(gw, secret, DEMO_USER)
            _connect_step(out, connected)
            minted = _post(gw.admin_url + "/v1/tokens", secret, {"user": DEMO_USER, "ttl": "15m"})
            token = minted["token"]
            seen = asyncio.run(agent_session(gw.url, token))
            reached = [c for c in calendar.calls.calls if c.tool == "calendar_list_events"]
            seen["calendar_subject"] = reached[-1].subject if reached else None
            seen["calendar_token_sealed"] = bool(reached) and reached[-1].token == sealed_access_token(gw, DEMO_USER)
            status = json.loads(urllib.request.urlopen(gw.admin_url + "/v1/status", timeout=10).read())
            verified = _get(gw.admin_url + "/v1/audit/verify", secret)
            _summary(out, gw.url, gw.admin_url, token, seen, status, connected, memory, audit_path, serve=serve)
            print(
                f"  audit store: {LocalState(state).audit_db} (SQLite): chains verified "
                f"{'intact' if verified['ok'] else 'BROKEN'} over {verified['events']} events\n"
                f"  query it: portcullis audit query --state-dir {state} --user {DEMO_USER}",
                file=out,
            )
            if serve:
                print(
                    "\nServing until Ctrl-C. Point an agent at the URL above with the token as its bearer token,\n"
                    f"or mint another: portcullis token mint --state-dir {state} --admin-url {gw.admin_url} --user {DEMO_USER}\n"
                    "Another user U connects the calendar first: this prints a link to open in a browser (sign in\n"
                    "as U on the demo consent page: it has no passwords), then waits until the browser is back:\n"
                    f"  portcullis credentials connect --state-dir {state} --admin-url {gw.admin_url} --user U --connection {CALENDAR}",
                    file=out,
                )
                try:
                    asyncio.run(_forever())
                except KeyboardInterrupt:
                    pass
    return 0


async def _forever() -> None:
    await asyncio.Event().wait()


def _connect_step(out: Any, connected: Connected) -> None:
    print(
        f"\nConnecting {CALENDAR} (an OAuth upstream) for {DEMO_USER}, once:\n"
        f"  mint a session token first: refused, {connected.refused}\n"
        f"  connect link (POST /v1/users/{DEMO_USER}/connections/{CALENDAR}/authorize), valid until "
        f"{_iso(connected.link['expiresAt'])}:\n    {connected.link['authorizationUrl']}\n"
        f"  the browser opens it: consent page {connected.consent_title!r}; Allow as {DEMO_USER}\n"
        f"  the authorization server sends it back to {connected.redirected_to}: page {connected.callback_title!r}",
        file=out,
    )


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _summary(
    out: Any, url: str, admin_url: str, token: str, seen: dict[str, Any], status: dict[str, Any], connected: Connected,
    memory: MemoryAuditSink, audit_path: Path, *, serve: bool = False,
) -> None:
    tools = status
    exposed_tokens, upstream_tokens = tools["schemaTokens"]["exposed"], tools["schemaTokens"]["upstream"]
    reduction = 100 * (1 - exposed_tokens / upstream_tokens) if upstream_tokens else 0.0
    allowed = [e for e in memory.events if e.decision == "allow"]
    denied = [e for e in memory.events if e.decision == "deny"]
    counts = {name: c["toolCount"] for name, c in tools["connections"].items()}
    account = connected.account
    if seen["calendar_failed"]:
        reached = "it failed"
    elif seen["calendar_token_sealed"]:
        reached = f"it reached the calendar with {seen['calendar_subject']}'s own OAuth access token, from the vault"
    else:
        reached = f"the calendar answered for {seen['calendar_subject']}"
    print(
        f"\nPortcullis demo: one virtual MCP server in front of a {counts.get('inbox')}-tool inbox "
        f"and a {counts.get(CALENDAR)}-tool calendar\n"
        f"  MCP URL (mcp_server_url): {url}\n"
        f"  admin API:                {admin_url}\n"
        f"  session token ({DEMO_USER}, 15m): {token if serve else token[:24] + '...' + token[-8:]}\n"
        f"  tools exposed / upstream: {tools['exposed']} / {tools['upstream']}  ({', '.join(seen['tools'])})\n"
        f"  tool-schema tokens (est.): {exposed_tokens} exposed vs {upstream_tokens} upstream: {reduction:.1f}% fewer\n"
        f"  connect step: minting refused until {CALENDAR} was connected; connect link -> consent (Allow) -> "
        f"{connected.callback_title!r}\n"
        f"  connected account {CALENDAR} (OAuth, {DEMO_USER}): scopes {' '.join(account.get('scopes') or []) or 'none'}, "
        f"connected {account.get('connectedAt')}, access token expires {account.get('expiresAt')} (refreshed when due; "
        "tokens stay sealed in the vault)\n"
        f"  allowed call inbox_fetch_mails: {seen['result'][:100]}...\n"
        f"  allowed call calendar_list_events: {seen['calendar'][:100]}...\n"
        f"    {reached}\n"
        f"  call to send_mail (not exposed): refused before the upstream: {seen['denied'][:80]}\n"
        f"  audit: {len(allowed)} allowed, {len(denied)} denied; JSON lines in {audit_path}",
        file=out,
    )
