"""Load generators that cost the measured server as little as possible.

Two kinds of measurement, two kinds of client:

- Throughput and latency under concurrency: `wrk` (C, epoll, one pre-built
  request replayed on keep-alive connections) when it is installed, driven by a
  Lua script that sets the MCP request and checks every response body; without
  it, `python_load`, a single-threaded `selectors` loop over raw sockets that
  replays pre-built request bytes. The Python fallback is correct but slower:
  above a few thousand calls/s it, not the server, is the limit, and the report
  says which generator produced each figure.
- Sequential latency: `KeepAliveClient`, one blocking keep-alive socket with
  TCP_NODELAY and a pre-built request, so a call costs the client a `sendall`
  and one or two `recv`s. Its own cost is the same for the direct and the
  gateway target, so it cancels in the difference ("added latency").

Every client here checks every answer: HTTP 200 and a JSON-RPC result that is
not a tool error. A benchmark that counted error answers as calls would measure
the speed of failing.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

MODERN_VERSION = "2026-07-28"
LEGACY_VERSION = "2025-11-25"
ACCEPT = "application/json, text/event-stream"


# --- requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One HTTP request to replay: where, which headers, which body."""

    url: str
    headers: Mapping[str, str]
    body: bytes
    label: str = ""

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 80

    @property
    def path(self) -> str:
        return urlsplit(self.url).path or "/"

    def raw(self) -> bytes:
        lines = [f"POST {self.path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(self.body)}"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def tool_call(url: str, tool: str, arguments: dict[str, Any], *, token: str | None = None, label: str = "") -> Target:
    """A 2026-07-28 `tools/call`: one self-contained POST, envelope in `params._meta`."""
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {
            "name": tool,
            "arguments": arguments,
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
                "io.modelcontextprotocol/clientCapabilities": {},
            },
        },
    }
    headers = {
        "Content-Type": "application/json",
        "Accept": ACCEPT,
        "MCP-Protocol-Version": MODERN_VERSION,
        "Mcp-Method": "tools/call",
        "Mcp-Name": tool,
    }
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return Target(url, headers, json.dumps(body, separators=(",", ":")).encode(), label)


def legacy_request(url: str, method: str, params: dict[str, Any] | None, *, token: str | None, request_id: int | None) -> Target:
    """A session-era request (or notification when `request_id` is None)."""
    body: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        body["params"] = params
    if request_id is not None:
        body["id"] = request_id
    headers = {"Content-Type": "application/json", "Accept": ACCEPT}
    if method != "initialize":
        headers["MCP-Protocol-Version"] = LEGACY_VERSION
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return Target(url, headers, json.dumps(body, separators=(",", ":")).encode())


def call_succeeded(status: int, body: bytes) -> bool:
    """HTTP 200 carrying a JSON-RPC result that is not a tool error."""
    if status != 200:
        return False
    try:
        message = json.loads(body)
    except ValueError:
        return False
    result = message.get("result") if isinstance(message, dict) else None
    return isinstance(result, dict) and not result.get("isError", False)


# --- HTTP/1.1 response framing ---------------------------------------------------------------


class ResponseParser:
    """Incremental HTTP/1.1 response framing: Content-Length or chunked bodies."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def next(self) -> tuple[int, bytes] | None:
        """One complete (status, body) if buffered, else None."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self.buffer[:end]).lower()
        status = int(head[9:12])
        match = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
        if match is not None:
            total = end + 4 + int(match.group(1))
            if len(self.buffer) < total:
                return None
            body = bytes(self.buffer[end + 4 : total])
            del self.buffer[:total]
            return status, body
        if b"\r\ntransfer-encoding: chunked" in head:
            return self._chunked(end + 4, status)
        # No framing (a 202/204 without Content-Length): an empty body.
        del self.buffer[: end + 4]
        return status, b""

    def _chunked(self, start: int, status: int) -> tuple[int, bytes] | None:
        pos, chunks = start, list[bytes]()
        while True:
            line_end = self.buffer.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(bytes(self.buffer[pos:line_end]).split(b";")[0], 16)
            if size == 0:
                trailer_end = self.buffer.find(b"\r\n\r\n", line_end)
                if trailer_end < 0:
                    if self.buffer[line_end : line_end + 4] == b"\r\n\r\n":
                        trailer_end = line_end
                    else:
                        return None
                del self.buffer[: trailer_end + 4]
                return status, b"".join(chunks)
            if len(self.buffer) < line_end + 2 + size + 2:
                return None
            chunks.append(bytes(self.buffer[line_end + 2 : line_end + 2 + size]))
            pos = line_end + 2 + size + 2


