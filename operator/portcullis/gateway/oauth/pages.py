"""The OAuth callback: where users' browsers land after they consent at the authorization server.

It is the one gateway endpoint a person's browser reaches, so it lives apart from the admin API:
in a cluster on its own port (8083, `connect`), which an Ingress may expose while the admin port
stays private; under `portcullis serve` on the admin port, which is on loopback anyway. It takes
nothing but the authorization server's redirect (`code`, `state`, or `error`) and answers a
plain page; the page never shows a token, a code or the state.
"""

from __future__ import annotations

import html
import logging
import secrets

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from portcullis.gateway.oauth.flow import CALLBACK_PATH, OAuthConnections, Outcome

log = logging.getLogger("portcullis.oauth")

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:36em;margin:4em auto;padding:0 1em}}</style></head>
<body><h1>{title}</h1><p>{message}</p></body></html>
"""


def page(outcome: Outcome) -> HTMLResponse:
    body = _PAGE.format(title=html.escape(outcome.title), message=html.escape(outcome.message))
    headers = {
        "cache-control": "no-store",
        "referrer-policy": "no-referrer",  # the URL held the code and state
        "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'",
        "x-frame-options": "DENY",
    }
    return HTMLResponse(body, status_code=outcome.status, headers=headers)


def connect_routes(oauth: OAuthConnections) -> list[BaseRoute]:
    async def callback(request: Request) -> Response:
        query = {k: v for k, v in request.query_params.items() if k in ("code", "state", "error")}
        try:
            return page(await oauth.callback(query))
        except Exception as exc:  # the vault or the lock failed: say so, keep the details in the log
            incident = secrets.token_hex(8)
            log.exception("OAuth callback failed (incident %s)", incident)
            return page(Outcome(503, "Not connected", f"The gateway could not finish ({type(exc).__name__}); incident {incident}. Try again."))

    return [Route(CALLBACK_PATH, callback, methods=["GET"])]


def build_connect_app(oauth: OAuthConnections) -> Starlette:
    """The connect port of a cluster gateway: the callback and a health answer, nothing else."""
    return Starlette(routes=[*connect_routes(oauth), Route("/healthz", lambda request: JSONResponse({"status": "ok"}))])
