"""What large tool results do to everybody else's calls, and to the gateway's memory.

One `portcullis serve` process fronts two upstreams, each in its own process:

- `large`: answers its one tool with a result of `--result-bytes` (50 MB) of text,
  written from one reused chunk (a bare asyncio HTTP server: it costs next to nothing);
- `fast`: `fast_upstream.py`, answering `echo` at tens of thousands of calls/s.

Other users' calls are small `echo` calls to `fast`, paced (`--small-agents` clients,
`--small-rate` calls/s each, raw keep-alive sockets); their latency is the figure.
Meanwhile `--large-agents` agents (6) fetch large results back to back, in a process
of their own that reads and discards the bytes. Scenarios, each on a fresh gateway:

- baseline: no large results at all;
- for each `--max-result-bytes` (default 64 MiB, then 16 MiB, the default of
  `maxResultBytes`): the large connection gets that limit, so with 64 MiB the
  50 MB results flow to the agents and with 16 MiB they are refused: twice, once
  with the upstream declaring its Content-Length (refused before a byte is read)
  and once chunked (no length: cut off when 16 MiB have been read).

The gateway's RSS is sampled every 50 ms, and its peak (VmHWM) read at the end.

Two in-process measurements follow, without a gateway, on the result shapes the
gateway meets: how long the event loop stalls while one result is parsed inline
and with `asyncio.to_thread` (what upstream.py does above 1 MiB), and what each
step on the way out costs (parse, the audit digest, the SDK's result shaping,
serialization), to show which one dominates.

Processes are pinned when taskset and two cores exist: the gateway alone on the
first core, everything else on the second.

    .venv/bin/python benchmarks/large_results.py                  # about 2 minutes
    .venv/bin/python benchmarks/large_results.py --quick          # a smoke run
    .venv/bin/python benchmarks/large_results.py --max-result-bytes 67108864 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import platform
import re
import secrets
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import load, stack  # noqa: E402

MiB = 1024 * 1024
DEFAULT_LIMIT = 16 * MiB
USER = "bench-user@example.com"
RESULTS = stack.BENCH_DIR / "results" / f"large-results-{date(2026, 12, 1).isoformat()}.md"
ALPHABET = b"abcdefghijklmnopqrstuvwxyz0123456789"

MANIFESTS = """\
apiVersion: portcullis.dev/v1alpha1
kind: MCPConnection
metadata: {{name: fast, namespace: bench}}
spec: {{url: "{fast_url}", timeoutSeconds: 30, credential: {{source: none}}}}
---
apiVersion: portcullis.dev/v1alpha1
kind: MCPConnection
metadata: {{name: large, namespace: bench}}
spec: {{url: "{large_url}", timeoutSeconds: 60, maxResultBytes: {limit}, credential: {{source: none}}}}
---
apiVersion: portcullis.dev/v1alpha1
kind: VirtualMCPServer
metadata: {{name: bench, namespace: bench}}
spec:
  sessionTokens: {{defaultTTL: 1h, maxTTL: 2h}}
---
apiVersion: portcullis.dev/v1alpha1
kind: ToolMapping
metadata: {{name: bench-fast, namespace: bench}}
spec:
  serverRef: {{name: bench}}
  connectionRef: {{name: fast}}
  tools: [{{name: echo}}]
---
apiVersion: portcullis.dev/v1alpha1
kind: ToolMapping
metadata: {{name: bench-large, namespace: bench}}
spec:
  serverRef: {{name: bench}}
  connectionRef: {{name: large}}
  tools: [{{name: large}}]