def _connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class KeepAliveClient:
    """One blocking keep-alive connection: the leanest sequential client Python allows."""

    def __init__(self, host: str, port: int, timeout: float = 30.0):
        self.sock = _connect(host, port)
        self.sock.settimeout(timeout)
        self.parser = ResponseParser()

    def send(self, raw: bytes) -> tuple[int, int, bytes]:
        """(nanoseconds, status, body) of one request/response."""
        started = time.perf_counter_ns()
        self.sock.sendall(raw)
        while True:
            answer = self.parser.next()
            if answer is not None:
                return time.perf_counter_ns() - started, answer[0], answer[1]
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self.parser.feed(data)

    def close(self) -> None:
        self.sock.close()


# --- results ---------------------------------------------------------------------------------


@dataclass
class LoadResult:
    generator: str
    connections: int
    seconds: float
    calls: int
    failures: int
    p50_ms: float
    p99_ms: float
    failure_samples: list[str] = field(default_factory=list)
    p999_ms: float = float("nan")

    @property
    def rps(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation: a reported p99 is a latency that happened)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-pct * len(ordered) // 100))))
    return ordered[rank - 1]


# --- wrk ---------------------------------------------------------------------------------------

WRK_SCRIPT = """
-- Generated by benchmarks/load.py: one MCP request replayed; every answer checked.
wrk.method = "POST"
wrk.body = {body}
{headers}
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) failures = 0; responses = 0; sample = "" end
function response(status, headers, body)
  responses = responses + 1
  if status ~= 200 or not string.find(body, '"result"', 1, true) or string.find(body, '"isError":true', 1, true) then
    failures = failures + 1
    if sample == "" then sample = status .. " " .. string.sub(body, 1, 200) end
  end
end
function done(summary, latency, requests)
  local f, r, s = 0, 0, ""
  for _, t in ipairs(threads) do
    f = f + t:get("failures"); r = r + t:get("responses")
    local ts = t:get("sample"); if s == "" and ts ~= nil then s = ts end
  end
  local e = summary.errors
  io.write(string.format("PORTCULLIS requests=%d duration_us=%d responses=%d failures=%d "
    .. "connect=%d read=%d write=%d status=%d timeout=%d p50_us=%d p99_us=%d p999_us=%d\\n",
    summary.requests, summary.duration, r, f, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
  if s ~= "" then io.write("PORTCULLIS sample " .. s .. "\\n") end
end
"""


def _lua_string(text: str) -> str:
    return "[==[" + text + "]==]"


def wrk_script(target: Target) -> str:
    headers = "\n".join(f"wrk.headers[ {_lua_string(k)} ] = {_lua_string(v)}" for k, v in target.headers.items())
    return WRK_SCRIPT.format(body=_lua_string(target.body.decode()), headers=headers)


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version(path: str) -> str:
    out = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=10)
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "wrk (version unknown)"


