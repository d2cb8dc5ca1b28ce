"""The processes of a gateway benchmark: the fast upstream and `portcullis serve`.

Each runs in its own process so that neither shares an interpreter (or a GIL)
with the load generator, and each can be pinned to a core of its own. The
gateway is started exactly as a user starts it (`portcullis serve -f ...`),
with its audit lines (stdout, by design) sent to /dev/null so that a terminal
or a pipe does not become part of the measurement.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
USER = "bench-user@example.com"
CONNECTION = "fast"
UPSTREAM_SECRET = "bench-upstream-token"
STARTUP_TIMEOUT = 30.0

MANIFESTS = """\
apiVersion: portcullis.dev/v1alpha1
kind: MCPConnection
metadata: {{name: {connection}, namespace: bench}}
spec:
  url: {upstream_url}
  timeoutSeconds: 10
  credential: {credential}
---
apiVersion: portcullis.dev/v1alpha1
kind: VirtualMCPServer
metadata: {{name: bench, namespace: bench}}
spec:
  sessionTokens: {{defaultTTL: 1h, maxTTL: 2h}}
---
apiVersion: portcullis.dev/v1alpha1
kind: ToolMapping
metadata: {{name: bench-{connection}, namespace: bench}}
spec:
  serverRef: {{name: bench}}
  connectionRef: {{name: {connection}}}
  tools:
    - name: echo
    - name: add
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pin_prefix(cores: Sequence[int] | None) -> list[str]:
    """`taskset -c N` when pinning was asked for and taskset exists."""
    if not cores:
        return []
    taskset = shutil.which("taskset")
    if taskset is None:
        raise RuntimeError("pinning asked for, but taskset is not installed (apt-get install util-linux), or pass --no-pin")
    return [taskset, "-c", ",".join(str(c) for c in cores)]


@dataclass
class Process:
    popen: subprocess.Popen[bytes]
    argv: list[str]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