"""


# --- the large upstream (its own process: --role large-upstream) ----------------------------------


def large_result_pieces(request_id: Any, text_bytes: int) -> tuple[bytes, bytes, bytes, int]:
    """(prefix, 1 MiB chunk, suffix, chunks) of a tools/call response with `text_bytes` of text."""
    prefix = b'{"jsonrpc":"2.0","id":' + json.dumps(request_id).encode() + b',"result":{"content":[{"type":"text","text":"'
    suffix = b'"}],"isError":false,"resultType":"complete"}}'
    chunk = ALPHABET * (MiB // len(ALPHABET))
    return prefix, chunk, suffix, max(1, text_bytes // len(chunk))


async def _serve_large(port: int, text_bytes: int, chunked: bool) -> None:
    def answer(message: dict[str, Any]) -> bytes:
        return json.dumps(message, separators=(",", ":")).encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                found = re.search(rb"\r\ncontent-length:\s*(\d+)", head.lower())
                body = json.loads(await reader.readexactly(int(found.group(1)))) if found else {}
                rid, method = body.get("id"), body.get("method")
                if rid is None:
                    writer.write(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n")
                    continue
                if method == "tools/call":
                    prefix, chunk, suffix, chunks = large_result_pieces(rid, text_bytes)
                    if chunked:  # no length declared: the gateway can only count while it reads
                        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
                        frame: Callable[[bytes], bytes] = lambda data: b"%x\r\n%s\r\n" % (len(data), data)  # noqa: E731
                        writer.write(frame(prefix))
                        framed = frame(chunk)
                        for _ in range(chunks):
                            writer.write(framed)
                            await writer.drain()
                        writer.write(frame(suffix) + b"0\r\n\r\n")
                        continue
                    length = len(prefix) + len(chunk) * chunks + len(suffix)
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % length + prefix)
                    for _ in range(chunks):
                        writer.write(chunk)
                        await writer.drain()
                    writer.write(suffix)
                    continue
                if method == "server/discover":
                    result: dict[str, Any] = {"supportedVersions": ["2026-07-28"], "capabilities": {"tools": {}}, "resultType": "complete"}
                    payload = answer({"jsonrpc": "2.0", "id": rid, "result": result})
                elif method == "tools/list":
                    tools = [{"name": "large", "description": "A large result.", "inputSchema": {"type": "object"}}]
                    payload = answer({"jsonrpc": "2.0", "id": rid, "result": {"tools": tools, "resultType": "complete"}})
                else:
                    payload = answer({"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": "Method not found"}})
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(payload) + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass  # the gateway hung up (it refused an answer, or is done)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    bound = server.sockets[0].getsockname()[1]
    print(f"large upstream ready at http://127.0.0.1:{bound}/mcp", flush=True)
    async with server:
        await server.serve_forever()


@contextmanager
def large_upstream(cores: Sequence[int] | None, text_bytes: int, chunked: bool) -> Iterator[tuple[stack.Process, str]]:
    argv = [*stack.pin_prefix(cores), sys.executable, __file__, "--role", "large-upstream", "--result-bytes", str(text_bytes)]
    if chunked:
        argv.append("--chunked")
    popen = subprocess.Popen(argv, stdout=subprocess.PIPE)
    process = stack.Process(popen, argv)
    try:
        assert popen.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(popen.stdout, selectors.EVENT_READ)
            if not selector.select(stack.STARTUP_TIMEOUT):
                raise TimeoutError(f"the large upstream printed no ready line within {stack.STARTUP_TIMEOUT} s")
        line = popen.stdout.readline().decode().strip()
        if "ready at " not in line:
            raise RuntimeError(f"large upstream did not start: {line!r}")
        yield process, line.split("ready at ", 1)[1].strip()
    finally:
        process.stop()
        if popen.stdout is not None:
            popen.stdout.close()


# --- the large agents (their own process: --role fetch) -------------------------------------------


def _fetch_one(raw: bytes, buffer: memoryview, sock: socket.socket) -> tuple[int, bool]:
    """One call on a keep-alive socket: (body bytes, whether it was a result rather than an error)."""
    sock.sendall(raw)
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("gateway closed the connection")
        head += data
    header, rest = head.split(b"\r\n\r\n", 1)
    found = re.search(rb"\r\ncontent-length:\s*(\d+)", header.lower())
    if found is None:
        raise RuntimeError(f"no content-length in {header[:200]!r}")
    length, got = int(found.group(1)), len(rest)
    first = bytes(rest[:4096])
    while got < length:
        n = sock.recv_into(buffer, min(len(buffer), length - got))
        if n == 0:
            raise ConnectionError("gateway closed mid-body")
        if len(first) < 4096:
            first += bytes(buffer[: min(n, 4096 - len(first))])
        got += n
    return length, b'"isError":true' not in first and b'"error"' not in first[:200]


def fetch_large(url: str, token: str, agents: int, seconds: float) -> dict[str, Any]:
    target = load.tool_call(url, "large", {}, token=token)
    raw, deadline = target.raw(), time.monotonic() + seconds
    results: list[dict[str, Any]] = []

    def agent() -> None:
        buffer = memoryview(bytearray(MiB))
        tally: dict[str, Any] = {"results": 0, "refused": 0, "bytes": 0, "seconds": [], "errors": []}
        sock = socket.create_connection((target.host, target.port), timeout=120)
        try:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    size, ok = _fetch_one(raw, buffer, sock)
                except (OSError, RuntimeError) as exc:
                    tally["errors"].append(repr(exc))
                    sock.close()
                    sock = socket.create_connection((target.host, target.port), timeout=120)
                    continue
                tally["seconds"].append(time.perf_counter() - started)
                tally["bytes"] += size
                tally["results" if ok else "refused"] += 1
        finally:
            sock.close()
            results.append(tally)

    threads = [threading.Thread(target=agent) for _ in range(agents)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds_each = [s for r in results for s in r["seconds"]]
    return {
        "results": sum(r["results"] for r in results), "refused": sum(r["refused"] for r in results),
        "bytes": sum(r["bytes"] for r in results), "errors": [e for r in results for e in r["errors"]][:5],
        "call_p50_s": statistics.median(seconds_each) if seconds_each else float("nan"),
    }


# --- the gateway ------------------------------------------------------------------------------------


def _http(method: str, url: str, body: dict[str, Any] | None = None, secret: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {secret}"} if secret else {})}
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, None


@dataclass
class Gateway:
    process: stack.Process
    url: str
    token: str


@contextmanager
def gateway(fast_url: str, large_url: str, limit: int, workdir: Path, cores: Sequence[int] | None) -> Iterator[Gateway]:
    (workdir / "manifests").mkdir(parents=True)
    (workdir / "manifests" / "bench.yaml").write_text(MANIFESTS.format(fast_url=fast_url, large_url=large_url, limit=limit))
    port, admin_port, secret = stack.free_port(), stack.free_port(), secrets.token_urlsafe(24)
    argv = [*stack.pin_prefix(cores), stack.portcullis_executable(), "serve", "-f", str(workdir / "manifests"),
            "--state-dir", str(workdir / "state"), "--port", str(port), "--admin-port", str(admin_port)]
    log = workdir / "gateway.log"
    with open(os.devnull, "wb") as devnull, open(log, "wb") as errors:
        popen = subprocess.Popen(argv, stdout=devnull, stderr=errors, env={**os.environ, "PORTCULLIS_ADMIN_SECRET": secret})
    process = stack.Process(popen, argv)
    try:
        base, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
        deadline = time.monotonic() + stack.STARTUP_TIMEOUT
        while True:  # polling a readiness probe, bounded by the deadline
            if popen.poll() is not None:
                raise RuntimeError(f"portcullis serve exited ({popen.returncode}):\n{log.read_text()}")
            try:
                if _http("GET", base + "/readyz")[0] == 200:
                    break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway not ready within {stack.STARTUP_TIMEOUT} s:\n{log.read_text()}")
            time.sleep(0.05)
        status, answer = _http("POST", admin + "/v1/tokens", {"user": USER, "ttl": "1h"}, secret)
        if status != 201:
            raise RuntimeError(f"minting the benchmark token failed: HTTP {status} {answer}")
        yield Gateway(process, base + "/mcp", str(answer["token"]))
    finally:
        process.stop()


def status_kib(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {name} for pid {pid}")


class RssSampler:
    """VmRSS of one process every `interval` seconds, on a thread, until stopped."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid, self.interval, self.samples = pid, interval, list[int]()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.samples.append(status_kib(self.pid, "VmRSS"))
            except (OSError, RuntimeError):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)