def wrk_load(
    target: Target, connections: int, seconds: float, *, wrk: str, prefix: Sequence[str] = (), commands: list[str] | None = None
) -> LoadResult:
    """Run wrk once: `wrk -c N -t min(N,2) -d Ds --latency -s script URL`."""
    threads = min(connections, 2)
    with tempfile.TemporaryDirectory(prefix="portcullis-wrk-") as tmp:
        script = Path(tmp) / "mcp.lua"
        script.write_text(wrk_script(target))
        argv = [*prefix, wrk, "-c", str(connections), "-t", str(threads), "-d", f"{seconds:g}s", "--latency",
                "--timeout", "10s", "-s", str(script), target.url]
        if commands is not None:
            shown = [*argv[:-3], "<script.lua>", argv[-1]]
            commands.append(" ".join(shown))
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("PORTCULLIS requests=")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out.stdout}\n{out.stderr}")
    fields = dict(part.split("=", 1) for part in line.split()[1:])
    numbers = {k: int(v) for k, v in fields.items()}
    socket_errors = sum(numbers[k] for k in ("connect", "read", "write", "timeout"))
    samples = [ln[len("PORTCULLIS sample ") :] for ln in out.stdout.splitlines() if ln.startswith("PORTCULLIS sample ")]
    return LoadResult(
        generator="wrk",
        connections=connections,
        seconds=numbers["duration_us"] / 1e6,
        calls=numbers["responses"] - numbers["failures"],
        failures=numbers["failures"] + socket_errors,
        p50_ms=numbers["p50_us"] / 1000,
        p99_ms=numbers["p99_us"] / 1000,
        failure_samples=samples,
        p999_ms=numbers["p999_us"] / 1000,
    )


# --- the Python fallback -------------------------------------------------------------------------


@dataclass
class _Conn:
    sock: socket.socket
    parser: ResponseParser
    sent_at: int = 0


def python_load(
    target: Target, connections: int, *, seconds: float | None = None, calls: int | None = None,
    check: Callable[[int, bytes], bool] = call_succeeded,
) -> LoadResult:
    """Closed-loop load from one thread: N keep-alive sockets, each with one request in flight.

    Stops after `calls` answers or `seconds`, whichever is given (then in-flight answers are drained).
    """
    if (seconds is None) == (calls is None):
        raise ValueError("give exactly one of seconds= or calls=")
    raw = target.raw()
    selector = selectors.DefaultSelector()
    conns: list[_Conn] = []
    latencies: list[int] = []
    failures = 0
    samples: list[str] = []
    try:
        for _ in range(connections):
            sock = _connect(target.host, target.port)
            sock.setblocking(False)
            conn = _Conn(sock, ResponseParser())
            conns.append(conn)
            selector.register(sock, selectors.EVENT_READ, conn)
        started = time.perf_counter_ns()
        deadline = started + int((seconds or 0) * 1e9) if seconds is not None else None
        issued = 0
        for conn in conns:
            if calls is not None and issued >= calls:
                break
            conn.sent_at = time.perf_counter_ns()
            conn.sock.sendall(raw)
            issued += 1
        in_flight = issued
        while in_flight:
            events = selector.select(timeout=30)
            if not events:
                raise TimeoutError(f"no answer from {target.url} within 30 s")
            for key, _ in events:
                conn = key.data
                data = conn.sock.recv(262144)
                if not data:
                    raise ConnectionError(f"{target.url} closed a connection under load")
                conn.parser.feed(data)
                while (answer := conn.parser.next()) is not None:
                    now = time.perf_counter_ns()
                    in_flight -= 1
                    if check(*answer):
                        latencies.append(now - conn.sent_at)
                    else:
                        failures += 1
                        if len(samples) < 3:
                            samples.append(f"{answer[0]} {answer[1][:200]!r}")
                    more = (calls is not None and issued < calls) or (deadline is not None and now < deadline)
                    if more:
                        conn.sent_at = time.perf_counter_ns()
                        conn.sock.sendall(raw)
                        issued += 1
                        in_flight += 1
        elapsed = (time.perf_counter_ns() - started) / 1e9
    finally:
        selector.close()
        for conn in conns:
            conn.sock.close()
    ms = [v / 1e6 for v in latencies]
    return LoadResult("python", connections, elapsed, len(latencies), failures,
                      percentile(ms, 50), percentile(ms, 99), samples, percentile(ms, 99.9))


# --- sequential latency ------------------------------------------------------------------------


@dataclass
class Paired:
    """Interleaved sequential calls: direct and through the gateway, alternating."""

    direct_ms: list[float]
    gateway_ms: list[float]
    failures: int

    @property
    def paired_diff_ms(self) -> list[float]:
        return [g - d for d, g in zip(self.direct_ms, self.gateway_ms, strict=True)]

    def summary(self) -> dict[str, float]:
        d50, d99 = percentile(self.direct_ms, 50), percentile(self.direct_ms, 99)
        g50, g99 = percentile(self.gateway_ms, 50), percentile(self.gateway_ms, 99)
        return {
            "direct_p50_ms": d50, "direct_p99_ms": d99, "gateway_p50_ms": g50, "gateway_p99_ms": g99,
            "added_p50_ms": g50 - d50, "added_p99_ms": g99 - d99,
            "paired_median_ms": statistics.median(self.paired_diff_ms) if self.direct_ms else float("nan"),
        }


