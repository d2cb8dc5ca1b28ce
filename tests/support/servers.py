"""Running servers under test on loopback, with bounded waits and clean shutdown.

Tests need real HTTP between a real MCP client and a real server (that is what
the gateway is about), so a server under test is a uvicorn instance on
127.0.0.1, port 0, in a background thread with its own event loop. A thread,
rather than a task in the test's loop, keeps the server independent of how the
test drives its client (sync, anyio, the TypeScript client in a subprocess) and
lets a blocking subprocess call in the test not starve the server.

Every wait here is bounded and every exit path stops what it started: a server
that does not come up, or does not go down, fails the test loudly instead of
hanging the suite or leaking a thread into the next test.

Scripts (`python examples/inbox/server.py --port 0`) are run with `run_script`,
which reads the one line the script prints when it is ready.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import uvicorn

REPO_ROOT = Path(__file__).resolve().parents[2]

STARTUP_TIMEOUT = 10.0
SHUTDOWN_TIMEOUT = 10.0
# How long uvicorn lets open connections (SSE streams, idle keep-alives) finish
# before it cancels them; a gateway test that leaves a stream open must not stall
# teardown for longer than this.
GRACEFUL_SHUTDOWN_SECONDS = 2


class ServerStartError(RuntimeError):
    """The server did not come up within the bounded wait."""


@dataclass(frozen=True)
class RunningServer:
    """A server bound on loopback: its base URL (no path) and port."""

    host: str
    port: int

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str = "/mcp") -> str:
        return f"{self.base_url}{path}"


class _ThreadedServer(uvicorn.Server):
    """uvicorn.Server that records a startup failure instead of exiting the process."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.failure: BaseException | None = None

    def run_in_thread(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # noqa: BLE001 - reported to the waiting test thread
            self.failure = exc


def _bound_port(server: uvicorn.Server) -> int:
    for listener in server.servers:
        for sock in listener.sockets:
            port = sock.getsockname()[1]
            if isinstance(port, int):
                return port
    raise ServerStartError("uvicorn started but has no bound socket")


@contextmanager
def serve_asgi(app: Any, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[RunningServer]:
    """Serve an ASGI app on `host`:`port` (0: any free port) until the block exits."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        lifespan="on",
        ws="none",  # no websockets: nothing here needs them, and their import warns
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        access_log=False,
    )
    server = _ThreadedServer(config)
    thread = threading.Thread(target=server.run_in_thread, name=f"uvicorn-{host}:{port}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not server.started:
            if server.failure is not None or not thread.is_alive():
                raise ServerStartError(f"server thread ended during startup: {server.failure!r}")
            if time.monotonic() > deadline:
                raise ServerStartError(f"server did not start within {STARTUP_TIMEOUT}s")
            thread.join(0.01)
        yield RunningServer(host=host, port=_bound_port(server))
    finally:
        server.should_exit = True
        thread.join(SHUTDOWN_TIMEOUT)
        if thread.is_alive():
            # Second request: uvicorn then cancels whatever is still running.
            server.force_exit = True
            thread.join(SHUTDOWN_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError(f"server thread {thread.name} did not stop within {2 * SHUTDOWN_TIMEOUT}s")


@contextmanager
def run_asgi(app: Any, *, host: str = "127.0.0.1", path: str = "/mcp") -> Iterator[str]:
    """Serve `app` on loopback; yields the endpoint URL (`http://127.0.0.1:PORT/mcp`)."""
    with serve_asgi(app, host=host) as running:
        yield running.url(path)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for processes that cannot report their own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
        assert isinstance(port, int)
        return port


READY_URL_RE = re.compile(r"(https?://[^\s]+)")


@dataclass
class RunningScript:
    process: subprocess.Popen[str]
    ready_line: str

    @property
    def url(self) -> str:
        match = READY_URL_RE.search(self.ready_line)
        if match is None:
            raise ValueError(f"no URL in ready line {self.ready_line!r}")
        return match.group(1)


def stop(process: subprocess.Popen[Any], timeout: float = SHUTDOWN_TIMEOUT) -> None:
    """End a child process: SIGTERM, then SIGKILL if it has not exited within `timeout`."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def _read_line(stream: IO[str], timeout: float) -> str | None:
    """Read one line with a deadline (a reader thread, since pipes have no timeout)."""
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return box[0] if box else None


@contextmanager
def run_script(argv: Sequence[str], *, ready_timeout: float = 20.0, env: dict[str, str] | None = None) -> Iterator[RunningScript]:
    """Start `python <argv...>` from the repository root; yield once it printed its ready line.

    The process is terminated (then killed) on exit; its stderr is shown if it
    dies before it is ready.
    """
    process = subprocess.Popen(
        [sys.executable, *argv],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        assert process.stdout is not None
        line = _read_line(process.stdout, ready_timeout)
        if not line:
            process.kill()
            _, err = process.communicate(timeout=SHUTDOWN_TIMEOUT)
            raise ServerStartError(f"{argv} printed no ready line within {ready_timeout}s; stderr:\n{err}")
        yield RunningScript(process=process, ready_line=line.strip())
    finally:
        stop(process)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def load_example(relative_path: str, module_name: str | None = None) -> ModuleType:
    """Import an example server by path (`examples/inbox/server.py`), as the CLI does.

    The module is registered in `sys.modules` under a stable name so repeated
    loads in one test session return the same module (and its classes compare
    equal across tests).
    """
    path = REPO_ROOT / relative_path
    name = module_name or "portcullis_example_" + "_".join(Path(relative_path).with_suffix("").parts[1:])
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@dataclass
class ServedCommand:
    """A `portcullis serve` process: its URLs, and its stdout lines (the audit JSON lines) as they come."""

    mcp: str
    admin: str
    stdout: list[str]


@contextmanager
def portcullis_serve(*manifests: Path | str, state_dir: Path, ready_timeout: float = 30.0) -> Iterator[ServedCommand]:
    """Run `portcullis serve` as a user does (ports picked by the kernel); stop it on exit."""
    files = [arg for path in manifests for arg in ("-f", str(path))]
    process = subprocess.Popen(
        [sys.executable, "-m", "portcullis.cli", "serve", *files, "--port", "0", "--admin-port", "0", "--state-dir", str(state_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )
    assert process.stdout is not None and process.stderr is not None
    banner: queue.Queue[str] = queue.Queue()
    served_stdout: list[str] = []
    stderr, stdout = process.stderr, process.stdout
    threading.Thread(target=lambda: [banner.put(line) for line in stderr], daemon=True).start()
    threading.Thread(target=lambda: [served_stdout.append(line) for line in stdout], daemon=True).start()
    urls: dict[str, str] = {}
    try:
        while "admin" not in urls:
            line = banner.get(timeout=ready_timeout)
            if "MCP URL:" in line:
                urls["mcp"] = line.split("MCP URL:")[1].strip()
            if "admin API:" in line:
                urls["admin"] = line.split("admin API:")[1].strip()
        yield ServedCommand(urls["mcp"], urls["admin"], served_stdout)
    finally:
        process.terminate()
        process.wait(timeout=SHUTDOWN_TIMEOUT * 3)
