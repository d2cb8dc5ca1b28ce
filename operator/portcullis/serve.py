"""`portcullis serve`: the same YAML the operator reconciles, served on a laptop.

Loads the manifests, compiles the chosen server strictly (any problem is an
error here: there is no status to report it in), binds the ports, and runs the
gateway with the local state directory standing in for the cluster.

The server's public URL is the audience of every session token it mints and
accepts. By default it is the address bound here; behind a load balancer every
replica must be given the balancer's URL (`public_url`, `serve --url`), as every
pod in a cluster has its Service's, or the replicas refuse each other's tokens.
"""

from __future__ import annotations

import sys
import urllib.parse
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
from portcullis.gateway.oauth.flow import CALLBACK_PATH
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


def compile_for(manifests: Manifests, server: VirtualMCPServer, url: str, callback_url: str | None = None) -> GatewayConfig:
    problems = orphan_mappings(manifests.servers, manifests.mappings)
    try:
        config = compile_strict(server, manifests.mappings, manifests.connections, url=url, callback_url=callback_url)
    except CompileError as exc:
        problems = [*problems, *exc.problems]
    if problems:
        raise CompileError(problems)
    return config


def check_public_url(url: str) -> str:
    """`url` if it can be a public MCP URL (http or https, a host, a path), else a ServeError saying why."""
    parts = urllib.parse.urlsplit(url)
    example = "e.g. http://lb:9000/mcp"
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ServeError(f"public URL {url!r} is not an http:// or https:// URL with a host ({example})")
    try:
        _ = parts.port  # raises on a port that is not a number, or out of range
    except ValueError:
        raise ServeError(f"public URL {url!r} has an invalid port ({example})") from None
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise ServeError(f"public URL {url!r} needs a host and no user name or password ({example})")
    if parts.path in ("", "/"):
        raise ServeError(f"public URL {url!r} has no path: give the whole MCP URL that agents use ({example})")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ServeError(f"public URL {url!r} must not have a query or fragment ({example})")
    return url


@dataclass
class LocalGateway:
    gateway: Gateway
    servers: Servers
    url: str
    """The MCP URL this process bound (to reach this replica itself)."""
    admin_url: str
    endpoint: BearerAuth
    public_url: str
    """The MCP URL agents use, the tokens' audience: `url` unless a public URL was given."""


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
    public_url: str | None = None,
) -> Iterator[LocalGateway]:
    """Bind, compile and build a gateway; serve it in a background thread while the block runs.

    `public_url` is the MCP URL agents use (a load balancer's, in front of several
    replicas on one `state_dir`); default: the address bound here.
    """
    if public_url is not None:
        check_public_url(public_url)
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
        # Browsers come back from an OAuth connect flow to this process's admin port (loopback).
        config = compile_for(manifests, server, public_url or url, callback_url=admin_url + CALLBACK_PATH)
        state = LocalState(state_dir)
        sinks = [audit] if audit is not None else [JsonLinesAuditSink(sys.stdout)]
        gateway, keys = build_local_gateway(config, state, audit=sinks, secrets=manifests.secrets)
    except BaseException:
        mcp_sock.close()
        admin_sock.close()
        raise
    # The RFC 9728 hint and the allowed Origin are the public URL's. The bound origin stays
    # allowed too, so a replica bound to loopback still accepts loopback pages (endpoint.py).
    endpoint = build_app(
        gateway,
        max_body_bytes=max_body_bytes,
        fast_path=fast_path,
        public_base=_origin(config.server.url),
        allowed_origins=frozenset({_origin(url)}),
        # Replicas on one machine reach each other where each bound (answers to relayed requests).
        replica_url=url,
    )
    mcp_app = with_lifespan(endpoint, gateway.start, gateway.stop)
    admin_app = build_admin_app(gateway, auth=state.admin_auth(), keys=lambda: keys, with_callback=True)
    servers = Servers([Listener(mcp_app, mcp_sock, "mcp"), Listener(admin_app, admin_sock, "admin")])
    handle = LocalGateway(gateway, servers, url, admin_url, endpoint, config.server.url)
    if background:
        with run_in_thread(servers):
            yield handle
    else:
        yield handle


def _origin(url: str) -> str:
    """scheme://host[:port] of an absolute URL (RFC 6454), lowercase as browsers send it."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()
