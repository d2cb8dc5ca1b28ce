"""`portcullis serve`: the same YAML the operator reconciles, served on a laptop.

Loads the manifests, compiles the chosen server strictly (any problem is an
error here: there is no status to report it in), binds the ports, and runs the
gateway with the local state directory standing in for the cluster.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from portcullis.api.config import GatewayConfig
from portcullis.api.manifests import Manifests, load_manifests
from portcullis.api.resources import VirtualMCPServer
from portcullis.compile import CompileError, compile_strict, orphan_mappings
from portcullis.gateway.admin import build_admin_app
from portcullis.gateway.audit import AuditSink, JsonLinesAuditSink
from portcullis.gateway.core import Gateway
from portcullis.gateway.endpoint import DEFAULT_MAX_BODY_BYTES, BearerAuth, build_app
from portcullis.gateway.local import LocalState, build_local_gateway
from portcullis.gateway.runtime import Listener, Servers, bind, run_in_thread, with_lifespan


class ServeError(Exception):
    """A problem the user must fix; the message says what to do."""


def pick_server(manifests: Manifests, name: str | None) -> VirtualMCPServer:
    servers = manifests.servers
    if not servers:
        raise ServeError("no VirtualMCPServer in the given manifests")
    if name is None:
        if len(servers) > 1:
            names = ", ".join(s.metadata.name for s in servers)
            raise ServeError(f"several VirtualMCPServers ({names}): choose one with --server NAME")
        return servers[0]
    for server in servers:
        if server.metadata.name == name:
            return server
    raise ServeError(f"no VirtualMCPServer named {name!r}; found {', '.join(s.metadata.name for s in servers)}")


def report_skipped(manifests: Manifests) -> None:
    for what in manifests.skipped:
        print(f"portcullis: skipped, not a Portcullis object or a v1 Secret: {what}", file=sys.stderr)


def compile_for(manifests: Manifests, server: VirtualMCPServer, url: str) -> GatewayConfig:
    problems = orphan_mappings(manifests.servers, manifests.mappings)
    try:
        config = compile_strict(server, manifests.mappings, manifests.connections, url=url)
    except CompileError as exc:
        problems = [*problems, *exc.problems]
    if problems:
        raise CompileError(problems)
    return config


@dataclass
class LocalGateway:
    gateway: Gateway
    servers: Servers
    url: str
    admin_url: str
    endpoint: BearerAuth


@contextmanager
def local_gateway(
    paths: Iterable[str | Path] | Manifests,
    *,
    state_dir: Path,
    server_name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    admin_port: int = 8081,
    audit: AuditSink | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    background: bool = True,
    fast_path: bool = True,
) -> Iterator[LocalGateway]:
    """Bind, compile and build a gateway; serve it in a background thread while the block runs."""
    manifests = paths if isinstance(paths, Manifests) else load_manifests(paths)
    report_skipped(manifests)
    server = pick_server(manifests, server_name)
    mcp_sock = bind(host, port, "--port")
    try:
        admin_sock = bind(host, admin_port, "--admin-port")
    except BaseException:
        mcp_sock.close()
        raise
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{mcp_sock.getsockname()[1]}/mcp"
    admin_url = f"http://{shown_host}:{admin_sock.getsockname()[1]}"
    try:
        config = compile_for(manifests, server, url)
        state = LocalState(state_dir)
        sinks = [audit] if audit is not None else [JsonLinesAuditSink(sys.stdout)]
        gateway, keys = build_local_gateway(config, state, audit=sinks, secrets=manifests.secrets)
    except BaseException:
        mcp_sock.close()
        admin_sock.close()
        raise
    endpoint = build_app(gateway, max_body_bytes=max_body_bytes, fast_path=fast_path)
    mcp_app = with_lifespan(endpoint, gateway.start, gateway.stop)
    admin_app = build_admin_app(gateway, auth=state.admin_auth(), keys=lambda: keys)
    servers = Servers([Listener(mcp_app, mcp_sock, "mcp"), Listener(admin_app, admin_sock, "admin")])
    handle = LocalGateway(gateway, servers, url, admin_url, endpoint)
    if background:
        with run_in_thread(servers):
            yield handle
    else:
        yield handle
