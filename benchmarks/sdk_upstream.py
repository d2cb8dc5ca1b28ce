"""An upstream built the way most MCP servers are: the MCP SDK's `MCPServer`, served by uvicorn.

`fast_upstream.py` is a bare asyncio server, so that the gateway's own cost is what a
benchmark sees. Users run SDK servers, though, and what the gateway sends them decides
which path the SDK takes (era, JSON or SSE answers, session or not). This one has the
same `echo` and `add` tools, with the SDK's defaults (Streamable HTTP at `/mcp`, sessions,
SSE answers unless the client accepts JSON only).

    python benchmarks/sdk_upstream.py --port 0     # prints `ready http://127.0.0.1:PORT/mcp`
"""

from __future__ import annotations

import argparse
import socket
import sys

import uvicorn
from mcp.server.mcpserver import MCPServer


def build() -> MCPServer:
    server = MCPServer("bench-sdk-upstream", log_level="WARNING")

    @server.tool()
    def echo(text: str) -> str:
        """Echo the text back."""
        return text

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    sock = socket.socket()
    sock.bind(("127.0.0.1", args.port))
    sock.listen(1024)
    port = sock.getsockname()[1]
    app = build().streamable_http_app()
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", ws="none")
    print(f"ready http://127.0.0.1:{port}/mcp", flush=True)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
