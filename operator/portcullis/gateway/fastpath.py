"""A short path for the one request that dominates a gateway's traffic.

A 2026-07-28 `tools/call` is a self-contained POST: one JSON-RPC request in, one
JSON response out. Through the SDK's general machinery (Starlette routing, the
transport, the runner, per-request models) that exchange cost about as much CPU
as everything else the gateway does, so it is served here directly.

Fidelity is kept by construction, not by re-implementing the protocol:

- the request is checked with the SDK's own functions (the inbound validation
  ladder, duplicated routing headers, Accept), and the result is shaped with the
  SDK's own per-version serializer and stamped with the same `serverInfo`;
- anything not plainly a well-formed 2026-07-28 `tools/call` (a rejection of
  any kind, a notification, progress or log opt-in, a multi-round-trip retry, a call
  whose session-protocol upstream may ask its client something (bridge.py), `Mcp-Param-*`
  headers to validate, an unknown body size) is handed to the SDK unchanged, with
  the body replayed, so every error answer still comes from one place.

tests/gateway/test_fastpath.py sends the same requests both ways and compares
the answers.
"""

from __future__ import annotations

import json
from typing import Any, Final

from mcp.server.runner import modern_error_data
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import (
    ERROR_CODE_HTTP_STATUS,
    InboundModernRoute,
    classify_inbound_request,
    find_duplicated_routing_header,
)
from mcp_types import CLIENT_CAPABILITIES_META_KEY, LOG_LEVEL_META_KEY, SERVER_INFO_META_KEY
from mcp_types import methods as _methods
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from portcullis.gateway import jsonwire
from portcullis.gateway.catalog import Exposure
from portcullis.gateway.core import Gateway, RPCError, complete_tool_result
from portcullis.gateway.identity.tokens import SessionClaims
from portcullis.gateway.upstream import can_be_asked

MODERN: Final = "2026-07-28"
_ALLOWED_REQUEST_KEYS: Final = frozenset({"jsonrpc", "id", "method", "params"})
_ALLOWED_PARAM_KEYS: Final = frozenset({"name", "arguments", "_meta"})
_JSON_HEADERS: Final = (b"content-type", b"application/json")


def is_candidate(scope: Scope) -> bool:
    """Cheap header test: is this plausibly a 2026-07-28 tools/call POST?"""
    if scope["method"] != "POST":
        return False
    version = method = None
    for name, value in scope["headers"]:
        if name == b"mcp-protocol-version":
            version = value
        elif name == b"mcp-method":
            method = value
    return version == b"2026-07-28" and method == b"tools/call"


