"""A loopback reverse proxy that adds one `Authorization` header to every request.

Why it exists: the official conformance CLI (`conformance server --url URL`,
0.2.0-alpha.12) has no way to send a header or a bearer token. Its server
scenarios build their own requests (the TypeScript SDK's transport with no
`requestInit`, and raw `fetch` calls with fixed header sets), and its only
`--token` options belong to the GitHub-facing subcommands. A gateway answers
401 to a request without a session token, so the suite reaches it through this
proxy, which plays the part of an agent that holds a token.

It is deliberately transparent apart from that one header: method, path, query,
body and every request header are forwarded as received - including `Host` and
`Origin`, which the DNS-rebinding scenario varies - and the response (status,
headers, body) is streamed back chunk by chunk, so server-sent events arrive as
the gateway sends them. Hop-by-hop headers are not forwarded (RFC 9110 §7.6.1).
An `Authorization` header the client sent itself is replaced.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import anyio
from starlette.types import Message, Receive, Scope, Send

from tests.support.servers import serve_asgi

# RFC 9110 §7.6.1 hop-by-hop fields, plus the two the HTTP client recomputes itself.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)
_TIMEOUT = aiohttp.ClientTimeout(total=120, sock_connect=10)


class AuthInjectingProxy:
    """ASGI app forwarding `/anything` to `target_origin/anything` with `Authorization: <value>`."""

    def __init__(self, target_origin: str, authorization: str):
        self.target_origin = target_origin.rstrip("/")
        self.authorization = authorization
        self._http: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._forward(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # No pooled keep-alive: each client request gets its own upstream
                # connection, so nothing is shared between the suite's requests.
                self._http = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(force_close=True), auto_decompress=False
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._http is not None:
                    await self._http.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self._http is not None, "lifespan startup did not run"
        body = await _read_body(receive)
        headers: list[tuple[str, str]] = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in scope["headers"]
            if name not in _HOP_BY_HOP and name != b"authorization"
        ]
        headers.append(("Authorization", self.authorization))
        url = self.target_origin + scope["raw_path"].decode("latin-1")
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        # The client may hang up while a stream is still open (an SSE GET, a
        # subscription): stop reading from the gateway then, instead of holding
        # its stream until shutdown.
        async with anyio.create_task_group() as group:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                group.cancel_scope.cancel()

            group.start_soon(watch_disconnect)
            await self._relay(scope["method"], url, body, headers, send)
            group.cancel_scope.cancel()

    async def _relay(self, method: str, url: str, body: bytes, headers: list[tuple[str, str]], send: Send) -> None:
        assert self._http is not None
        try:
            async with self._http.request(
                method,
                url,
                data=body or None,
                headers=headers,
                timeout=_TIMEOUT,
                allow_redirects=False,
                # aiohttp would otherwise add its own Host/User-Agent/Accept-Encoding.
                skip_auto_headers=("Host", "User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            ) as upstream:
                await send(
                    {
                        "type": "http.response.start",
                        "status": upstream.status,
                        "headers": [
                            (k.lower().encode("latin-1"), v.encode("latin-1"))
                            for k, v in _raw_headers(upstream)
                            if k.lower().encode("latin-1") not in _HOP_BY_HOP
                        ],
                    }
                )
                async for chunk in upstream.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except aiohttp.ClientError as exc:
            payload = f"auth proxy: upstream exchange failed ({type(exc).__name__})".encode()
            await send({"type": "http.response.start", "status": 502, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": payload})


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _raw_headers(response: aiohttp.ClientResponse) -> list[tuple[str, str]]:
    # As received (repeated fields kept apart), not aiohttp's merged multidict view.
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers]


@contextmanager
def auth_proxy(target_url: str, token: str) -> Iterator[str]:
    """Serve a proxy to `target_url`'s origin that presents `Bearer <token>`; yields the proxied URL."""
    scheme, _, rest = target_url.partition("://")
    origin, slash, path = rest.partition("/")
    app: Any = AuthInjectingProxy(f"{scheme}://{origin}", f"Bearer {token}")
    with serve_asgi(app) as running:
        yield running.url(slash + path)
