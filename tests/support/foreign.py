"""MCP servers this project did not write, and a gateway in front of each, for fidelity tests.

Two upstreams, each run as its own process on 127.0.0.1:

- the official reference "everything" server (`@modelcontextprotocol/server-everything`,
  npm, pinned in package-lock.json), in its Streamable HTTP mode
  (`PORT=N node dist/index.js streamableHttp`) under the Node 22 runtime that
  package.json pins. It speaks only the session protocol (2025-11-25): a
  2026-07-28 client falls back to a session with it.
- an ordinary FastMCP app (tests/support/fastmcp_server.py, PyPI `fastmcp`,
  pinned in the `test` extra), over FastMCP's own HTTP transport. It speaks both
  eras.

The everything server listens on every interface (`app.listen(PORT)`), so it is
started with a small `--import` preload (`PRELOAD`, written to a temporary file)
that pins its listening socket to 127.0.0.1. The same preload tees one line per
JSON-RPC request and notification the server *receives* to stderr
(`OBSERVED_PREFIX` + JSON), by wrapping the TypeScript SDK's
`Protocol.prototype._onrequest` and `_onnotification`. It changes nothing the
server does; it only lets a test see what reached the upstream (e.g. whether
`notifications/cancelled` did).

`gateway_in_front` starts a local gateway (the same `local_gateway` the CLI's
`portcullis serve` uses) with a ToolMapping exposing every tool, prompt, resource
and resource template the upstream lists, each under its own name, and mints a
session token for it.

`without_upstream_identity` is the normalizer every comparison applies to both
sides: it removes the `_meta` keys starting with `io.modelcontextprotocol/` (the
server identity a 2026-07-28 server stamps on results, which is the upstream's
directly and the gateway's through it) and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support.servers import REPO_ROOT, SHUTDOWN_TIMEOUT, ServerStartError, free_port, run_script, stop

EVERYTHING_VERSION = "2026.8.31"
FASTMCP_VERSION = "4.2.3"

EVERYTHING = REPO_ROOT / "node_modules" / "@modelcontextprotocol" / "server-everything"
TS_SDK = REPO_ROOT / "node_modules" / "@modelcontextprotocol" / "sdk"
LOCAL_NODE = REPO_ROOT / "node_modules" / ".bin" / "node"
FASTMCP_SCRIPT = "tests/support/fastmcp_server.py"
STARTUP_TIMEOUT = 20.0

UPSTREAM_META_PREFIX = "io.modelcontextprotocol/"
OBSERVED_PREFIX = "portcullis-observed "


# --- what is installed ----------------------------------------------------------------


def node() -> str | None:
    """The Node runtime package.json pins (22), else the machine's."""
    if LOCAL_NODE.exists():
        return str(LOCAL_NODE)
    return shutil.which("node")


def everything_missing() -> str | None:
    if node() is None:
        return "node is not installed"
    if not (EVERYTHING / "dist" / "index.js").is_file():
        return "@modelcontextprotocol/server-everything is not installed: run `npm ci` at the repository root"
    version = json.loads((EVERYTHING / "package.json").read_text()).get("version")
    if version != EVERYTHING_VERSION:
        return f"@modelcontextprotocol/server-everything {version} is installed, the tests were written for {EVERYTHING_VERSION}: run `npm ci`"
    return None


def fastmcp_missing() -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - stdlib since 3.8
        return "importlib.metadata is unavailable"
    try:
        installed = version("fastmcp")
    except PackageNotFoundError:
        return f"fastmcp is not installed: `pip install -e '.[test]'` (it pins fastmcp=={FASTMCP_VERSION})"
    if installed != FASTMCP_VERSION:
        return f"fastmcp {installed} is installed, the tests were written for {FASTMCP_VERSION}"
    return None


# --- the everything server -------------------------------------------------------------

