"""mcp-remote, the stdio bridge Claude Desktop users put in front of a remote MCP server, run headless.

`mcp_remote_session(url, provider, login="ada")` starts mcp-remote (npm, pinned in package.json)
against `url` with OAuth and nothing else (no `--header`): on the server's 401 it discovers the
RFC 9728 metadata, registers itself at the authorization server it names (RFC 7591), and opens
the authorization URL in "the browser". Here the browser is a stand-in that hands the URL to the
test; a thread playing the user then consents at the provider as `login` (`Provider.consent`,
plain HTTP) and sends the resulting redirect to mcp-remote's own loopback callback server, as a
browser would. mcp-remote exchanges the code (PKCE, RFC 8707 resource = `url`) and connects. The
session then speaks JSON-RPC lines over mcp-remote's stdin and stdout, as an MCP host does:
`initialize` on entry, then `session.request("tools/call", {...})`.

How the browser is replaced. mcp-remote opens URLs with the `open` npm package (10.x). On Linux
`open` does not run the `xdg-open` on PATH: it runs the copy of freedesktop's `xdg-open` script it
ships (node_modules/open/xdg-open). With no desktop in the environment (no DISPLAY,
XDG_CURRENT_DESKTOP, ...) that script takes its generic path, which runs `$BROWSER <url>`. So
`BROWSER` names the stand-in, a small Python script that sends the URL over a Unix socket to the
test. The same script is also put first on PATH as `xdg-open`, `x-www-browser`,
`sensible-browser`, `www-browser` and `gio`, the names mcp-remote and xdg-open fall back to
(mcp-remote's own `xdg-open` fallback is /usr/bin/xdg-open, an absolute path, which this machine
does not have). Each URL the stand-in got is in `session.opened`, with the name it was run as.

Isolation. mcp-remote keeps its client registration and tokens in `MCP_REMOTE_CONFIG_DIR` (its
default is ~/.mcp-auth), here a temporary directory per session (also its HOME), so a session
always starts signed out and leaves nothing behind. The callback port is a free one passed on
the command line: otherwise mcp-remote derives it from the server URL and treats another
instance on that port as a sibling whose sign-in it waits for.

Protocol. mcp-remote 0.15.1 bundles a TypeScript SDK whose LATEST_PROTOCOL_VERSION is
2025-11-25. In its default `--protocol legacy` mode it relays the host's own `initialize` (this
helper sends 2025-11-25, `protocol_version=` changes it), so the server sees the session protocol
with whatever version the host asked for; before that, its connection test (a client of its own)
initializes with 2025-11-25. `mode="auto"` passes `--protocol auto`, where mcp-remote negotiates
the 2026-07-28 protocol with the server (`server/discover`) and translates for the host.

Note that mcp-remote treats a token that expires within 60 s as expired: with a provider's
default 60 s access tokens it refreshes before every request.

Without Node or mcp-remote (`npm ci` not run) the tests that need it are skipped, with the
reason, except under CI, where that is a failure (`oauth_provider.unavailable`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx2

from tests.support.foreign import node
from tests.support.oauth_provider import Provider
from tests.support.servers import REPO_ROOT, SHUTDOWN_TIMEOUT, free_port, stop

MCP_REMOTE_VERSION = "0.15.1"
MCP_REMOTE = REPO_ROOT / "node_modules" / "mcp-remote"
PROXY_SCRIPT = MCP_REMOTE / "dist" / "proxy.js"

PROTOCOL_VERSION = "2025-11-25"
# Connecting includes the whole sign-in: discovery, registration, consent, the code exchange.
CONNECT_TIMEOUT = 30.0
REQUEST_TIMEOUT = 15.0
HTTP_TIMEOUT = 10.0
# How long mcp-remote waits for the authorization code (its --auth-timeout, seconds).
AUTH_TIMEOUT_SECONDS = 30
# The names the stand-in browser answers to, first on PATH (see the module docstring).
BROWSER_NAMES = ("xdg-open", "x-www-browser", "sensible-browser", "www-browser", "gio")

BROWSER_SCRIPT = """\
#!{python} -IS
# A stand-in browser for tests/support/mcp_remote.py: sends "<name>\\t<url>" to the test.
import os, socket, sys
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as test:
    test.settimeout(5)
    test.connect({socket_path!r})
    test.sendall((os.path.basename(sys.argv[0]) + "\\t" + sys.argv[-1] + "\\n").encode())
"""


class McpRemoteError(RuntimeError):
    """mcp-remote exited, or did not answer in time; the message carries its stderr."""


class JsonRpcError(Exception):
    """A JSON-RPC error response to a request."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.code = error.get("code")
        self.message = str(error.get("message"))
        self.data = error.get("data")


