"""An upstream MCP server that is never the bottleneck of a gateway benchmark.

The gateway's cost per call is what the benchmark is after, so whatever sits
behind it must answer in a small fraction of that cost. An upstream built on the
MCP SDK spends most of a millisecond per call in Starlette, pydantic and the
SDK's dispatch (it caps near 400-500 calls/s on a 2-core machine), which would
hide the gateway behind it. This one is a bare `asyncio.Protocol` speaking
HTTP/1.1 keep-alive (on uvloop when installed), decoding the JSON-RPC body once
and answering from pre-serialized results:

- the 2026-07-28 wire (one self-contained POST per request, envelope in
  `params._meta`): `server/discover`, `tools/list`, `tools/call`, `ping`;
- the session era's `initialize` and `notifications/initialized`, answered
  statelessly (no `Mcp-Session-Id`), so a legacy client can talk to it too;
- tools: `echo` (returns its `text` argument), `add` (structured result) and
  `noop` (empty text).

It checks only what it needs to answer (method, id, tool name): validation of
the envelope is the gateway's job, and the benchmark measures the gateway.
`GET /stats` returns how many requests of each method arrived, so a benchmark
can confirm that every call it counted as answered really reached the upstream.

    python benchmarks/fast_upstream.py [--host 127.0.0.1] [--port 0]

prints `fast upstream ready at http://HOST:PORT/mcp` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any, Final, cast

MODERN_VERSION: Final = "2026-07-28"
LEGACY_VERSIONS: Final = ("2025-11-25", "2025-06-18", "2025-03-26")
SERVER_INFO: Final = {"name": "fast-upstream", "version": "1.0.0"}
META: Final = {"io.modelcontextprotocol/serverInfo": SERVER_INFO}
MAX_BODY: Final = 4 * 1024 * 1024

TOOLS: Final[list[dict[str, Any]]] = [
    {
        "name": "echo",
        "description": "Return the given text unchanged.",
        "inputSchema": {
            "type": "object",
            "properties": {"text": {"type": "string", "description": "what to echo"}},
            "required": ["text"],
        },
    },
    {
        "name": "add",
        "description": "Add two integers; the sum comes back as structured content too.",
        "inputSchema": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
        "outputSchema": {"type": "object", "properties": {"sum": {"type": "integer"}}, "required": ["sum"]},
    },
    {
        "name": "noop",
        "description": "Do nothing and say so.",
        "inputSchema": {"type": "object", "properties": {}},
    },
]


def _dump(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# Results that never change are serialized once; only the id is spliced in per request.
_DISCOVER: Final = _dump(
    {
        "capabilities": {"tools": {"listChanged": False}},
        "supportedVersions": [MODERN_VERSION],
        "resultType": "complete",
        "cacheScope": "private",
        "ttlMs": 0,
        "_meta": META,
    }
)
# 2026-07-28 cacheable results must say how they may be cached (the SDK client validates it).
_TOOLS_MODERN: Final = _dump({"tools": TOOLS, "resultType": "complete", "cacheScope": "private", "ttlMs": 0, "_meta": META})
_TOOLS_LEGACY: Final = _dump({"tools": TOOLS})
_EMPTY_MODERN: Final = _dump({"resultType": "complete"})
_EMPTY_LEGACY: Final = b"{}"


def _initialize_result(requested: object) -> bytes:
    version = requested if isinstance(requested, str) and requested in LEGACY_VERSIONS else LEGACY_VERSIONS[0]
    return _dump({"protocolVersion": version, "capabilities": {"tools": {"listChanged": False}}, "serverInfo": SERVER_INFO})


def _call_result(name: object, arguments: object, modern: bool) -> bytes | None:
    args = arguments if isinstance(arguments, dict) else {}
    result: dict[str, Any]
    if name == "echo":
        result = {"content": [{"type": "text", "text": str(args.get("text", ""))}], "isError": False}
    elif name == "add":
        try:
            total = int(args.get("a", 0)) + int(args.get("b", 0))
        except (TypeError, ValueError):
            result = {"content": [{"type": "text", "text": "a and b must be integers"}], "isError": True}
        else:
            result = {"content": [{"type": "text", "text": str(total)}], "structuredContent": {"sum": total}, "isError": False}
    elif name == "noop":
        result = {"content": [{"type": "text", "text": ""}], "isError": False}
    else:
        return None
    if modern:
        result["resultType"] = "complete"
        result["_meta"] = META
    return _dump(result)


def _response(request_id: Any, result: bytes) -> bytes:
    return b'{"jsonrpc":"2.0","id":' + _dump(request_id) + b',"result":' + result + b"}"


def _error(request_id: Any, code: int, message: str) -> bytes:
    return _dump({"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}})


def answer(message: Any, counts: Counter[str]) -> bytes | None:
    """The JSON-RPC response body for one decoded message; None for a notification."""
    if not isinstance(message, dict):
        return _error(None, -32600, "not a JSON-RPC request")
    method = message.get("method")
    counts[str(method)] += 1
    if "id" not in message:
        return None
    request_id = message["id"]
    params = message.get("params")
    params = params if isinstance(params, dict) else {}
    meta = params.get("_meta")
    modern = isinstance(meta, dict) and meta.get("io.modelcontextprotocol/protocolVersion") == MODERN_VERSION
    if method == "tools/call":
        result = _call_result(params.get("name"), params.get("arguments"), modern)
        if result is None:
            return _error(request_id, -32602, f"Unknown tool: {params.get('name')}")
        return _response(request_id, result)
    if method == "tools/list":
        return _response(request_id, _TOOLS_MODERN if modern else _TOOLS_LEGACY)
    if method == "server/discover":
        return _response(request_id, _DISCOVER)
    if method == "initialize":
        return _response(request_id, _initialize_result(params.get("protocolVersion")))
    if method == "ping":
        return _response(request_id, _EMPTY_MODERN if modern else _EMPTY_LEGACY)
    return _error(request_id, -32601, f"Method not found: {method}")


def _http(status: bytes, body: bytes, content_type: bytes = b"application/json", close: bool = False) -> bytes:
    head = b"HTTP/1.1 " + status + b"\r\ncontent-type: " + content_type + b"\r\ncontent-length: " + str(len(body)).encode()
    if close:
        head += b"\r\nconnection: close"
    return head + b"\r\n\r\n" + body


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests are answered in order as they complete."""

    def __init__(self, counts: Counter[str]):
        self.counts = counts
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > 65536:
                    self._fail(b"431 Request Header Fields Too Large")
                return
            head = bytes(self.buffer[:end]).lower()
            length = 0
            marker = head.find(b"\r\ncontent-length:")
            if marker >= 0:
                stop = head.find(b"\r\n", marker + 2)
                try:
                    length = int(head[marker + 17 : stop if stop >= 0 else None])
                except ValueError:
                    self._fail(b"400 Bad Request")
                    return
            elif b"\r\ntransfer-encoding:" in head:
                self._fail(b"411 Length Required")
                return
            if length > MAX_BODY:
                self._fail(b"413 Content Too Large")
                return
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            body = bytes(self.buffer[end + 4 : total])
            del self.buffer[:total]
            self.transport.write(self._handle(head, body))
            if b"\r\nconnection: close" in head:
                self.transport.close()
                self.transport = None

    def _handle(self, head: bytes, body: bytes) -> bytes:
        line_end = head.find(b"\r\n")
        method, _, rest = head[: line_end if line_end >= 0 else None].partition(b" ")
        path = rest.partition(b" ")[0]
        if method == b"get" and path == b"/stats":
            return _http(b"200 OK", _dump(dict(self.counts)))
        if method != b"post":
            return _http(b"405 Method Not Allowed", b"")
        try:
            message = json.loads(body)
        except ValueError:
            return _http(b"400 Bad Request", _error(None, -32700, "Parse error"))
        out = answer(message, self.counts)
        if out is None:
            return _http(b"202 Accepted", b"")
        return _http(b"200 OK", out)

    def _fail(self, status: bytes) -> None:
        if self.transport is not None:
            self.transport.write(_http(status, b"", close=True))
            self.transport.close()
            self.transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(host: str, port: int, on_ready: Callable[[str], None]) -> None:
    counts: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(counts), host, port, backlog=4096, reuse_address=True)
    bound = server.sockets[0].getsockname()
    on_ready(f"http://{bound[0]}:{bound[1]}/mcp")
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A minimal-cost MCP upstream for gateway benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--no-uvloop", action="store_true", help="use the stdlib event loop even if uvloop is installed")
    args = parser.parse_args(argv)

    def ready(url: str) -> None:
        print(f"fast upstream ready at {url} (loop: {loop_name})", flush=True)

    runner: Callable[[Any], Any] = asyncio.run
    loop_name = "asyncio"
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            runner, loop_name = uvloop.run, "uvloop"
    runner(serve(args.host, args.port, ready))
    return 0


if __name__ == "__main__":
    sys.exit(main())