PRELOAD = """\
// Test instrumentation for the everything server (see tests/support/foreign.py); it changes no behaviour.
import net from "node:net";
import { Protocol } from "%(protocol)s";

// 1. Listen on loopback only: the server calls app.listen(PORT), i.e. on every interface.
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if ((typeof args[0] === "number" || typeof args[0] === "string") && (args.length === 1 || typeof args[1] === "function")) {
    args.splice(1, 0, "127.0.0.1");
  }
  return listen.apply(this, args);
};

// 2. Report each JSON-RPC request and notification the server receives, one JSON line on stderr.
const report = (kind, message, protocol) => {
  const params = message.params ?? {};
  const line = { kind, method: message.method, id: message.id ?? null, session: protocol.transport?.sessionId ?? null,
                 name: params.name ?? null, requestId: params.requestId ?? null };
  process.stderr.write("%(prefix)s" + JSON.stringify(line) + "\\n");
};
const onrequest = Protocol.prototype._onrequest;
Protocol.prototype._onrequest = function (request, extra) { report("request", request, this); return onrequest.call(this, request, extra); };
const onnotification = Protocol.prototype._onnotification;
Protocol.prototype._onnotification = function (notification) { report("notification", notification, this); return onnotification.call(this, notification); };
"""


@dataclass
class EverythingServer:
    url: str
    process: subprocess.Popen[str]
    observed: list[dict[str, Any]] = field(default_factory=list)
    """What the server received, in order (see PRELOAD): kind, method, id, session, name, requestId."""

    def received(self, method: str) -> list[dict[str, Any]]:
        return [line for line in list(self.observed) if line["method"] == method]