def mcp_remote_missing() -> str | None:
    """Why mcp-remote cannot run here, or None."""
    if node() is None:
        return "node is not installed: run `npm ci` at the repository root (package.json pins a Node runtime)"
    manifest = MCP_REMOTE / "package.json"
    if not manifest.is_file() or not PROXY_SCRIPT.is_file():
        return "mcp-remote is not installed: run `npm ci` at the repository root"
    version = json.loads(manifest.read_text()).get("version")
    if version != MCP_REMOTE_VERSION:
        return f"mcp-remote {version} is installed, the tests were written for {MCP_REMOTE_VERSION}: run `npm ci`"
    return None


# --- the browser ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Opened:
    """One URL the stand-in browser was asked to open, and the name it was run as."""

    name: str
    url: str


class HeadlessBrowser:
    """Stand-in browsers in `directory`/bin and the Unix socket they report to.

    Every URL they are asked to open goes to `visit` (called in this object's thread, one URL at
    a time); what `visit` raises is kept in `errors`, and then `on_error` is called.
    """

    on_error: Callable[[], None] | None = None

    def __init__(self, directory: Path, visit: Callable[[str], None]) -> None:
        self.bin = directory / "bin"
        self.bin.mkdir()
        self._socket_path = str(directory / "browser.sock")
        self._visit = visit
        self.opened: list[Opened] = []
        self.errors: list[BaseException] = []
        self._stopping = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self._socket_path)
        self._listener.listen(8)
        script = self.bin / "browser"
        script.write_text(BROWSER_SCRIPT.format(python=sys.executable, socket_path=self._socket_path))
        script.chmod(0o755)
        for name in BROWSER_NAMES:
            (self.bin / name).symlink_to(script.name)
        self._thread = threading.Thread(target=self._serve, name="headless-browser", daemon=True)
        self._thread.start()

    def env(self) -> dict[str, str]:
        """The environment entries that route "open the browser" here."""
        return {"BROWSER": str(self.bin / "browser"), "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"}

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
                with connection:
                    if self._stopping.is_set():
                        return
                    connection.settimeout(HTTP_TIMEOUT)
                    line = connection.makefile("r", encoding="utf-8").readline().rstrip("\n")
            except OSError as error:
                self._failed(error)
                return
            name, _, url = line.partition("\t")
            opened = Opened(name, url)
            self.opened.append(opened)
            try:
                self._visit(opened.url)
            except Exception as error:  # noqa: BLE001 - reported by the session
                self._failed(error)

    def _failed(self, error: BaseException) -> None:
        self.errors.append(error)
        if self.on_error is not None:
            self.on_error()

    def close(self) -> None:
        self._stopping.set()
        # Wake the accept() with a connection of our own; the loop then sees it is stopping.
        if self._thread.is_alive():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as wake:
                wake.connect(self._socket_path)
        self._thread.join(SHUTDOWN_TIMEOUT)
        self._listener.close()


# --- mcp-remote over stdio -----------------------------------------------------------------


