"""Gateway CPU per request of a session-era (2025-11-25) session, by kind of request.

A client of the session protocol sends more than calls: `initialize`, then
`notifications/initialized`, `tools/list`, `ping`, a GET stream and, at the end, DELETE. A client
that opens a new session for every tool call (LangChain's MCP adapters by default) sends all
of them for each call. This measures what each costs the gateway: one `portcullis serve` in
front of the fast upstream (benchmarks/fast_upstream.py, which keeps no sessions), a lean
keep-alive client sending the same request again and again, and the gateway process's CPU
(/proc) over the run divided by the requests. With `--baseline`, a second gateway
(another `portcullis` executable, e.g. an older checkout) is measured the same way, the two
alternating round by round so machine noise hits both alike; medians and ratios are reported.

    python benchmarks/session_requests.py [--requests 400] [--rounds 3] [--baseline /path/to/portcullis]

A baseline executable can be a script running an older checkout:
`PYTHONPATH=/tmp/old/operator exec .venv/bin/python -m portcullis.cli "$@"`.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import load, stack  # noqa: E402

VERSION = "2025-11-25"
INITIALIZE = {"protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}
KINDS = ("initialize", "notifications/initialized", "tools/list", "ping", "tools/call", "GET stream", "DELETE")


def _session_id(gw: stack.Gateway) -> str:
    raw = load.legacy_request(gw.url, "initialize", INITIALIZE, token=gw.token, request_id=1).raw()
    with socket.create_connection(("127.0.0.1", _port(gw))) as sock:
        sock.sendall(raw)
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.lower() == "mcp-session-id":
            return value.strip()
    raise SystemExit("the gateway answered initialize without a session id")


def _port(gw: stack.Gateway) -> int:
    return int(gw.url.split(":")[2].split("/")[0])


def _requests(gw: stack.Gateway, session_id: str) -> dict[str, bytes]:
    def in_session(method: str, params: dict[str, object] | None, request_id: int | None) -> bytes:
        target = load.legacy_request(gw.url, method, params, token=gw.token, request_id=request_id)
        return load.Target(target.url, {**target.headers, "Mcp-Session-Id": session_id}, target.body).raw()

    session = f"Authorization: Bearer {gw.token}\r\nMcp-Session-Id: {session_id}\r\nMCP-Protocol-Version: {VERSION}\r\n"
    return {
        "initialize": load.legacy_request(gw.url, "initialize", INITIALIZE, token=gw.token, request_id=1).raw(),
        "notifications/initialized": in_session("notifications/initialized", None, None),
        "tools/list": in_session("tools/list", {}, 2),
        "ping": in_session("ping", {}, 3),
        "tools/call": in_session("tools/call", {"name": "echo", "arguments": {"text": "hi"}}, 4),
        "GET stream": f"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n{session}\r\n".encode(),
        "DELETE": f"DELETE /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n{session}\r\n".encode(),
    }


def _run(gw: stack.Gateway, kind: str, raw: bytes, count: int) -> float:
    """µs of gateway CPU per request of `kind`: keep-alive for requests, a connection each for the GET stream."""
    port = _port(gw)
    before = load.cpu_seconds(gw.pid)
    if kind == "GET stream":
        for _ in range(count):  # open it, read its first line, go away: what a client ending its session does
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(raw)
                seen = b""
                while b": open" not in seen:
                    seen += sock.recv(4096)
    else:
        client = load.KeepAliveClient("127.0.0.1", port)
        try:
            for _ in range(count):
                _, status, body = client.send(raw)
                if status not in (200, 202, 405):
                    raise SystemExit(f"{kind}: HTTP {status} {body[:200]!r}")
        finally:
            client.close()
    return (load.cpu_seconds(gw.pid) - before) / count * 1e6


@contextmanager
def _gateways(baseline: str | None, workdir: Path) -> Iterator[dict[str, stack.Gateway]]:
    two_cores = (os.cpu_count() or 1) > 1
    with ExitStack() as exits:
        _, upstream_url = exits.enter_context(stack.upstream([1] if two_cores else None))
        core = [0] if two_cores else None
        gateways = {"this": exits.enter_context(stack.gateway(upstream_url, workdir / "this", core))}
        if baseline:
            stack.GATEWAY_EXECUTABLE = baseline
            gateways["baseline"] = exits.enter_context(stack.gateway(upstream_url, workdir / "baseline", core))
            stack.GATEWAY_EXECUTABLE = None
        yield gateways


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="requests of each kind per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", help="another `portcullis` executable to measure alongside")
    args = parser.parse_args(argv)
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})  # the client beside the upstream; the gateways on core 0
    with tempfile.TemporaryDirectory(prefix="portcullis-session-bench-") as tmp, _gateways(args.baseline, Path(tmp)) as gateways:
        requests = {name: _requests(gw, _session_id(gw)) for name, gw in gateways.items()}
        figures: dict[str, dict[str, list[float]]] = {name: {kind: [] for kind in KINDS} for name in gateways}
        for round_number in range(args.rounds):
            for kind in KINDS:
                for name, gw in (gateways.items() if round_number % 2 == 0 else reversed(gateways.items())):
                    figures[name][kind].append(_run(gw, kind, requests[name][kind], args.requests))
            print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    names = list(gateways)
    print(f"\n## Gateway CPU per session-era request (µs, median of {args.rounds} rounds of {args.requests})\n")
    print("| request | " + " | ".join(names) + (" | ratio (this/baseline) |" if len(names) > 1 else " |"))
    print("|---|" + "---:|" * (len(names) + (1 if len(names) > 1 else 0)))
    for kind in KINDS:
        medians = [statistics.median(figures[name][kind]) for name in names]
        ratio = f" {medians[0] / medians[1]:.2f}x |" if len(names) > 1 else ""
        print(f"| {kind} | " + " | ".join(f"{m:,.0f}" for m in medians) + " |" + ratio)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