@contextmanager
def everything_server() -> Iterator[EverythingServer]:
    """The everything server on a free loopback port, stopped on exit."""
    node_binary = node()
    assert node_binary is not None, everything_missing()
    with tempfile.TemporaryDirectory(prefix="everything-") as scratch:
        preload = Path(scratch) / "preload.mjs"
        protocol = (TS_SDK / "dist" / "esm" / "shared" / "protocol.js").as_uri()
        preload.write_text(PRELOAD % {"protocol": protocol, "prefix": OBSERVED_PREFIX})
        port = free_port()
        # A minimal environment: its get-env tool returns all of it to whoever calls.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PORT": str(port), "HOME": scratch}
        process = subprocess.Popen(
            [node_binary, "--import", preload.as_uri(), str(EVERYTHING / "dist" / "index.js"), "streamableHttp"],
            cwd=scratch,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        server = EverythingServer(f"http://127.0.0.1:{port}/mcp", process)
        ready = threading.Event()
        startup: list[str] = []
        assert process.stderr is not None
        stderr = process.stderr

        def read() -> None:
            for line in stderr:
                if line.startswith(OBSERVED_PREFIX):
                    server.observed.append(json.loads(line[len(OBSERVED_PREFIX) :]))
                elif not ready.is_set():
                    startup.append(line)
                    if "listening on port" in line or "Failed to start" in line:
                        ready.set()
            ready.set()

        reader = threading.Thread(target=read, name="everything-stderr", daemon=True)
        reader.start()
        try:
            if not ready.wait(STARTUP_TIMEOUT) or process.poll() is not None or not any("listening on port" in s for s in startup):
                raise ServerStartError(f"the everything server did not start within {STARTUP_TIMEOUT}s:\n{''.join(startup)}")
            yield server
        finally:
            stop(process)
            reader.join(SHUTDOWN_TIMEOUT)
            stderr.close()


# --- the FastMCP server ----------------------------------------------------------------


@contextmanager
def fastmcp_server() -> Iterator[str]:
    """tests/support/fastmcp_server.py in a subprocess; yields its endpoint URL."""
    with run_script([FASTMCP_SCRIPT], ready_timeout=STARTUP_TIMEOUT) as script:
        yield script.url


# --- a gateway in front ----------------------------------------------------------------


@dataclass(frozen=True)
class Catalog:
    """Everything an upstream lists, by the names a ToolMapping selects them with."""

    tools: tuple[str, ...]
    prompts: tuple[str, ...]
    resources: tuple[str, ...]
    templates: tuple[str, ...]


def manifests(connection: str, url: str, catalog: Catalog, *, timeout_seconds: int = 30) -> list[dict[str, Any]]:
    """A connection to `url`, a server, and a mapping that hides nothing of `catalog`."""
    meta = {"namespace": "fidelity"}
    return [
        {
            "apiVersion": "portcullis.dev/v1alpha1",
            "kind": "MCPConnection",
            "metadata": {"name": connection, **meta},
            "spec": {"url": url, "timeoutSeconds": timeout_seconds, "credential": {"source": "none"}},
        },
        {
            "apiVersion": "portcullis.dev/v1alpha1",
            "kind": "VirtualMCPServer",
            "metadata": {"name": "fidelity", **meta},
            "spec": {"sessionTokens": {"defaultTTL": "1h", "maxTTL": "1h"}},
        },
        {
            "apiVersion": "portcullis.dev/v1alpha1",
            "kind": "ToolMapping",
            "metadata": {"name": f"fidelity-{connection}", **meta},
            "spec": {
                "serverRef": {"name": "fidelity"},
                "connectionRef": {"name": connection},
                "tools": [{"name": name} for name in catalog.tools],
                "prompts": [{"name": name} for name in catalog.prompts],
                "resources": [{"uri": uri} for uri in catalog.resources],
                "resourceTemplates": [{"uriTemplate": template} for template in catalog.templates],
            },
        },
    ]


def mint(admin_url: str, state_dir: Path, user: str = "fidelity@example.com") -> str:
    from portcullis.gateway.local import admin_secret

    request = urllib.request.Request(
        admin_url + "/v1/tokens",
        data=json.dumps({"user": user}).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {admin_secret(state_dir)}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(json.loads(response.read())["token"])


@dataclass(frozen=True)
class Fronted:
    """A running gateway in front of one upstream: its agent URL and a session token."""

    url: str
    token: str


@contextmanager
def gateway_in_front(connection: str, upstream_url: str, catalog: Catalog, workdir: Path, *, timeout_seconds: int = 30) -> Iterator[Fronted]:
    with gateways_in_front(connection, upstream_url, catalog, workdir, timeout_seconds=timeout_seconds) as (fronted,):
        yield fronted


@contextmanager
def gateways_in_front(
    connection: str, upstream_url: str, catalog: Catalog, workdir: Path, *, replicas: int = 1, timeout_seconds: int = 30
) -> Iterator[tuple[Fronted, ...]]:
    """`replicas` gateways of one server (one state directory: the same signing keys), each on its own
    port and event loop, as replicas behind a load balancer; one token, minted once, serves them all."""
    from portcullis.gateway.audit import MemoryAuditSink
    from portcullis.serve import local_gateway

    manifest_dir, state_dir = workdir / "manifests", workdir / "state"
    manifest_dir.mkdir(parents=True)
    documents = manifests(connection, upstream_url, catalog, timeout_seconds=timeout_seconds)
    (manifest_dir / "fidelity.yaml").write_text(yaml.safe_dump_all(documents))
    # Replicas answer to one public URL (a token's audience), as behind one Service.
    public = {"public_url": "http://fidelity.example.test/mcp"} if replicas > 1 else {}
    with contextlib.ExitStack() as stack:
        gateways = [
            stack.enter_context(local_gateway([manifest_dir], state_dir=state_dir, port=0, admin_port=0, audit=MemoryAuditSink(), **public))
            for _ in range(replicas)
        ]
        for gw in gateways:
            wait_ready(gw.url.removesuffix("/mcp") + "/readyz")
        token = mint(gateways[0].admin_url, state_dir)
        yield tuple(Fronted(gw.url, token) for gw in gateways)


def wait_ready(readyz: str, timeout: float = STARTUP_TIMEOUT) -> None:
    """Until the gateway has listed its upstream (before that it serves empty lists)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(readyz, timeout=2) as response:
                if response.status == 200:
                    return
        except urllib.error.URLError as exc:  # 503 while the first listing is pending
            last = str(exc)
        time.sleep(0.05)  # readiness is only observable by asking
    raise ServerStartError(f"the gateway was not ready within {timeout}s: {last}")


# --- normalizing ------------------------------------------------------------------------


def without_upstream_identity(value: Any) -> Any:
    """`value` (JSON-shaped) with every `_meta` key starting `io.modelcontextprotocol/` removed.

    A `_meta` left empty is dropped, so `{"_meta": {"io.modelcontextprotocol/serverInfo": ...}}`
    and no `_meta` at all compare equal. Nothing else is touched.
    """
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key == "_meta" and isinstance(item, dict):
                kept = {k: without_upstream_identity(v) for k, v in item.items() if not k.startswith(UPSTREAM_META_PREFIX)}
                if kept:
                    out[key] = kept
            else:
                out[key] = without_upstream_identity(item)
        return out
    if isinstance(value, list):
        return [without_upstream_identity(item) for item in value]
    return value


def wire(model: Any) -> Any:
    """A result model as it travels (camelCase, `_meta`, no unset fields), normalized."""
    return without_upstream_identity(model.model_dump(mode="json", by_alias=True, exclude_none=True))
