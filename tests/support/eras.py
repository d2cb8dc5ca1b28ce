"""Upstreams limited to one protocol era, for tests of the gateway's paths towards each.

Servers built with the SDK speak both eras. Wrapped here, an app speaks one: refusing
2026-07-28's `server/discover`, as a server from before 2026-07-28 does (the gateway
then opens `initialize` sessions), or refusing `initialize`, as a 2026-07-28-only
server does (the gateway then never opens one, even for a session-era agent).
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


def session_protocol_only(app: ASGIApp) -> ASGIApp:
    """The app, refusing 2026-07-28's `server/discover`, so the gateway speaks the session protocol to it."""
    return _refusing(app, "server/discover")


def _refusing(app: ASGIApp, refused: str) -> ASGIApp:
    """The app, answering `refused` with "Method not found" as a server without it does."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        if isinstance(request, dict) and request.get("method") == refused:
            error = {"jsonrpc": "2.0", "id": request.get("id"), "error": {"code": -32601, "message": "Method not found"}}
            payload = json.dumps(error).encode()
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": payload})
            return
        replayed = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay() -> Message:
            return replayed.pop() if replayed else await receive()

        await app(scope, replay, send)

    return wrapped


def modern_only(app: ASGIApp) -> ASGIApp:
    """The app, refusing the session protocol's `initialize`, as a 2026-07-28-only server does."""
    return _refusing(app, "initialize")