def _read_line(popen: subprocess.Popen[bytes], timeout: float) -> str:
    assert popen.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(popen.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError(f"no ready line within {timeout} s")
    return popen.stdout.readline().decode().strip()


@contextmanager
def upstream(cores: Sequence[int] | None = None, *, uvloop: bool = True) -> Iterator[tuple[Process, str]]:
    """The fast upstream in its own process; yields (process, URL)."""
    argv = [*pin_prefix(cores), sys.executable, str(BENCH_DIR / "fast_upstream.py"), "--port", "0"]
    if not uvloop:
        argv.append("--no-uvloop")
    popen = subprocess.Popen(argv, stdout=subprocess.PIPE)
    process = Process(popen, argv)
    try:
        line = _read_line(popen, STARTUP_TIMEOUT)
        if "ready at " not in line:
            raise RuntimeError(f"fast upstream did not start: {line!r}")
        url = line.split("ready at ", 1)[1].split()[0]
        yield process, url
    finally:
        process.stop()
        if popen.stdout is not None:
            popen.stdout.close()


@contextmanager
def sdk_upstream(cores: Sequence[int] | None = None) -> Iterator[tuple[Process, str]]:
    """The MCP SDK `MCPServer` upstream (sdk_upstream.py) in its own process; yields (process, URL)."""
    argv = [*pin_prefix(cores), sys.executable, str(BENCH_DIR / "sdk_upstream.py"), "--port", "0"]
    popen = subprocess.Popen(argv, stdout=subprocess.PIPE)
    process = Process(popen, argv)
    try:
        line = _read_line(popen, STARTUP_TIMEOUT)
        if not line.startswith("ready "):
            raise RuntimeError(f"SDK upstream did not start: {line!r}")
        yield process, line.split()[1]
    finally:
        process.stop()
        if popen.stdout is not None:
            popen.stdout.close()


GATEWAY_EXECUTABLE: str | None = None  # another `portcullis` to benchmark (the harness's --gateway-executable)


def portcullis_executable() -> str:
    if GATEWAY_EXECUTABLE:
        return GATEWAY_EXECUTABLE
    beside = Path(sys.executable).parent / "portcullis"
    found = str(beside) if beside.exists() else shutil.which("portcullis")
    if found is None:
        raise RuntimeError("the `portcullis` command is not installed (pip install -e .)")
    return found


@dataclass
class Gateway:
    process: Process
    url: str
    admin_url: str
    admin_secret: str
    token: str
    log: Path
    state: Path | None = None
    """The gateway's --state-dir (its SQLite audit store is `<state>/audit/audit.db`)."""

    @property
    def pid(self) -> int:
        return self.process.pid


def _http(method: str, url: str, body: dict[str, Any] | None = None, secret: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if secret:
        headers["Authorization"] = f"Bearer {secret}"
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, json.loads(raw) if raw else None


def _wait_ready(url: str, process: Process, log: Path, timeout: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"portcullis serve exited ({process.popen.returncode}):\n{log.read_text()}")
        try:
            status, _ = _http("GET", url)
            if status == 200:
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.05)  # polling a readiness probe, bounded by the deadline above
    raise TimeoutError(f"gateway not ready within {timeout} s:\n{log.read_text()}")


USER_CREDENTIAL = "{source: user, header: Authorization, scheme: Bearer}"
NO_CREDENTIAL = "{source: none}"


def manifests_text(upstream_url: str, *, audit: dict[str, Any] | None = None, extra: str = "", credentials: bool = True) -> str:
    """The benchmark's manifests; `audit` becomes the VirtualMCPServer's `spec.audit` (omitted: the
    default, SQLite), `extra` is appended as more YAML documents (e.g. the `v1/Secret` a postgres store names).
    `credentials` False makes the connection `source: none` (no per-user credential to resolve)."""
    text = MANIFESTS.format(connection=CONNECTION, upstream_url=upstream_url,
                            credential=USER_CREDENTIAL if credentials else NO_CREDENTIAL)
    if audit is not None:
        anchor = "  sessionTokens: {defaultTTL: 1h, maxTTL: 2h}\n"
        assert anchor in text
        text = text.replace(anchor, anchor + f"  audit: {json.dumps(audit)}\n", 1)
    if extra.strip():
        text += "---\n" + extra.strip("\n") + "\n"
    return text


@contextmanager
def gateway(
    upstream_url: str, workdir: Path, cores: Sequence[int] | None = None, *,
    audit: dict[str, Any] | None = None, extra_manifests: str = "", credentials: bool = True,
    executable: str | None = None, startup_timeout: float | None = None,
) -> Iterator[Gateway]:
    """`portcullis serve` in front of `upstream_url`, with a credential stored and a token minted.

    `audit` is `spec.audit` of the VirtualMCPServer (None: not set, so the default store, SQLite);
    `extra_manifests` is more YAML placed beside the benchmark's manifests; `credentials` False
    serves the connection with `source: none` (nothing stored, nothing resolved per call).
    `executable` runs another `portcullis` than `portcullis_executable()`; `startup_timeout`
    waits longer than STARTUP_TIMEOUT for readiness (a gateway under valgrind).
    """
    manifests = workdir / "manifests"
    manifests.mkdir(parents=True, exist_ok=True)
    (manifests / "bench.yaml").write_text(manifests_text(upstream_url, audit=audit, extra=extra_manifests, credentials=credentials))
    state = workdir / "state"
    port, admin_port = free_port(), free_port()
    secret = secrets.token_urlsafe(24)
    argv = [*pin_prefix(cores), executable or portcullis_executable(), "serve", "-f", str(manifests), "--state-dir", str(state),
            "--port", str(port), "--admin-port", str(admin_port)]
    log = workdir / "gateway.log"
    env = {**os.environ, "PORTCULLIS_ADMIN_SECRET": secret}
    with open(os.devnull, "wb") as devnull, open(log, "wb") as errors:
        popen = subprocess.Popen(argv, stdout=devnull, stderr=errors, env=env)
    process = Process(popen, argv)
    try:
        base, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
        _wait_ready(base + "/readyz", process, log, startup_timeout or STARTUP_TIMEOUT)
        if credentials:
            status, answer = _http("PUT", f"{admin}/v1/users/{USER}/connections/{CONNECTION}", {"secret": UPSTREAM_SECRET}, secret)
            if status >= 300:
                raise RuntimeError(f"storing the benchmark credential failed: HTTP {status} {answer}")
        status, answer = _http("POST", f"{admin}/v1/tokens", {"user": USER, "ttl": "1h"}, secret)
        if status != 201:
            raise RuntimeError(f"minting the benchmark token failed: HTTP {status} {answer}")
        yield Gateway(process, base + "/mcp", admin, secret, str(answer["token"]), log, state)
    finally:
        process.stop()