# --- small calls -------------------------------------------------------------------------------------


def small_calls(url: str, token: str | None, agents: int, rate: float, seconds: float) -> tuple[list[float], int]:
    """Paced `echo` calls from `agents` keep-alive clients; (latencies in ms, failures)."""
    target = load.tool_call(url, "echo", {"text": "hello from another user"}, token=token)
    raw = target.raw()
    latencies: list[float] = []
    failures = [0]
    stop_at = time.monotonic() + seconds

    def agent(offset: float) -> None:
        client = load.KeepAliveClient(target.host, target.port, timeout=60)
        interval, next_at = 1.0 / rate, time.monotonic() + offset
        try:
            while next_at < stop_at:
                pause = next_at - time.monotonic()
                if pause > 0:
                    time.sleep(pause)  # pacing the load, not synchronizing
                ns, status, body = client.send(raw)
                latencies.append(ns / 1e6)
                if not load.call_succeeded(status, body):
                    failures[0] += 1
                next_at = max(next_at + interval, time.monotonic())  # a stalled call does not queue a burst
        finally:
            client.close()

    threads = [threading.Thread(target=agent, args=(i / (rate * agents),)) for i in range(agents)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, failures[0]


# --- scenarios -----------------------------------------------------------------------------------------


@dataclass
class Settings:
    seconds: float = 15.0
    result_bytes: int = 50_000_000
    large_agents: int = 6
    small_agents: int = 2
    small_rate: float = 100.0
    limits: list[int] = field(default_factory=lambda: [64 * MiB, DEFAULT_LIMIT])
    pin: bool = True
    parse_reps: int = 5

    @classmethod
    def quick(cls) -> Settings:
        return cls(seconds=3.0, result_bytes=20_000_000, large_agents=3, parse_reps=1, limits=[32 * MiB, 8 * MiB])


@dataclass
class Placement:
    gateway: list[int] | None
    rest: list[int] | None

    def describe(self) -> str:
        if self.gateway is None:
            return "not pinned"
        return f"gateway on core {self.gateway[0]}; upstreams, agents and this harness on core(s) {','.join(map(str, self.rest or []))}"


def placement(pin: bool) -> Placement:
    allowed = sorted(os.sched_getaffinity(0))
    if not pin or len(allowed) < 2 or shutil.which("taskset") is None:
        return Placement(None, None)
    return Placement([allowed[0]], allowed[1:])


def run_scenario(
    name: str, limit: int, large: bool, s: Settings, where: Placement, log: Callable[[str], None], *, chunked: bool = False
) -> dict[str, Any]:
    log(f"scenario {name}: maxResultBytes {limit}, large results {'on' if large else 'off'}")
    with tempfile.TemporaryDirectory(prefix="portcullis-large-") as tmp, \
            stack.upstream(where.rest) as (_, fast_url), large_upstream(where.rest, s.result_bytes, chunked) as (_, large_url), \
            gateway(fast_url, large_url, limit, Path(tmp), where.gateway) as gw:
        pid = gw.process.pid
        small_calls(gw.url, gw.token, 1, 200.0, 0.5)  # warm: pools, caches, the audit store
        started_kib = status_kib(pid, "VmRSS")
        cpu_before = load.cpu_seconds(pid)
        fetcher: subprocess.Popen[bytes] | None = None
        if large:
            argv = [*stack.pin_prefix(where.rest), sys.executable, __file__, "--role", "fetch", "--url", gw.url,
                    "--token", gw.token, "--agents", str(s.large_agents), "--seconds", str(s.seconds)]
            fetcher = subprocess.Popen(argv, stdout=subprocess.PIPE)
        direct: list[tuple[list[float], int]] = []  # the same calls straight to the fast upstream: what is not the gateway
        control = threading.Thread(target=lambda: direct.append(small_calls(fast_url, None, 1, s.small_rate, s.seconds)))
        with RssSampler(pid) as sampler:
            control.start()
            latencies, failures = small_calls(gw.url, gw.token, s.small_agents, s.small_rate, s.seconds)
            control.join()
            fetched: dict[str, Any] = {}
            if fetcher is not None:
                out, _ = fetcher.communicate(timeout=s.seconds + 180)
                fetched = json.loads(out)
        cpu = load.cpu_seconds(pid) - cpu_before
        peak_kib = status_kib(pid, "VmHWM")
        time.sleep(3.0)  # let the gateway go idle before reading what it kept
        after_kib = status_kib(pid, "VmRSS")
    row = {
        "scenario": name, "limit": limit, "large": large, "small_calls": len(latencies), "small_failures": failures,
        "p50_ms": load.percentile(latencies, 50), "p99_ms": load.percentile(latencies, 99), "max_ms": max(latencies),
        "over_100ms": sum(1 for v in latencies if v > 100), "rss_start_mib": started_kib / 1024,
        "direct_p50_ms": load.percentile(direct[0][0], 50), "direct_p99_ms": load.percentile(direct[0][0], 99),
        "rss_sampled_peak_mib": max(sampler.samples, default=started_kib) / 1024, "rss_peak_mib": peak_kib / 1024,
        "rss_after_mib": after_kib / 1024, "gateway_cpu_s": cpu, **{f"large_{k}": v for k, v in fetched.items()},
    }
    log(f"  small calls {row['small_calls']} (failures {failures}): p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, "
        f"max {row['max_ms']:.0f} ms; RSS {row['rss_start_mib']:.0f} -> peak {row['rss_peak_mib']:.0f} -> {row['rss_after_mib']:.0f} MiB"
        + (f"; large: {fetched.get('results')} relayed, {fetched.get('refused')} refused, errors {fetched.get('errors')}" if large else ""))
    return row


# --- in process: parsing on and off the loop, and the way out --------------------------------------------


def result_message(shape: str, size: int) -> bytes:
    """An upstream's tools/call response of about `size` bytes: one text, or many small text items."""
    if shape == "one text":
        prefix, chunk, suffix, chunks = large_result_pieces(1, size)
        return prefix + chunk * chunks + suffix
    item = {"type": "text", "text": "line of a mailbox export, with some words in it"}
    count = size // len(json.dumps(item, separators=(",", ":")))
    return json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"content": [item] * count, "isError": False}}, separators=(",", ":")).encode()