def sequential_pairs(direct: Target, gateway: Target, calls: int, *, warmup: int = 50, max_seconds: float | None = None) -> Paired:
    """`calls` pairs on two keep-alive sockets; the order alternates so neither side always goes first.

    With `max_seconds`, stops early (after at least one measured pair) once that much time has passed.
    """
    d_client, g_client = KeepAliveClient(direct.host, direct.port), KeepAliveClient(gateway.host, gateway.port)
    d_raw, g_raw = direct.raw(), gateway.raw()
    d_ms: list[float] = []
    g_ms: list[float] = []
    failures = 0
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    try:
        for i in range(warmup + calls):
            if deadline is not None and d_ms and time.monotonic() > deadline:
                break
            pair: dict[str, float] = {}
            for side in (("d", "g") if i % 2 == 0 else ("g", "d")):
                client, raw = (d_client, d_raw) if side == "d" else (g_client, g_raw)
                ns, status, body = client.send(raw)
                if not call_succeeded(status, body):
                    failures += 1
                pair[side] = ns / 1e6
            if i >= warmup:
                d_ms.append(pair["d"])
                g_ms.append(pair["g"])
    finally:
        d_client.close()
        g_client.close()
    return Paired(d_ms, g_ms, failures)


# --- scripted idle connections (memory) -----------------------------------------------------------


def open_idle_connections(
    host: str, port: int, script: Sequence[bytes], count: int, *, window: int = 32, timeout: float = 60.0
) -> tuple[list[socket.socket], list[str]]:
    """Open `count` connections, run `script` (requests in order) on each, and leave them open.

    At most `window` connections run their script at once, so the server's transient
    memory for in-flight requests stays small and what remains is the cost of idle ones.
    Returns the open sockets and any failure descriptions.
    """
    selector = selectors.DefaultSelector()
    done: list[socket.socket] = []
    failures: list[str] = []
    active: dict[socket.socket, tuple[ResponseParser, int]] = {}
    pending = count
    deadline = time.monotonic() + timeout

    def start() -> None:
        nonlocal pending
        sock = _connect(host, port)
        sock.sendall(script[0])
        sock.setblocking(False)
        active[sock] = (ResponseParser(), 0)
        selector.register(sock, selectors.EVENT_READ)
        pending -= 1

    try:
        while pending or active:
            while pending and len(active) < window:
                start()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(done)} of {count} sessions opened within {timeout} s")
            for key, _ in selector.select(timeout=5):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                parser, step = active[sock]
                data = sock.recv(65536)
                if not data:
                    failures.append(f"connection closed at step {step}")
                    selector.unregister(sock)
                    sock.close()
                    del active[sock]
                    continue
                parser.feed(data)
                while (answer := parser.next()) is not None:
                    status, body = answer
                    if status >= 300 or (body and b'"error"' in body):
                        failures.append(f"step {step}: HTTP {status} {body[:160]!r}")
                    step += 1
                    if step < len(script):
                        sock.sendall(script[step])
                    else:
                        selector.unregister(sock)
                        sock.setblocking(True)
                        done.append(sock)
                        del active[sock]
                        break
                else:
                    active[sock] = (parser, step)
    except BaseException:
        for sock in [*done, *active]:
            sock.close()
        raise
    finally:
        selector.close()
    return done, failures


def still_open(socks: Sequence[socket.socket]) -> int:
    """How many sockets the peer has not closed (a zero-byte peek means it has)."""
    alive = 0
    for sock in socks:
        try:
            sock.setblocking(False)
            data = sock.recv(1, socket.MSG_PEEK)
            alive += 1 if data else 0
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    return alive


def rss_kib(pid: int) -> int:
    """VmRSS of a process, KiB (/proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (/proc/<pid>/stat), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
