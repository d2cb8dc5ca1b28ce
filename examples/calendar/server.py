"""A calendar upstream that requires OAuth, with a toy authorization server beside it. DEMO ONLY.

`portcullis demo` needs an upstream that users connect once with OAuth 2.1 (a "connected
account"), and it must run on a fresh machine with nothing but Python and loopback. So this one
process is both:

- the resource server: an MCP server (the SDK's `MCPServer`) at `/mcp` with five calendar tools
  that answer for the user the access token was issued to. The SDK's `AuthSettings` plus a
  `TokenVerifier` make it refuse calls without a valid token (401 with `WWW-Authenticate`), and
  publish the RFC 9728 protected-resource metadata at
  `/.well-known/oauth-protected-resource/mcp`, naming the authorization server below;
- a deliberately tiny authorization server (`DemoAuthorizationServer`), under `/demo-oauth` on
  the same port and in the same ASGI app (added as custom routes of the MCP server), so that
  the demo starts one upstream, not two. Its issuer is `http://HOST:PORT/demo-oauth`:

      GET  /.well-known/oauth-authorization-server/demo-oauth   RFC 8414 metadata
      POST /demo-oauth/register     dynamic client registration (RFC 7591), public clients only
      GET  /demo-oauth/authorize    a consent page: "sign in as" (no password) and Allow / Deny
      POST /demo-oauth/authorize    the form's answer: a 303 to the client's redirect_uri with
                                    `code` and `state` (or `error=access_denied`)
      POST /demo-oauth/token        `authorization_code` (PKCE S256 checked, redirect_uri and
                                    client checked, codes single-use) and `refresh_token`
                                    (rotating: each refresh token works once)

  Access tokens are opaque random strings, valid five minutes, bound to the RFC 8707 `resource`
  the client asked for (it must be this server's MCP URL); the MCP side looks them up in the
  authorization server's in-memory table.

This is NOT an authorization server to use for anything real: there are no passwords (the
consent page lets you be anyone), everything lives in memory and is forgotten on restart, and it
serves exactly one resource. It implements the parts a client relies on, and checks what a client
could get wrong (PKCE, redirect URI, single-use codes, the resource), so the demo shows the real
connect flow of Portcullis rather than a shortcut.

Use it as a library (`build(base_url)`), or as a process::

    python examples/calendar/server.py --port 8766

which prints one line, `calendar MCP server ready at http://127.0.0.1:8766/mcp`, once it
accepts connections (`--port 0` picks a free port and prints it).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import html
import json
import re
import secrets
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

SERVER_NAME = "calendar"
MCP_PATH = "/mcp"
ISSUER_PATH = "/demo-oauth"
DEMO_LOGIN = "ada@example.com"
"""Who the consent page signs you in as unless you type another name."""
ACCESS_TOKEN_SECONDS = 300
CODE_SECONDS = 60
CONSENT_SECONDS = 600
READ, WRITE = "calendar.read", "calendar.write"
SCOPES = (READ, WRITE)
MAX_CLIENTS = 100
PKCE_VERIFIER = re.compile(r"^[A-Za-z0-9._~-]{43,128}$")  # RFC 7636 4.1
NO_STORE = {"cache-control": "no-store", "pragma": "no-cache"}


# --- the demo authorization server ------------------------------------------------------------


class OAuthError(Exception):
    """An RFC 6749 error answer: `error` and a description, as JSON (status 400 unless said)."""

    def __init__(self, error: str, description: str, status: int = 400):
        super().__init__(description)
        self.error, self.description, self.status = error, description, status

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.error, "error_description": self.description}, self.status, headers=NO_STORE)


@dataclass(frozen=True)
class Client:
    client_id: str
    client_name: str
    redirect_uris: tuple[str, ...]


@dataclass(frozen=True)
class Consent:
    """An authorization request shown on the consent page, waiting for Allow or Deny."""

    client: Client
    redirect_uri: str
    state: str | None
    code_challenge: str
    scopes: tuple[str, ...]
    resource: str
    expires_at: float


@dataclass(frozen=True)
class Code:
    client_id: str
    redirect_uri: str
    code_challenge: str
    scopes: tuple[str, ...]
    resource: str
    subject: str
    expires_at: float


@dataclass(frozen=True)
class Issued:
    """What an access or refresh token stands for."""

    client_id: str
    scopes: tuple[str, ...]
    resource: str
    subject: str
    expires_at: float | None


class DemoAuthorizationServer:
    """The toy authorization server (see the module docstring): in memory, one resource, no passwords.

    Its handlers and the MCP server's token checks run on the one event loop that serves the app,
    so the tables need no lock.
    """

    def __init__(self, issuer: str, resource: str, *, login: str = DEMO_LOGIN, access_token_seconds: int = ACCESS_TOKEN_SECONDS):
        self.issuer = issuer
        self.resource = resource
        self.login = login
        self.access_token_seconds = access_token_seconds
        self.clients: dict[str, Client] = {}
        self.consents: dict[str, Consent] = {}
        self.codes: dict[str, Code] = {}
        self.access_tokens: dict[str, Issued] = {}
        self.refresh_tokens: dict[str, Issued] = {}

    @property
    def path(self) -> str:
        return urllib.parse.urlsplit(self.issuer).path

    def metadata(self) -> dict[str, Any]:
        """RFC 8414 authorization server metadata."""
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "registration_endpoint": f"{self.issuer}/register",
            "scopes_supported": list(SCOPES),
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "token_endpoint_auth_methods_supported": ["none"],
            "code_challenge_methods_supported": ["S256"],
        }

    # --- the MCP side: which token is whose -------------------------------------------------

    async def verify_token(self, token: str) -> AccessToken | None:
        """The SDK's `TokenVerifier`: a token this server issued and that has not expired."""
        issued = self.access_tokens.get(token)
        if issued is None or issued.expires_at is None or issued.expires_at <= time.time():
            return None
        return AccessToken(
            token=token,
            client_id=issued.client_id,
            scopes=list(issued.scopes),
            expires_at=int(issued.expires_at),
            resource=issued.resource,
            subject=issued.subject,
            claims={"iss": self.issuer},
        )

    # --- HTTP -------------------------------------------------------------------------------

    async def metadata_endpoint(self, request: Request) -> Response:
        return JSONResponse(self.metadata())

    async def register(self, request: Request) -> Response:
        """RFC 7591: a public client (no secret) with the redirect URIs it names."""
        try:
            body = json.loads(await request.body())
        except ValueError:
            return OAuthError("invalid_client_metadata", "the body is not JSON").response()
        if not isinstance(body, dict):
            return OAuthError("invalid_client_metadata", "the body is not a JSON object").response()
        uris = body.get("redirect_uris")
        if not isinstance(uris, list) or not uris or not all(isinstance(u, str) and _is_http_url(u) for u in uris):
            return OAuthError("invalid_redirect_uri", "redirect_uris must be a non-empty list of http(s) URLs").response()
        if body.get("token_endpoint_auth_method", "none") != "none":
            return OAuthError("invalid_client_metadata", "this demo server registers public clients only (token_endpoint_auth_method none)").response()
        if len(self.clients) >= MAX_CLIENTS:
            return OAuthError("invalid_client_metadata", "too many clients registered; restart the demo", 503).response()
        client = Client("demo-client-" + secrets.token_urlsafe(12), str(body.get("client_name") or "an OAuth client")[:100], tuple(uris))
        self.clients[client.client_id] = client
        answer = {
            "client_id": client.client_id,
            "client_id_issued_at": int(time.time()),
            "client_name": client.client_name,
            "redirect_uris": list(client.redirect_uris),
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "none",
        }
        return JSONResponse(answer, status_code=201, headers=NO_STORE)

    async def authorize(self, request: Request) -> Response:
        if request.method == "POST":
            return await self._decide(request)
        query = request.query_params
        # Until the client and its redirect URI check out, errors are shown here, never redirected.
        client = self.clients.get(query.get("client_id", ""))
        if client is None:
            return _page("Unknown client", "This authorization request names a client that is not registered here.", 400)
        redirect_uri = query.get("redirect_uri", "")
        if redirect_uri not in client.redirect_uris:
            return _page("Wrong redirect URI", "The redirect_uri is not one the client registered.", 400)
        state = query.get("state")
        try:
            if query.get("response_type") != "code":
                raise OAuthError("unsupported_response_type", "only response_type=code is supported")
            challenge = query.get("code_challenge", "")
            if query.get("code_challenge_method") != "S256" or not challenge:
                raise OAuthError("invalid_request", "PKCE is required: code_challenge with code_challenge_method=S256")
            scopes = tuple(query.get("scope", READ).split())
            if not scopes or any(s not in SCOPES for s in scopes):
                raise OAuthError("invalid_scope", f"scopes offered: {' '.join(SCOPES)}")
            resource = query.get("resource", self.resource)
            if not _same_url(resource, self.resource):
                raise OAuthError("invalid_target", f"this server issues tokens for {self.resource} only")
        except OAuthError as exc:
            return _redirect(redirect_uri, {"error": exc.error, "error_description": exc.description, "state": state, "iss": self.issuer})
        self._forget_expired()
        request_id = secrets.token_urlsafe(16)
        self.consents[request_id] = Consent(client, redirect_uri, state, challenge, scopes, self.resource, time.time() + CONSENT_SECONDS)
        return self._consent_page(request_id, client, scopes)

    def _consent_page(self, request_id: str, client: Client, scopes: tuple[str, ...]) -> HTMLResponse:
        listed = "".join(f"<li><code>{html.escape(s)}</code></li>" for s in scopes)
        body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Demo calendar: allow access?</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:36em;margin:4em auto;padding:0 1em}}