async def _stall_while(parse: Callable[[], Any]) -> tuple[float, float]:
    """(parse ms, worst lateness ms of a 1 ms ticker on the same loop while it ran)."""
    worst = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - before - 0.001)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    started = time.perf_counter()
    result = parse()
    if asyncio.iscoroutine(result):
        await result
    took = time.perf_counter() - started
    await asyncio.sleep(0.01)
    done.set()
    await task
    return took * 1000, worst * 1000


def measure_parsing(s: Settings, log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = []
    for shape, size in (("one text", DEFAULT_LIMIT), ("many items", DEFAULT_LIMIT), ("one text", s.result_bytes)):
        data = result_message(shape, size)
        for how in ("inline", "to_thread"):
            figures = []
            for _ in range(s.parse_reps):
                call = (lambda: json.loads(data)) if how == "inline" else (lambda: asyncio.to_thread(json.loads, data))
                figures.append(asyncio.run(_stall_while(call)))
            row = {"shape": shape, "bytes": len(data), "how": how,
                   "parse_ms": statistics.median(f[0] for f in figures), "stall_ms": statistics.median(f[1] for f in figures)}
            log(f"  parse {shape} {len(data) / MiB:.0f} MiB {how}: {row['parse_ms']:.0f} ms, loop stalled {row['stall_ms']:.0f} ms")
            rows.append(row)
    return rows


def measure_way_out(s: Settings, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Each step a relayed result takes on the gateway's event loop, timed on its own."""
    from mcp_types import methods

    from portcullis.gateway.audit.keys import canonical_json
    from portcullis.gateway.core import complete_tool_result, relay_result

    rows = []
    key = b"k" * 32
    for shape, size in (("one text", DEFAULT_LIMIT), ("many items", DEFAULT_LIMIT), ("one text", s.result_bytes)):
        data = result_message(shape, size)
        steps: dict[str, list[float]] = {}

        def timed(step: str, fn: Callable[[], Any]) -> Any:
            started = time.perf_counter()
            value = fn()
            steps.setdefault(step, []).append((time.perf_counter() - started) * 1000)
            return value

        for _ in range(s.parse_reps):
            message = timed("parse the upstream's answer (json.loads)", lambda: json.loads(data))
            relayed = timed("relay_result (drop identity _meta)", lambda: relay_result(message["result"]))
            timed("audit digest (canonical JSON + HMAC)", lambda: hmac.new(key, canonical_json(relayed), hashlib.sha256).hexdigest())
            shaped = timed("SDK result shaping (serialize_server_result)",
                           lambda: methods.serialize_server_result("tools/call", "2026-07-28", complete_tool_result(relayed)))
            timed("serialize the answer (json.dumps + encode)",
                  lambda: json.dumps({"jsonrpc": "2.0", "id": 1, "result": shaped}, separators=(",", ":")).encode())
        for step, values in steps.items():
            rows.append({"shape": shape, "bytes": len(data), "step": step, "ms": statistics.median(values)})
            log(f"  way out {shape} {len(data) / MiB:.0f} MiB: {step}: {statistics.median(values):.0f} ms")
    return rows


# --- report --------------------------------------------------------------------------------------------------


def _git_state() -> str:
    try:
        head = subprocess.run(["git", "-C", str(stack.REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(stack.REPO), "status", "--porcelain", "--", "operator"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + (" + uncommitted changes in operator/" if dirty.stdout.strip() else "")


def render(s: Settings, where: Placement, scenarios: list[dict[str, Any]], parsing: list[dict[str, Any]], way_out: list[dict[str, Any]]) -> str:
    out = [
        "## Large tool results: other users' latency and the gateway's memory",
        "",
        f"Gateway source: {_git_state()}. Machine: {os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}. "
        f"Placement: {where.describe()}. Load average at the start: {' '.join(f'{v:.2f}' for v in LOAD_AT_START)} "
        "(other work on the machine shows up in every row alike; compare rows, and the direct column).",
        f"Command: `.venv/bin/python benchmarks/large_results.py {' '.join(sys.argv[1:])}`".rstrip() + ".",
        f"Each scenario: a fresh `portcullis serve`; {s.small_agents} other users making paced `echo` calls "
        f"({s.small_rate:.0f}/s each, raw keep-alive sockets) to the fast upstream for {s.seconds:.0f} s, while "
        f"{s.large_agents} agents fetch {s.result_bytes / 1e6:.0f} MB results back to back from the large upstream "
        "(2026-07-28 wire, the gateway's fast path). RSS: start after warm-up, peak = VmHWM, after = 3 s after the load stopped.",
        "",
        "| scenario | maxResultBytes | other users' calls | p50 ms | p99 ms | max ms | calls > 100 ms | same calls direct p50 / p99 ms | "
        "large results relayed / refused | gateway CPU s | RSS start MiB | RSS peak MiB | RSS after MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in scenarios:
        large = f"{r.get('large_results', 0)} / {r.get('large_refused', 0)}" if r["large"] else "—"
        out.append(
            f"| {r['scenario']} | {r['limit']:,} | {r['small_calls']:,} ({r['small_failures']} failed) | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['max_ms']:.0f} | {r['over_100ms']} | {r['direct_p50_ms']:.2f} / {r['direct_p99_ms']:.2f} | {large} | "
            f"{r['gateway_cpu_s']:.1f} | {r['rss_start_mib']:.0f} | "
            f"{r['rss_peak_mib']:.0f} | {r['rss_after_mib']:.0f} |"
        )
    out += [
        "",
        "### Parsing one upstream answer: inline on the loop, or in a thread",
        "",
        f"Median of {s.parse_reps}; stall = worst lateness of a 1 ms ticker on the same event loop while the answer was parsed.",
        "",
        "| answer | MiB | how | parse ms | loop stalled ms |",
        "|---|---:|---|---:|---:|",
    ]
    out += [f"| {r['shape']} | {r['bytes'] / MiB:.0f} | {r['how']} | {r['parse_ms']:.0f} | {r['stall_ms']:.0f} |" for r in parsing]
    out += [
        "",
        "### The way out: each step a relayed result takes on the event loop",
        "",
        "| answer | MiB | step | ms |",
        "|---|---:|---|---:|",
    ]
    out += [f"| {r['shape']} | {r['bytes'] / MiB:.0f} | {r['step']} | {r['ms']:.0f} |" for r in way_out]
    return "\n".join(out) + "\n"


LOAD_AT_START: tuple[float, float, float] = (0.0, 0.0, 0.0)


def run(s: Settings, log: Callable[[str], None]) -> tuple[Placement, list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    global LOAD_AT_START
    LOAD_AT_START = os.getloadavg()
    where = placement(s.pin)
    log(f"placement: {where.describe()}")
    scenarios = [run_scenario("baseline: no large results", DEFAULT_LIMIT, False, s, where, log)]
    for limit in s.limits:
        if limit > s.result_bytes + 1024:
            scenarios.append(run_scenario("large results flow", limit, True, s, where, log))
        else:
            scenarios.append(run_scenario("large results refused unread (Content-Length over the limit)", limit, True, s, where, log))
            scenarios.append(run_scenario("large results refused while read (chunked, cut at the limit)", limit, True, s, where, log,
                                          chunked=True))
    if where.rest:
        os.sched_setaffinity(0, where.rest)  # the in-process figures, off the gateway's core
    log("parsing on and off the loop")
    parsing = measure_parsing(s, log)
    log("the way out")
    way_out = measure_way_out(s, log)
    return where, scenarios, parsing, way_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=("harness", "large-upstream", "fetch"), default="harness", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--agents", type=int, default=6, help=argparse.SUPPRESS)
    parser.add_argument("--chunked", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 s scenarios, 20 MB results, limits 32 and 8 MiB")
    parser.add_argument("--seconds", type=float, help="duration of each scenario (default 15)")
    parser.add_argument("--result-bytes", type=int, help="size of each large result's text (default 50,000,000)")
    parser.add_argument("--large-agents", type=int, help="agents fetching large results at once (default 6)")
    parser.add_argument("--max-result-bytes", type=int, nargs="+", metavar="N",
                        help="maxResultBytes of the large connection, one scenario each (default 67108864 16777216)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--out", type=Path, help=f"write the Markdown report here (a full run: {RESULTS.relative_to(stack.REPO)})")
    parser.add_argument("--json", type=Path, help="also write every figure as JSON here")
    args = parser.parse_args(argv)

    if args.role == "large-upstream":
        asyncio.run(_serve_large(0, args.result_bytes, args.chunked))
        return 0
    if args.role == "fetch":
        print(json.dumps(fetch_large(args.url, args.token, args.agents, args.seconds)), flush=True)
        return 0

    s = Settings.quick() if args.quick else Settings()
    s.pin = not args.no_pin
    if args.seconds is not None:
        s.seconds = args.seconds
    if args.result_bytes is not None:
        s.result_bytes = args.result_bytes
    if args.large_agents is not None:
        s.large_agents = args.large_agents
    if args.max_result_bytes:
        s.limits = args.max_result_bytes

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    where, scenarios, parsing, way_out = run(s, log)
    report = render(s, where, scenarios, parsing, way_out)
    print(report)
    out = args.out or (None if args.quick else RESULTS)
    if out is not None:
        out.write_text(report)
    if args.json:
        args.json.write_text(json.dumps({"settings": asdict(s), "scenarios": scenarios, "parsing": parsing, "way_out": way_out}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
