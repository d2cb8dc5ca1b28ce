"""What the RBAC examples and the README quickstart are checked against, read from the source.

The admin API (`operator/portcullis/gateway/admin.py`) authorizes each handler with one call,
`await guarded(request, "<verb>")`; its routes are `Route("<path>", answered(<handler>),
methods=[...])`. Reading both from the source, rather than listing them again here, is what
lets a test fail when a route or a verb is added and an example does not follow.

`granted_verbs` is the part of RBAC the examples use: Roles and RoleBindings in one namespace,
rules on `virtualmcpservers` in `portcullis.dev`, optionally narrowed by `resourceNames`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ADMIN_SOURCE = ROOT / "operator" / "portcullis" / "gateway" / "admin.py"

_ROUTE = re.compile(r'Route\("(?P<path>[^"]+)",\s*(?:answered\()?(?P<handler>\w+)\)?,\s*methods=\[(?P<methods>[^\]]*)\]')
_HANDLER = re.compile(r"^    async def (\w+)\(request: Request\) -> Response:\n(.*?)(?=^    (?:async )?def |^    return )", re.M | re.S)
_GUARD = re.compile(r'await guarded\(request, "([a-z-]+)"\)')


@dataclass(frozen=True)
class AdminRoute:
    method: str
    path: str
    """The route's template, e.g. /v1/users/{user}/connections/{connection}."""
    verb: str | None
    """The custom verb the caller needs on virtualmcpservers/<name>; None: open (status, metrics)."""

    def matches(self, method: str, path: str) -> bool:
        pattern = re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(self.path))
        return method == self.method and re.fullmatch(pattern, path) is not None


def admin_routes() -> list[AdminRoute]:
    source = ADMIN_SOURCE.read_text()
    verbs = {}
    for name, body in _HANDLER.findall(source):
        guards = _GUARD.findall(body)
        verbs[name] = guards[0] if guards else None
    routes = []
    for found in _ROUTE.finditer(source):
        for method in re.findall(r'"([A-Z]+)"', found.group("methods")):
            routes.append(AdminRoute(method, found.group("path"), verbs.get(found.group("handler"))))
    if not routes or not any(r.verb for r in routes):
        raise AssertionError(f"no admin routes or verbs found in {ADMIN_SOURCE}: has its shape changed?")
    return routes


def admin_verbs() -> set[str]:
    """Every verb the admin API checks."""
    return {r.verb for r in admin_routes() if r.verb is not None}


def route_for(method: str, path: str) -> AdminRoute:
    for route in admin_routes():
        if route.matches(method, path):
            return route
    raise AssertionError(f"the admin API has no route {method} {path}")


def granted_verbs(docs: Iterable[dict[str, Any]], *, account: str, namespace: str, server: str) -> set[str]:
    """The verbs on virtualmcpservers/<server> that the objects grant to ServiceAccount <account>."""
    objects = list(docs)
    roles = {d["metadata"]["name"]: d for d in objects if d.get("kind") == "Role" and d["metadata"].get("namespace") == namespace}
    verbs: set[str] = set()
    for binding in objects:
        if binding.get("kind") != "RoleBinding" or binding["metadata"].get("namespace") != namespace:
            continue
        subject = {"kind": "ServiceAccount", "name": account, "namespace": namespace}
        if subject not in binding.get("subjects", []) or binding["roleRef"].get("kind") != "Role":
            continue
        for rule in (roles.get(binding["roleRef"]["name"]) or {}).get("rules", []):
            if "portcullis.dev" in rule.get("apiGroups", []) and "virtualmcpservers" in rule.get("resources", []):
                if not rule.get("resourceNames") or server in rule["resourceNames"]:
                    verbs.update(rule.get("verbs", []))
    return verbs