@dataclass
class McpRemoteSession:
    """A running mcp-remote, initialized: JSON-RPC over its stdin and stdout."""

    process: subprocess.Popen[str]
    config_dir: Path
    browser: HeadlessBrowser
    initialize_result: dict[str, Any] = field(default_factory=dict)
    stderr: list[str] = field(default_factory=list, repr=False)
    """mcp-remote's log lines so far."""
    notifications: list[dict[str, Any]] = field(default_factory=list, repr=False)
    """Notifications mcp-remote relayed from the server, in order."""
    _responses: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)
    _arrived: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _writing: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _closed: bool = field(default=False, repr=False)
    _next_id: int = field(default=1, repr=False)

    @property
    def opened(self) -> list[Opened]:
        """The URLs mcp-remote opened in the browser (each authorization it started)."""
        return list(self.browser.opened)

    @property
    def protocol_version(self) -> str:
        """The protocol version the server answered `initialize` with."""
        return str(self.initialize_result["protocolVersion"])

    def request(self, method: str, params: dict[str, Any] | None = None, *, timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
        """Send a request; its result. A JSON-RPC error is raised as `JsonRpcError`."""
        request_id = self._next_id
        self._next_id += 1
        self._send({"jsonrpc": "2.0", "id": request_id, "method": method, **({"params": params} if params is not None else {})})
        with self._arrived:
            # The browser thread's failure wakes this too (see _wake): no point waiting
            # for mcp-remote's own auth timeout when the sign-in already went wrong.
            answered = self._arrived.wait_for(lambda: request_id in self._responses or self._closed or bool(self.browser.errors), timeout)
            if request_id in self._responses:
                response = self._responses.pop(request_id)
            elif not answered:
                raise McpRemoteError(f"no answer to {method} within {timeout}s{self._diagnostics()}")
            elif self.browser.errors:
                raise McpRemoteError(f"the sign-in failed while waiting for {method}{self._diagnostics()}")
            else:
                raise McpRemoteError(f"mcp-remote closed its stdout before answering {method}{self._diagnostics()}")
        if "error" in response:
            raise JsonRpcError(response["error"])
        result: dict[str, Any] = response["result"]
        return result

    def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        self._send({"jsonrpc": "2.0", "method": method, **({"params": params} if params is not None else {})})

    def _send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        try:
            with self._writing:  # the reader thread answers server requests concurrently
                self.process.stdin.write(json.dumps(message) + "\n")
                self.process.stdin.flush()
        except (BrokenPipeError, ValueError) as error:
            raise McpRemoteError(f"mcp-remote is not running (exit code {self.process.poll()}){self._diagnostics()}") from error

    def _read(self, stdout: IO[str]) -> None:
        """The stdout reader thread: responses by id, server requests answered, notifications kept."""
        for line in stdout:
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                self.stderr.append(f"(not JSON on stdout) {line}")
                continue
            if "method" in message and "id" in message:
                # A request from the server: answer ping, refuse the rest (this host has no
                # roots, sampling or elicitation).
                if message["method"] == "ping":
                    answer: dict[str, Any] = {"result": {}}
                else:
                    answer = {"error": {"code": -32601, "message": "not supported by this test host"}}
                try:
                    self._send({"jsonrpc": "2.0", "id": message["id"], **answer})
                except McpRemoteError:
                    pass  # mcp-remote is gone: its stdout ends next
            elif "method" in message:
                self.notifications.append(message)
            else:
                with self._arrived:
                    self._responses[message["id"]] = message
                    self._arrived.notify_all()
        with self._arrived:
            self._closed = True
            self._arrived.notify_all()

    def _wake(self) -> None:
        """Wake a waiting `request` to look again (the browser failed)."""
        with self._arrived:
            self._arrived.notify_all()

    def _diagnostics(self) -> str:
        parts = []
        if self.browser.errors:
            parts.append("the browser failed: " + "; ".join(repr(error) for error in self.browser.errors))
        parts.append("mcp-remote's stderr (last lines):\n" + "".join(self.stderr[-60:]))
        return "\n" + "\n".join(parts)


@contextmanager
def mcp_remote_session(
    url: str,
    provider: Provider,
    login: str = "ada",
    *,
    refuse: bool = False,
    mode: str = "legacy",
    protocol_version: str = PROTOCOL_VERSION,
    extra_args: Sequence[str] = (),
    connect_timeout: float = CONNECT_TIMEOUT,
) -> Iterator[McpRemoteSession]:
    """mcp-remote against `url` (OAuth, `--transport http-only`), signed in as `login` at
    `provider` (who denies consent instead with `refuse=True`), and initialized; stopped on exit.

    `mode` is mcp-remote's `--protocol` ("legacy" or "auto"); `protocol_version` the one the
    host's `initialize` asks for. Raises `McpRemoteError` (with mcp-remote's stderr) when the
    connection is not up within `connect_timeout`. Call `unavailable(mcp_remote_missing())` first.
    """
    node_binary = node()
    assert node_binary is not None and mcp_remote_missing() is None, mcp_remote_missing()

    def user_at_the_browser(authorization_url: str) -> None:
        redirect = provider.deny(authorization_url, login=login) if refuse else provider.consent(authorization_url, login=login)
        with httpx2.Client(timeout=HTTP_TIMEOUT, trust_env=False) as browser:
            browser.get(redirect)  # mcp-remote's callback server: it gets the code (or the error)

    with tempfile.TemporaryDirectory(prefix="mcp-remote-") as scratch:
        home = Path(scratch)
        config_dir = home / "config"
        browser = HeadlessBrowser(home, user_at_the_browser)
        argv = [node_binary, str(PROXY_SCRIPT), url, str(free_port()), "--transport", "http-only",
                "--auth-timeout", str(AUTH_TIMEOUT_SECONDS), "--protocol", mode, *extra_args]  # fmt: skip
        # A minimal environment: no desktop variables, so `open` takes the $BROWSER path.
        env = {"HOME": str(home), "MCP_REMOTE_CONFIG_DIR": str(config_dir), **browser.env()}
        process = subprocess.Popen(
            argv, cwd=home, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
        )
        assert process.stdout is not None and process.stderr is not None
        stdout, stderr = process.stdout, process.stderr
        session = McpRemoteSession(process, config_dir, browser)
        browser.on_error = session._wake
        readers = [
            threading.Thread(target=session._read, args=(stdout,), name="mcp-remote-stdout", daemon=True),
            threading.Thread(target=lambda: session.stderr.extend(stderr), name="mcp-remote-stderr", daemon=True),
        ]
        for reader in readers:
            reader.start()
        try:
            session.initialize_result = session.request(
                "initialize",
                {"protocolVersion": protocol_version, "capabilities": {}, "clientInfo": {"name": "portcullis-tests", "version": "0"}},
                timeout=connect_timeout,
            )
            session.notify("notifications/initialized")
            yield session
        finally:
            assert process.stdin is not None
            try:
                process.stdin.close()  # mcp-remote shuts down when its host goes away
            except BrokenPipeError:
                pass
            try:
                process.wait(SHUTDOWN_TIMEOUT)
            except subprocess.TimeoutExpired:
                stop(process)
            for reader in readers:
                reader.join(SHUTDOWN_TIMEOUT)
            stdout.close()
            stderr.close()
            browser.close()