class FastToolCall:
    def __init__(self, gateway: Gateway, fallback: ASGIApp, server_info: dict[str, Any], max_body_bytes: int):
        self.gateway = gateway
        self.fallback = fallback
        self.server_info = server_info
        self.max_body_bytes = max_body_bytes
        self._header_tools: tuple[Exposure | None, frozenset[str]] = (None, frozenset())
        self.served = 0
        """Requests answered here rather than by the SDK (tests use it to know which path ran)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send, claims: SessionClaims) -> None:
        raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        headers = dict(raw)
        if not self._plain_request_headers(raw, headers):
            await self.fallback(scope, receive, send)
            return
        body = await _read_body(receive)
        request = _plain_call(body)
        if request is None or not isinstance(classify_inbound_request(request, headers=headers), InboundModernRoute):
            await self.fallback(scope, _replay(body, receive), send)
            return
        params = request["params"]
        name = params["name"]
        if name in self._tools_with_param_headers():
            await self.fallback(scope, _replay(body, receive), send)  # Mcp-Param-* validation is the SDK's
            return
        if self.gateway.asks_mid_call(name) and can_be_asked((params.get("_meta") or {}).get(CLIENT_CAPABILITIES_META_KEY)):
            await self.fallback(scope, _replay(body, receive), send)  # it may be asked something: bridge.py
            return
        self.served += 1
        await self._answer(request["id"], claims, name, params, send)

    def _tools_with_param_headers(self) -> frozenset[str]:
        exposure = self.gateway.exposure
        if self._header_tools[0] is not exposure:
            names = frozenset(n for n, schema in exposure.input_schemas.items() if "x-mcp-header" in json.dumps(schema))
            self._header_tools = (exposure, names)
        return self._header_tools[1]

    def _plain_request_headers(self, raw: list[tuple[str, str]], headers: dict[str, str]) -> bool:
        length = headers.get("content-length")
        if length is None or not length.isdigit() or int(length) > self.max_body_bytes:
            return False  # chunked or oversized: the SDK's body limit answers
        if not headers.get("content-type", "").lower().startswith("application/json"):
            return False
        accept = [t.split(";")[0].strip().lower() for t in headers.get("accept", "").split(",")]
        if not any(t in ("application/json", "application/*", "*/*") for t in accept):
            return False
        return find_duplicated_routing_header(raw) is None  # a folded dict would hide duplicates

    async def _answer(self, request_id: int | str, claims: SessionClaims, name: str, params: dict[str, Any], send: Send) -> None:
        meta = params.get("_meta")
        relay = {"_meta": {k: v for k, v in meta.items() if v is not None}} if meta else None
        status = 200
        try:
            result = await self.gateway.call_tool(claims, name, params.get("arguments"), relay)
            shaped = _methods.serialize_server_result("tools/call", MODERN, complete_tool_result(result))
            meta_out = shaped.get("_meta")  # the SDK's serverInfo stamp, with its precedence
            if meta_out is None:
                shaped["_meta"] = {SERVER_INFO_META_KEY: self.server_info}
            elif isinstance(meta_out, dict) and meta_out.get(SERVER_INFO_META_KEY) is None:
                shaped["_meta"] = {**meta_out, SERVER_INFO_META_KEY: self.server_info}
            message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "result": shaped}
        except RPCError as exc:
            message, status = _error(request_id, MCPError(exc.code, exc.message, exc.data))
        except Exception as exc:  # the same boundary as the SDK's: internals never reach the wire
            message, status = _error(request_id, exc)
        payload = jsonwire.dumps(message)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-length", str(len(payload)).encode()), _JSON_HEADERS],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _error(request_id: int | str, exc: Exception) -> tuple[dict[str, Any], int]:
    error = modern_error_data(exc).model_dump(mode="json", by_alias=True, exclude_none=True)
    return {"jsonrpc": "2.0", "id": request_id, "error": error}, ERROR_CODE_HTTP_STATUS.get(error["code"], 200)


def _plain_call(body: bytes) -> dict[str, Any] | None:
    """The decoded request if it is exactly one ordinary tools/call, else None."""
    try:
        request = jsonwire.loads(body)
    except ValueError:  # jsonwire.loads: too deep a nesting is one too
        return None
    if not isinstance(request, dict) or request.keys() - _ALLOWED_REQUEST_KEYS:
        return None
    request_id = request.get("id")
    if request.get("jsonrpc") != "2.0" or request.get("method") != "tools/call":
        return None
    if isinstance(request_id, bool) or not isinstance(request_id, (int, str)):
        return None
    params = request.get("params")
    if not isinstance(params, dict) or params.keys() - _ALLOWED_PARAM_KEYS:
        return None
    arguments = params.get("arguments")
    meta = params.get("_meta")
    if not isinstance(params.get("name"), str) or not (arguments is None or isinstance(arguments, dict)):
        return None
    if not isinstance(meta, dict) or "progressToken" in meta or LOG_LEVEL_META_KEY in meta:
        return None  # progress and log messages belong to the SDK's streaming path
    return request


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def replay(first: Message, receive: Receive) -> Receive:
    """A receive that yields an already-read message first, then the real stream."""
    pending: list[Message] = [first]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


def _replay(body: bytes, receive: Receive) -> Receive:
    """The already-read body as one message, then the real stream."""
    return replay({"type": "http.request", "body": body, "more_body": False}, receive)