.demo{{background:#fff3cd;padding:.5em 1em}}</style></head>
<body><p class="demo">Portcullis demo authorization server: a toy for <code>portcullis demo</code>, with no passwords.
Not a real sign-in.</p>
<h1>Allow {html.escape(client.client_name)} to use your calendar?</h1>
<p>It asks for:</p><ul>{listed}</ul>
<form method="post" action="{html.escape(self.path)}/authorize">
<input type="hidden" name="request" value="{html.escape(request_id)}">
<p><label>Signed in as <input name="login" value="{html.escape(self.login)}"></label></p>
<button type="submit" name="decision" value="allow">Allow</button>
<button type="submit" name="decision" value="deny">Deny</button>
</form></body></html>
"""
        return HTMLResponse(body, headers={**NO_STORE, "x-frame-options": "DENY"})

    async def _decide(self, request: Request) -> Response:
        form = _form(await request.body())
        consent = self.consents.pop(form.get("request", ""), None)
        if consent is None or consent.expires_at <= time.time():
            return _page("This request has expired", "Go back to the application and start connecting again.", 400)
        back: dict[str, str | None] = {"state": consent.state, "iss": self.issuer}
        if form.get("decision") != "allow":
            return _redirect(consent.redirect_uri, {"error": "access_denied", **back})
        subject = form.get("login", "").strip() or self.login
        code = secrets.token_urlsafe(32)
        self.codes[code] = Code(
            consent.client.client_id, consent.redirect_uri, consent.code_challenge, consent.scopes, consent.resource, subject,
            time.time() + CODE_SECONDS,
        )
        return _redirect(consent.redirect_uri, {"code": code, **back})

    async def token(self, request: Request) -> Response:
        form = _form(await request.body())
        try:
            client = self.clients.get(form.get("client_id", ""))
            if client is None:
                raise OAuthError("invalid_client", "unknown client_id (public clients send it in the form)", 401)
            grant_type = form.get("grant_type")
            if grant_type == "authorization_code":
                issued = self._redeem_code(client, form)
            elif grant_type == "refresh_token":
                issued = self._redeem_refresh_token(client, form)
            else:
                raise OAuthError("unsupported_grant_type", "grant types: authorization_code, refresh_token")
        except OAuthError as exc:
            return exc.response()
        return JSONResponse(self._issue(issued), headers=NO_STORE)

    def _redeem_code(self, client: Client, form: dict[str, str]) -> Issued:
        code = self.codes.pop(form.get("code", ""), None)  # popped: a code works once
        if code is None or code.expires_at <= time.time():
            raise OAuthError("invalid_grant", "unknown, used or expired code")
        if code.client_id != client.client_id:
            raise OAuthError("invalid_grant", "the code was issued to another client")
        if form.get("redirect_uri") != code.redirect_uri:
            raise OAuthError("invalid_grant", "redirect_uri differs from the authorization request's")
        verifier = form.get("code_verifier", "")
        if not PKCE_VERIFIER.match(verifier) or not secrets.compare_digest(_s256(verifier), code.code_challenge):
            raise OAuthError("invalid_grant", "the code_verifier does not match the code_challenge (PKCE S256)")
        self._check_resource(form, code.resource)
        return Issued(client.client_id, code.scopes, code.resource, code.subject, None)

    def _redeem_refresh_token(self, client: Client, form: dict[str, str]) -> Issued:
        token = form.get("refresh_token", "")
        issued = self.refresh_tokens.get(token)
        if issued is None or issued.client_id != client.client_id:
            raise OAuthError("invalid_grant", "unknown or already used refresh token")
        self._check_resource(form, issued.resource)
        scopes = tuple(form["scope"].split()) if form.get("scope") else issued.scopes
        if not set(scopes) <= set(issued.scopes):
            raise OAuthError("invalid_scope", "a refresh cannot widen the scopes granted")
        del self.refresh_tokens[token]  # rotation: the old refresh token is spent
        return Issued(client.client_id, scopes, issued.resource, issued.subject, None)

    def _check_resource(self, form: dict[str, str], bound: str) -> None:
        if "resource" in form and not _same_url(form["resource"], bound):
            raise OAuthError("invalid_target", f"this grant is for {bound}")

    def _issue(self, grant: Issued) -> dict[str, Any]:
        self._forget_expired()
        access, refresh = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        self.access_tokens[access] = Issued(grant.client_id, grant.scopes, grant.resource, grant.subject, time.time() + self.access_token_seconds)
        self.refresh_tokens[refresh] = grant
        return {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": self.access_token_seconds,
            "refresh_token": refresh,
            "scope": " ".join(grant.scopes),
        }

    def _forget_expired(self) -> None:
        now = time.time()
        for table in (self.consents, self.codes, self.access_tokens):
            for key in [k for k, v in table.items() if v.expires_at is not None and v.expires_at <= now]:
                del table[key]


def _form(body: bytes) -> dict[str, str]:
    """An application/x-www-form-urlencoded body; a repeated parameter is refused by keeping none."""
    pairs = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in pairs.items() if len(v) == 1}


def _s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode("ascii")


def _is_http_url(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and not parts.fragment


def _same_url(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def _redirect(uri: str, params: dict[str, str | None]) -> RedirectResponse:
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    separator = "&" if urllib.parse.urlsplit(uri).query else "?"
    return RedirectResponse(uri + separator + query, status_code=303, headers={"cache-control": "no-store"})


def _page(title: str, message: str, status: int) -> HTMLResponse:
    body = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>'
        f"<body><h1>{html.escape(title)}</h1><p>{html.escape(message)}</p></body></html>\n"
    )
    return HTMLResponse(body, status_code=status, headers=NO_STORE)


# --- the calendars -------------------------------------------------------------------------------


@dataclass
class Event:
    id: str
    title: str
    start: str
    end: str
    attendees: list[str]
    location: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "start": self.start, "end": self.end, "attendees": list(self.attendees), "location": self.location}


def seed_calendar(owner: str) -> dict[str, Event]:
    """The same week for everybody (no clock, no randomness), with the owner among the attendees."""
    events = [
        Event("ev-1", "Team stand-up", "2026-03-02T09:30", "2026-03-02T09:45", [owner, "grace@example.com", "linus@example.com"], "Room 2"),
        Event("ev-2", "Quarterly planning", "2026-03-02T13:00", "2026-03-02T15:00", [owner, "grace@example.com"], "Board room"),
        Event("ev-3", "1:1 with Grace", "2026-03-03T10:00", "2026-03-03T10:30", [owner, "grace@example.com"]),
        Event("ev-4", "Dentist", "2026-03-04T08:00", "2026-03-04T09:00", [owner], "Dr. Molar, High Street"),
        Event("ev-5", "Release retrospective", "2026-03-05T16:00", "2026-03-05T17:00", [owner, "linus@example.com"], "Video call"),
    ]
    return {e.id: e for e in events}


@dataclass(frozen=True)
class RecordedCall:
    tool: str
    subject: str
    token: str
    """The access token the call arrived with (kept for tests and the demo's check; never printed)."""


@dataclass
class CallLog:
    """Every tool call, with whose token it came: appended on the server's thread, read on another's."""

    _calls: list[RecordedCall] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def append(self, call: RecordedCall) -> None:
        with self._lock:
            self._calls.append(call)

    @property
    def calls(self) -> list[RecordedCall]:
        with self._lock:
            return list(self._calls)


def build_server(auth: DemoAuthorizationServer, calls: CallLog) -> MCPServer:
    server = MCPServer(
        SERVER_NAME,
        version="1.0.0",
        log_level="WARNING",  # MCPServer configures logging; at INFO it logs every request
        instructions="The calendar of whoever the OAuth access token was issued to.",
        token_verifier=auth,
        # Plain strings, as from configuration: the model keeps them exactly (no trailing slash added).
        auth=AuthSettings.model_validate(
            {
                "issuer_url": auth.issuer,
                "resource_server_url": auth.resource,
                "required_scopes": [READ],
                "validate_token_resource": True,
            }
        ),
    )
    calendars: dict[str, dict[str, Event]] = {}

    def calendar_of(tool: str, *, write: bool = False) -> tuple[str, dict[str, Event]]:
        token = get_access_token()
        if token is None or token.subject is None:  # the SDK refuses requests without a token first
            raise ToolError("401 Unauthorized: no access token")
        calls.append(RecordedCall(tool, token.subject, token.token))
        if write and WRITE not in token.scopes:
            raise ToolError(f"403 Forbidden: {tool} needs the {WRITE} scope; this token has {' '.join(token.scopes)}")
        return token.subject, calendars.setdefault(token.subject, seed_calendar(token.subject))

    @server.tool()
    async def calendar_list_events(day: str | None = None, limit: int = 10) -> dict[str, Any]:
        """List the events of your calendar, earliest first. `day` (YYYY-MM-DD) keeps that day's only."""
        owner, events = calendar_of("calendar_list_events")
        found = sorted((e for e in events.values() if day is None or e.start.startswith(day)), key=lambda e: e.start)
        return {"owner": owner, "events": [e.as_dict() for e in found[: max(1, min(limit, 50))]]}

    @server.tool()
    async def calendar_get_event(event_id: str) -> dict[str, Any]:
        """One event of your calendar, by id."""
        _, events = calendar_of("calendar_get_event")
        if event_id not in events:
            raise ToolError(f"no event {event_id!r}")
        return events[event_id].as_dict()

    @server.tool()
    async def calendar_find_free_slots(day: str, minutes: int = 30) -> dict[str, Any]:
        """Free slots of at least `minutes` between 09:00 and 17:00 on `day` (YYYY-MM-DD)."""
        _, events = calendar_of("calendar_find_free_slots")
        busy = sorted((e.start[11:16], e.end[11:16]) for e in events.values() if e.start.startswith(day))
        slots, cursor = [], "09:00"
        for start, end in [*busy, ("17:00", "17:00")]:
            if _minutes(start) - _minutes(cursor) >= minutes:
                slots.append({"start": f"{day}T{cursor}", "end": f"{day}T{start}"})
            cursor = max(cursor, end)
        return {"day": day, "slots": slots}

    @server.tool()
    async def calendar_create_event(title: str, start: str, end: str, attendees: list[str] | None = None) -> dict[str, Any]:
        """Create an event (start and end as YYYY-MM-DDTHH:MM) and invite the attendees. Needs calendar.write."""
        owner, events = calendar_of("calendar_create_event", write=True)
        number = max((int(key.removeprefix("ev-")) for key in events), default=0) + 1
        event = Event(f"ev-{number}", title, start, end, [owner, *(attendees or [])])
        events[event.id] = event
        return event.as_dict()

    @server.tool()
    async def calendar_delete_event(event_id: str) -> str:
        """Delete an event and tell its attendees. Needs calendar.write."""
        _, events = calendar_of("calendar_delete_event", write=True)
        if events.pop(event_id, None) is None:
            raise ToolError(f"no event {event_id!r}")
        return f"Deleted {event_id}."

    server.custom_route(f"/.well-known/oauth-authorization-server{auth.path}", methods=["GET"])(auth.metadata_endpoint)
    server.custom_route(f"{auth.path}/register", methods=["POST"])(auth.register)
    server.custom_route(f"{auth.path}/authorize", methods=["GET", "POST"])(auth.authorize)
    server.custom_route(f"{auth.path}/token", methods=["POST"])(auth.token)
    return server


def _minutes(hhmm: str) -> int:
    hours, _, minutes = hhmm.partition(":")
    return int(hours) * 60 + int(minutes)


@dataclass
class Calendar:
    """The app to serve, its demo authorization server, and the calls it received."""

    app: Starlette
    authorization_server: DemoAuthorizationServer
    calls: CallLog
    url: str
    """The MCP endpoint, `BASE/mcp`: also the resource its access tokens are bound to."""


def build(
    base_url: str, *, login: str = DEMO_LOGIN, access_token_seconds: int = ACCESS_TOKEN_SECONDS, host: str = "127.0.0.1"
) -> Calendar:
    """The calendar and its authorization server, to be served at `base_url` (`http://127.0.0.1:PORT`).

    The URL is part of the configuration (the issuer, the resource, the metadata), so bind the
    port first. `host` is the address bound: the SDK's DNS-rebinding protection admits it.
    """
    base = base_url.rstrip("/")
    auth = DemoAuthorizationServer(base + ISSUER_PATH, base + MCP_PATH, login=login, access_token_seconds=access_token_seconds)
    calls = CallLog()
    server = build_server(auth, calls)
    # Stateless with JSON answers: one POST per message, for clients of either protocol era.
    app = server.streamable_http_app(stateless_http=True, json_response=True, host=host)
    return Calendar(app, auth, calls, auth.resource)


# --- as a process -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the demo calendar MCP server and its toy OAuth server (demo only).")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8766, help="port to bind; 0 picks a free one (default 8766)")
    parser.add_argument("--login", default=DEMO_LOGIN, help=f"the consent page's default user (default {DEMO_LOGIN})")
    args = parser.parse_args(argv)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    calendar = build(f"http://{shown}:{port}", login=args.login, host=args.host)
    config = uvicorn.Config(calendar.app, log_level="warning", ws="none", access_log=False)
    server = uvicorn.Server(config)

    async def serve() -> None:
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started:
            print(f"{SERVER_NAME} MCP server ready at {calendar.url} (demo authorization server: {calendar.authorization_server.issuer})", flush=True)
        await serving

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
