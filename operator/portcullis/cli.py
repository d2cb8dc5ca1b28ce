"""The `portcullis` command line.

    portcullis demo [--serve]                    the whole idea in one run
    portcullis serve -f PATH... [--url URL]      a gateway from the operator's YAML, no cluster
    portcullis compile -f PATH...                print the compiled config, or the errors
    portcullis token mint|revoke ...             through a running gateway's admin API
    portcullis credentials set|delete|list|connect   the local vault; OAuth connect links
    portcullis audit query|verify ...            the audit log: filter it, prove it intact
    portcullis gateway --in-cluster ...          the gateway as the operator deploys it
    portcullis operator                          the Kubernetes operator
    portcullis crds                              the CustomResourceDefinitions, as YAML
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from portcullis import __version__
from portcullis.api.manifests import ManifestError, load_manifests
from portcullis.compile import CompileError


def _fail(message: str, code: int = 1) -> int:
    print(f"portcullis: {message}", file=sys.stderr)
    return code


# --- compile ---------------------------------------------------------------------------


def cmd_compile(args: argparse.Namespace) -> int:
    from portcullis.serve import ServeError, compile_for, pick_server, report_skipped

    manifests = load_manifests(args.file)
    report_skipped(manifests)
    chosen = [pick_server(manifests, args.server)] if args.server or len(manifests.servers) <= 1 else manifests.servers
    if not manifests.servers:
        raise ServeError("no VirtualMCPServer in the given manifests")
    out = {}
    for server in chosen:
        config = compile_for(manifests, server, args.url or _default_url(server.metadata.name, server.metadata.namespace))
        out[f"{server.metadata.namespace}/{server.metadata.name}"] = config.model_dump(mode="json")
    print(json.dumps(out if len(out) > 1 else next(iter(out.values())), indent=2))
    return 0


def _default_url(name: str, namespace: str) -> str:
    from portcullis.compile import MCP_PORT

    return f"http://{name}.{namespace}.svc:{MCP_PORT}/mcp"


# --- serve ----------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from portcullis.serve import local_gateway

    with local_gateway(
        args.file,
        state_dir=_state_dir(args),
        server_name=args.server,
        host=args.host,
        port=args.port,
        admin_port=args.admin_port,
        max_body_bytes=args.max_body_bytes,
        background=False,
        public_url=args.url,
    ) as handle:
        # "MCP URL" is what to give agents; "listening" (only when it differs) is this replica itself.
        bound = f"\n  listening: {handle.url}" if handle.public_url != handle.url else ""
        print(
            f"portcullis: serving {handle.gateway.config.server.namespace}/{handle.gateway.config.server.name}\n"
            f"  MCP URL:   {handle.public_url}{bound}\n  admin API: {handle.admin_url}\n"
            f"  mint a token: portcullis token mint --admin-url {handle.admin_url}{_state_flag(args)} --user <id>",
            file=sys.stderr,
        )
        _run_until_signal(handle.servers)
    return 0


def _public_url(value: str) -> str:
    """argparse type of `serve --url`: refused at parse time, before any port is bound."""
    from portcullis.serve import ServeError, check_public_url

    try:
        return check_public_url(value)
    except ServeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _state_flag(args: argparse.Namespace) -> str:
    """` --state-dir DIR` when the server runs on a state directory other than the default."""
    from portcullis.gateway.local import default_state_dir

    chosen = _state_dir(args)
    return "" if chosen == default_state_dir() else f" --state-dir {chosen}"


def _run_until_signal(servers: Any) -> None:
    from portcullis.gateway.runtime import new_event_loop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, servers.stop)
        await servers.serve()

    servers.freeze_heap_when_started = True
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(main())


def _state_dir(args: argparse.Namespace) -> Path:
    from portcullis.gateway.local import default_state_dir

    return Path(args.state_dir) if args.state_dir else default_state_dir()


# --- token (through the admin API) ----------------------------------------------------------


def _admin_call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, Any]:
    from portcullis.gateway.local import ADMIN_SECRET_ENV, existing_admin_secret

    state = _state_dir(args)
    secret = existing_admin_secret(state)
    if secret is None:
        raise ConnectionError(
            f"no admin secret in {state} (and ${ADMIN_SECRET_ENV} is not set): pass the --state-dir "
            "the gateway was started with, or set the secret a cluster admin gave you"
        )
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        args.admin_url.rstrip("/") + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = {"message": raw.decode(errors="replace")}
        if exc.code in (401, 403) and isinstance(answer, dict):
            answer["message"] = (
                f"{answer.get('message', 'refused')} (the admin secret in {state} is not this gateway's: "
                "is --state-dir the one it was started with?)"
            )
        return exc.code, answer
    except urllib.error.URLError as exc:
        raise ConnectionError(
            f"cannot reach the admin API at {args.admin_url} ({exc.reason}); is `portcullis serve` running?"
        ) from None


def cmd_token_mint(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"user": args.user}
    if args.ttl:
        body["ttl"] = args.ttl
    if args.tools:
        body["tools"] = [t.strip() for t in args.tools.split(",") if t.strip()]
    if args.read_only:
        body["access"] = "read-only"
    status, answer = _admin_call(args, "POST", "/v1/tokens", body)
    if status != 201:
        return _fail(answer.get("message", f"HTTP {status}") if isinstance(answer, dict) else f"HTTP {status}")
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(answer["token"])
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    if bool(args.jti) == bool(args.user):
        return _fail("give exactly one of --jti or --user", 2)
    body = {"jti": args.jti} if args.jti else {"user": args.user}
    status, answer = _admin_call(args, "POST", "/v1/revocations", body)
    if status != 200:
        return _fail(answer.get("message", f"HTTP {status}") if isinstance(answer, dict) else f"HTTP {status}")
    print(json.dumps(answer))
    return 0


# --- credentials (the local vault) ------------------------------------------------------------


def cmd_credentials(args: argparse.Namespace) -> int:
    from portcullis.vault.local import LocalVault

    from portcullis.gateway.local import LocalState

    state_dir = _state_dir(args)
    vault = LocalVault(state_dir)
    tenant = args.namespace
    if args.action == "set":
        servers = LocalState(state_dir).user_connections(tenant)
        if servers is None:
            return _fail(
                f"no virtual server of tenant {tenant!r} has run with state directory {state_dir}: "
                "start it with `portcullis serve` first (-n is the server's namespace), or pass the --state-dir it uses"
            )
        wanted = sorted({c for connections in servers.values() for c in connections})
        if args.connection not in wanted:
            return _fail(
                f"no server of tenant {tenant!r} takes a per-user credential for connection {args.connection!r} "
                f"(they take: {', '.join(wanted) or 'none'})"
            )
        if args.connection in LocalState(state_dir).oauth_connections(tenant):
            return _fail(
                f"users connect {args.connection!r} with OAuth, not a stored secret: "
                f"run `portcullis credentials connect --user {args.user} --connection {args.connection}`"
            )
        secret = args.secret
        if secret is None:
            secret = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else getpass.getpass("secret: ")
        if not secret:
            return _fail("empty secret; pass it on stdin or with --secret")
        asyncio.run(vault.put(tenant, args.user, args.connection, secret))
        print(f"stored {args.connection} credential of {args.user} (tenant {tenant}), sealed")
        return 0
    if args.action == "delete":
        existed = asyncio.run(vault.delete(tenant, args.user, args.connection))
        if not existed:
            return _fail(f"{args.user} has no {args.connection} credential in tenant {tenant}")
        print(f"deleted {args.connection} credential of {args.user} (tenant {tenant})")
        return 0
    if args.action == "connect":
        return _connect(args)
    return _list_credentials(vault, tenant, args.user, LocalState(state_dir).user_connections(tenant) or {})


def _list_credentials(vault: Any, tenant: str, user: str, servers: dict[str, list[str]]) -> int:
    """One line per connection: connected or not, how, and for OAuth the scopes and last refresh. No values."""
    from portcullis.gateway.oauth.record import loads

    stored = asyncio.run(vault.connections_of(tenant, user))
    wanted = sorted({c for connections in servers.values() for c in connections} | set(stored))
    rows = [("CONNECTION", "CONNECTED", "HOW", "SCOPES", "REFRESHED")]
    for connection in wanted:
        if connection not in stored:
            rows.append((connection, "no", "-", "-", "-"))
            continue
        try:
            text = asyncio.run(vault.get(tenant, user, connection))
        except Exception as exc:  # a value that no longer opens: say so, never show it
            rows.append((connection, "unreadable", "-", "-", type(exc).__name__))
            continue
        record = loads(text) if text else None
        if record is None:
            rows.append((connection, "yes", "static", "-", "-"))
            continue
        grant = record.grant
        when = grant.refreshed_at or grant.obtained_at if grant else None
        refreshed = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)) if when else "-"
        rows.append((connection, "yes" if grant else "reconnect" if record.lost else "no", "oauth", grant.scope or "-" if grant else "-", refreshed))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _connect(args: argparse.Namespace) -> int:
    """Ask the running gateway for a connect link, print it, and wait until the browser comes back."""
    path = f"/v1/users/{urllib.parse.quote(args.user, safe='')}/connections"
    status, answer = _admin_call(args, "POST", f"{path}/{urllib.parse.quote(args.connection, safe='')}/authorize", {})
    if status != 201:
        return _fail(answer.get("message", f"HTTP {status}") if isinstance(answer, dict) else f"HTTP {status}")

    def entry() -> dict[str, Any]:
        _, listed = _admin_call(args, "GET", path, None)
        return next((c for c in listed.get("connections", []) if c.get("connection") == args.connection), {})

    before = entry().get("connectedAt")
    print(f"Open this link in a browser to connect {args.connection} for {args.user}:\n\n  {answer['authorizationUrl']}\n", flush=True)
    deadline = min(time.time() + args.timeout, float(answer["expiresAt"]))
    print(f"portcullis: waiting for the browser to come back to {answer['redirectUri']} ...", file=sys.stderr, flush=True)
    while time.time() < deadline:
        now = entry()
        if now.get("connected") and now.get("connectedAt") != before:
            print(f"connected {args.connection} for {args.user} (scopes: {' '.join(now.get('scopes') or []) or 'none'})")
            return 0
        time.sleep(1)
    return _fail(f"the link was not used in time; run `portcullis credentials connect` again for a new one")


# --- audit -----------------------------------------------------------------------------------


def cmd_audit(args: argparse.Namespace) -> int:
    return int(args.audit_handler(args, _state_dir(args), _admin_call))


# --- cluster entry points -----------------------------------------------------------------------


def cmd_gateway(args: argparse.Namespace) -> int:
    from portcullis.gateway import cluster

    return cluster.main(server=args.server, namespace=args.namespace, host=args.host)


def cmd_operator(args: argparse.Namespace) -> int:
    from portcullis.controller.run import run_operator

    run_operator(
        namespaces=args.namespace or None,
        clusterwide=args.all_namespaces,
        peering=args.peering,
        priority=args.priority,
        liveness_port=args.liveness_port,
        metrics_port=args.metrics_port or None,
    )
    return 0


def cmd_crds(args: argparse.Namespace) -> int:
    from portcullis.api.crd import main as crd_main

    return crd_main(["--write", args.write] if args.write else ["--check", args.check] if args.check else [])


def cmd_demo(args: argparse.Namespace) -> int:
    from portcullis.demo import run_demo

    return run_demo(serve=args.serve, port=args.port, state_dir=Path(args.state_dir) if args.state_dir else None)


# --- parser ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="portcullis", description="Virtual MCP servers: scoped, per-user, audited.")
    parser.add_argument("--version", action="version", version=f"portcullis {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def state(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state-dir", help="local state directory (default: $PORTCULLIS_STATE_DIR or ~/.local/state/portcullis)")

    def admin(p: argparse.ArgumentParser) -> None:
        state(p)
        p.add_argument("--admin-url", default=os.environ.get("PORTCULLIS_ADMIN_URL", "http://127.0.0.1:8081"))

    p = sub.add_parser("demo", help="run the whole idea once: upstream, virtual server, token, call, summary")
    p.add_argument("--serve", action="store_true", help="keep the gateway running afterwards")
    p.add_argument("--port", type=int, default=8080, help="MCP port with --serve (default 8080; 0 picks one)")
    state(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="serve a virtual MCP server from YAML manifests, no cluster")
    p.add_argument("-f", "--file", action="append", required=True, help="manifest file or directory (repeatable)")
    p.add_argument("--server", help="which VirtualMCPServer, when the manifests hold several")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--admin-port", type=int, default=8081)
    p.add_argument(
        "--url",
        type=_public_url,
        metavar="URL",
        help="the public MCP URL agents use, and the session tokens' audience: behind a load balancer, its URL "
        "(e.g. http://lb:9000/mcp), the same for every replica (default: the address bound here)",
    )
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    state(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("compile", help="print the compiled gateway config, or the errors")
    p.add_argument("-f", "--file", action="append", required=True)
    p.add_argument("--server")
    p.add_argument("--url", help="public MCP URL (default: the in-cluster Service URL)")
    p.set_defaults(func=cmd_compile)

    token = sub.add_parser("token", help="session tokens").add_subparsers(dest="action", required=True)
    p = token.add_parser("mint", help="mint a session token for one user")
    p.add_argument("--user", required=True)
    p.add_argument("--ttl", help="e.g. 15m (capped by the server's sessionTokens.maxTTL)")
    p.add_argument("--tools", help="comma-separated narrower scope")
    p.add_argument("--read-only", action="store_true", help="only tools marked read-only (readOnlyHint, or readOnly in the mapping)")
    p.add_argument("--json", action="store_true", help="print the whole answer, not just the token")
    admin(p)
    p.set_defaults(func=cmd_token_mint)
    p = token.add_parser("revoke", help="revoke one token (--jti) or every token of a user (--user)")
    p.add_argument("--jti")
    p.add_argument("--user")
    admin(p)
    p.set_defaults(func=cmd_token_revoke)

    creds = sub.add_parser("credentials", help="users' upstream credentials in the local vault")
    csub = creds.add_subparsers(dest="action", required=True)
    helps = {
        "set": "store a user's static credential (sealed)",
        "delete": "forget a user's credential",
        "list": "what a user has connected, and how (never a value)",
        "connect": "print a connect link for an OAuth connection and wait until the user has consented",
    }
    for action, help_text in helps.items():
        p = csub.add_parser(action, help=help_text)
        p.add_argument("--user", required=True)
        if action != "list":
            p.add_argument("--connection", required=True)
        if action == "set":
            p.add_argument("--secret", help="the credential (default: read from stdin)")
        if action == "connect":
            p.add_argument("--admin-url", default=os.environ.get("PORTCULLIS_ADMIN_URL", "http://127.0.0.1:8081"))
            p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the browser (default: 600)")
        p.add_argument("-n", "--namespace", default="default", help="tenant (the server's namespace)")
        state(p)
        p.set_defaults(func=cmd_credentials, action=action)

    from portcullis.audit_cli import add_parser as add_audit_parser

    add_audit_parser(sub, state, cmd_audit)

    p = sub.add_parser("gateway", help="run the gateway as the operator deploys it")
    p.add_argument("--in-cluster", action="store_true", required=True)
    p.add_argument("--server", default=os.environ.get("PORTCULLIS_SERVER"))
    p.add_argument("--namespace", default=os.environ.get("PORTCULLIS_NAMESPACE"))
    p.add_argument("--host", default="0.0.0.0")  # in a pod: the Service must reach it
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("operator", help="run the Kubernetes operator")
    p.add_argument("-n", "--namespace", action="append", help="watch this namespace (repeatable)")
    p.add_argument("-A", "--all-namespaces", action="store_true", help="watch the whole cluster")
    p.add_argument("--peering", help="kopf peering name (for more than one operator replica)")
    p.add_argument(
        "--priority",
        type=int,
        help="peering priority: the highest acts, the others stand by (default with --peering: random per process)",
    )
    p.add_argument("--liveness-port", type=int, default=8080)
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus metrics port (0: none)")
    p.set_defaults(func=cmd_operator)

    p = sub.add_parser("crds", help="print the CustomResourceDefinitions as YAML, or write or check a directory of them")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="DIR", help="write one file per CRD into DIR")
    group.add_argument("--check", metavar="DIR", help="exit 1 if DIR is not up to date")
    p.set_defaults(func=cmd_crds)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ManifestError, CompileError) as exc:
        return _fail(f"invalid manifests:\n{exc}")
    except ConnectionError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from portcullis.serve import ServeError

        if isinstance(exc, (ServeError, OSError, ValueError)):
            return _fail(str(exc))
        raise


if __name__ == "__main__":
    sys.exit(main())
