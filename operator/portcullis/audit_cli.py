"""`portcullis audit query|verify`: the audit log, for the people who answer for it.

Locally (the default) both read the embedded SQLite store under the state directory,
and verify with the tenants' audit keys kept there. With `--admin-url` they ask a
running gateway's admin API instead (`GET /v1/audit`, `GET /v1/audit/verify`), which is
how a cluster's PostgreSQL store is read: the caller presents `$PORTCULLIS_ADMIN_SECRET`
(locally, the admin secret; in a cluster, a ServiceAccount token allowed the verb
`audit` on the server).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from portcullis.gateway.admin_input import AdminError, audit_query_from, audit_row
from portcullis.gateway.audit.events import iso_time
from portcullis.gateway.audit.keys import AuditKey
from portcullis.gateway.local import LocalState
from portcullis.gateway.audit.sqlite import SqliteAuditStore
from portcullis.gateway.audit.store import parse_time
from portcullis.gateway.audit.trail import verify_audit

AdminCall = Callable[[argparse.Namespace, str, str, dict[str, Any] | None], tuple[int, Any]]

_FILTERS = (("user", "user"), ("tool", "tool"), ("connection", "connection"), ("outcome", "outcome"),
            ("decision", "decision"), ("method", "method"), ("run_id", "runId"), ("since", "since"),
            ("until", "until"), ("limit", "limit"), ("cursor", "cursor"))
_COLUMNS = ("time", "user", "method", "tool", "decision", "reason", "outcome", "ms", "run", "args", "result")


def add_parser(sub: Any, state: Callable[[argparse.ArgumentParser], None], func: Callable[[argparse.Namespace], int]) -> None:
    """Add `audit query` and `audit verify`; `func` runs the chosen one (as `args.audit_handler`)."""
    audit = sub.add_parser("audit", help="query and verify the audit log").add_subparsers(dest="action", required=True)
    p = audit.add_parser("query", help="calls and denials, filtered (oldest first)")
    for flag in ("user", "tool", "connection", "method"):
        p.add_argument(f"--{flag}")
    p.add_argument("--outcome", help="ok, tool_error, upstream_error, denied, unauthenticated or error")
    p.add_argument("--decision", choices=["allow", "deny"])
    p.add_argument("--run-id", dest="run_id", help="the agentRunId given at minting")
    p.add_argument("--since", help="an age (30d, 12h) or a time (2026-11-30T12:00:00Z)")
    p.add_argument("--until", help="same forms as --since")
    p.add_argument("--limit", type=int, default=100, help="at most this many events (1-1000; default 100)")
    p.add_argument("--cursor", help="continue after a previous page (its next cursor)")
    p.add_argument("--json", action="store_true", help="JSON lines with every field, instead of a table")
    _common(p, state)
    p.set_defaults(func=func, audit_handler=cmd_query)
    p = audit.add_parser("verify", help="prove no event was altered, removed or inserted")
    p.add_argument("--since", help="an age (90d) or a time; default: everything kept")
    p.add_argument("--until")
    p.add_argument("--json", action="store_true")
    _common(p, state)
    p.set_defaults(func=func, audit_handler=cmd_verify)


def _common(p: argparse.ArgumentParser, state: Callable[[argparse.ArgumentParser], None]) -> None:
    state(p)
    p.add_argument("--server", help="NAMESPACE/NAME of the virtual server (default: every server in the local store)")
    p.add_argument("--admin-url", help="ask a running gateway's admin API instead of the local store")


def _params(args: argparse.Namespace) -> dict[str, str]:
    return {wire: str(getattr(args, attr)) for attr, wire in _FILTERS if getattr(args, attr, None) not in (None, "")}


def _local_store(args: argparse.Namespace, state_dir: Path) -> SqliteAuditStore:
    path = LocalState(state_dir).audit_db
    if not path.exists():
        raise FileNotFoundError(
            f"no audit store at {path}: run `portcullis serve` or `portcullis demo` with this --state-dir first, "
            "or pass --admin-url to ask a running gateway"
        )
    return SqliteAuditStore(path)


def cmd_query(args: argparse.Namespace, state_dir: Path, admin_call: AdminCall) -> int:
    params = _params(args)
    if args.admin_url:
        status, answer = admin_call(args, "GET", "/v1/audit?" + urllib.parse.urlencode(params), None)
        if status != 200:
            return _fail(answer, status)
        rows, cursor = answer["events"], answer.get("nextCursor")
    else:
        try:
            query = audit_query_from(params, server=args.server or "")
        except AdminError as exc:  # the same checks as the API, said on the command line
            print(f"portcullis: {exc.message}", file=sys.stderr)
            return 2
        if not args.server:
            query = dataclasses.replace(query, server=None)
        store = _local_store(args, state_dir)

        async def read() -> Any:
            try:
                await store.open()
                return await store.query(query)
            finally:
                await store.close()

        page = asyncio.run(read())
        rows, cursor = [audit_row(r) for r in page.events], page.next_cursor
    if args.json:
        for row in rows:
            print(json.dumps(row, separators=(",", ":")))
    else:
        _table(rows)
    if cursor:
        print(f"more: --cursor {cursor}", file=sys.stderr)
    return 0


def _table(rows: list[dict[str, Any]]) -> None:
    def short(digest: Any) -> str:
        return str(digest).removeprefix("hmac-sha256:")[:12] if digest else "-"

    lines = [_COLUMNS]
    for r in rows:
        lines.append((
            str(r["time"])[:23] + "Z", r.get("user") or "-", r["method"], r.get("tool") or "-", r["decision"], r["reason"],
            r["outcome"], f"{r['latency_ms']:.1f}", r.get("agent_run_id") or "-", short(r.get("args_digest")),
            short(r.get("result_digest")),
        ))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(_COLUMNS))]
    for index, line in enumerate(lines):
        cells = [(str(v).upper() if index == 0 else str(v)).ljust(w) for v, w in zip(line, widths, strict=True)]
        print("  ".join(cells).rstrip())
    if len(rows) == 0:
        print("(no events match)", file=sys.stderr)


def cmd_verify(args: argparse.Namespace, state_dir: Path, admin_call: AdminCall) -> int:
    if args.admin_url:
        status, answer = admin_call(args, "GET", "/v1/audit/verify?" + urllib.parse.urlencode(_params(args)), None)
        if status != 200:
            return _fail(answer, status)
        reports = [answer]
    else:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
        store = _local_store(args, state_dir)
        state = LocalState(state_dir)

        async def check() -> list[dict[str, Any]]:
            await store.open()
            try:
                servers = [args.server] if args.server else await store.servers()
                out = []
                for server in servers:
                    key = AuditKey(await state.audit_keys.key(server.split("/", 1)[0]))
                    report = await verify_audit(store, key.chain_key, server, since, until)
                    out.append({"server": server, **report.to_dict()})
                return out
            finally:
                await store.close()

        reports = asyncio.run(check())
    if args.json:
        print(json.dumps(reports if len(reports) != 1 else reports[0], indent=2))
    else:
        for report in reports:
            _say(report)
    return 0 if reports and all(r["ok"] for r in reports) else 1


def _say(report: dict[str, Any]) -> None:
    head = f"{report['server']}: {report['events']} events in {report['writers']} chains"
    if report["anchored"]:
        head += f" ({report['anchored']} continuing after a recorded pruning)"
    if report["ok"]:
        print(f"{head}: intact")
        return
    first = report["first"]
    when = f", {iso_time(first['time_us'] / 1_000_000)}" if first.get("time_us") else ""
    request = f", request {first['request_id']}" if first.get("request_id") else ""
    print(f"{head}: BROKEN ({len(report['breaks'])} chains)")
    print(f"  first broken link: writer {first['writer']} seq {first['seq']}{request}{when}: {first['problem']}: {first['message']}")


def _fail(answer: Any, status: int) -> int:
    message = answer.get("message", f"HTTP {status}") if isinstance(answer, dict) else f"HTTP {status}"
    print(f"portcullis: {message}", file=sys.stderr)
    return 1
