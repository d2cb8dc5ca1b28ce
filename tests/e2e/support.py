"""Helpers of the cluster e2e suite: watches with deadlines, apply, port-forwards, admin calls.

Only the dynamic Kubernetes client: it speaks plain dicts and raw paths, the same on every
client version. Every wait is a list-then-watch or a poll with a deadline (TIMEOUT), never a
bare sleep. Import this only once the suite is known to run (see environment.skip_reason).
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx2
import yaml
from kubernetes.dynamic import DynamicClient

from tests.e2e.environment import TIMEOUT

ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION = "portcullis.dev", "v1alpha1"
API = f"{GROUP}/{VERSION}"
FIELD_MANAGER = "portcullis-e2e"
PROTOCOL = "2026-07-28"

Obj = dict[str, Any]
T = TypeVar("T")


# --- the API -----------------------------------------------------------------------------------


def plain(obj: Any) -> Obj:
    return obj if isinstance(obj, dict) else dict(obj.to_dict())


def resource(dyn: DynamicClient, api_version: str, kind: str) -> Any:
    return dyn.resources.get(api_version=api_version, kind=kind)


def wait_for(
    dyn: DynamicClient, api_version: str, kind: str, *, until: Callable[[Obj], Any], what: str,
    namespace: str | None = None, name: str | None = None, label_selector: str | None = None,
) -> Obj:
    """List, then watch from that version, until an object satisfies `until`; fail after TIMEOUT."""
    res = resource(dyn, api_version, kind)
    selector = f"metadata.name={name}" if name else None
    listing = plain(res.get(namespace=namespace, field_selector=selector, label_selector=label_selector))
    for item in listing.get("items") or []:
        if until(item):
            return dict(item)
    for event in dyn.watch(
        res, namespace=namespace, field_selector=selector, label_selector=label_selector,
        resource_version=listing["metadata"]["resourceVersion"], timeout=TIMEOUT,
    ):
        obj = plain(event["raw_object"])
        if event["type"] in ("ADDED", "MODIFIED") and until(obj):
            return obj
    raise AssertionError(f"timed out after {TIMEOUT}s waiting for {what}")


def wait_gone(dyn: DynamicClient, api_version: str, kind: str, name: str, namespace: str | None = None) -> None:
    res = resource(dyn, api_version, kind)
    selector = f"metadata.name={name}"
    listing = plain(res.get(namespace=namespace, field_selector=selector))
    if not listing.get("items"):
        return
    for event in dyn.watch(
        res, namespace=namespace, field_selector=selector,
        resource_version=listing["metadata"]["resourceVersion"], timeout=TIMEOUT,
    ):
        if event["type"] == "DELETED":
            return
    raise AssertionError(f"timed out after {TIMEOUT}s waiting for {kind} {name} to go")


def condition(obj: Obj, kind: str) -> str | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return str(cond.get("status"))
    return None


def load(path: Path, namespace: str | None = None) -> list[Obj]:
    """The documents of a manifest file, moved to `namespace` when one is given."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    if namespace is None:
        return docs
    for doc in docs:
        if "namespace" in doc.get("metadata", {}):
            doc["metadata"]["namespace"] = namespace
        for subject in doc.get("subjects", []):
            subject["namespace"] = namespace
    return docs


def apply(dyn: DynamicClient, doc: Obj) -> Obj:
    res = resource(dyn, doc["apiVersion"], doc["kind"])
    return plain(res.server_side_apply(
        body=doc, namespace=doc["metadata"].get("namespace"), field_manager=FIELD_MANAGER, force_conflicts=True
    ))


def get(dyn: DynamicClient, api_version: str, kind: str, name: str, namespace: str | None = None) -> Obj:
    return plain(resource(dyn, api_version, kind).get(name=name, namespace=namespace))


def merge_patch(dyn: DynamicClient, api_version: str, kind: str, name: str, namespace: str, patch: Obj) -> Obj:
    return plain(resource(dyn, api_version, kind).patch(
        body=patch, name=name, namespace=namespace, content_type="application/merge-patch+json"
    ))


def eventually(check: Callable[[], T | None], what: str, *, interval: float = 0.5) -> T:
    """Poll `check` until it returns something truthy; fail after TIMEOUT with `what`.

    For what no watch can show (an answer of a gateway replica): bounded, and the interval
    is a pacing, not a synchronization.
    """
    deadline = time.monotonic() + TIMEOUT
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except (httpx2.HTTPError, OSError) as exc:  # a port-forward reconnecting, a pod going
            last, result = exc, None
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {TIMEOUT}s waiting for {what}" + (f" (last error: {last!r})" if last else ""))


# --- kubectl, as the README uses it -------------------------------------------------------------


def kubectl(*args: str) -> str:
    done = subprocess.run(["kubectl", *args], capture_output=True, text=True, timeout=TIMEOUT, check=False)
    if done.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def service_account_token(account: str, namespace: str) -> str:
    """What the README does: `kubectl create token <account> -n <namespace>`."""
    return kubectl("create", "token", account, "-n", namespace).strip()


_FORWARDING = re.compile(r"Forwarding from 127\.0\.0\.1:(\d+) -> (\d+)")


@contextmanager
def port_forward(namespace: str, target: str, *ports: int) -> Iterator[dict[int, int]]:
    """`kubectl port-forward` to `target` (svc/<name> or pod/<name>) on free local ports.

    Yields {remote port: local port}. kubectl's output is drained by a thread for as long as
    it runs ("Handling connection ..." on every request would otherwise fill the pipe).
    """
    args = ["kubectl", "port-forward", "-n", namespace, "--address", "127.0.0.1", target, *(f":{p}" for p in ports)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, name=f"port-forward {target}", daemon=True).start()
    try:
        mapping: dict[int, int] = {}
        seen: list[str] = []
        deadline = time.monotonic() + TIMEOUT
        while len(mapping) < len(ports):
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"kubectl port-forward {target}: no ports after {TIMEOUT}s: {''.join(seen)}") from None
            if line is None:
                raise AssertionError(f"kubectl port-forward {target} exited ({proc.wait()}): {''.join(seen)}")
            seen.append(line)
            if (found := _FORWARDING.search(line)) is not None:
                mapping[int(found.group(2))] = int(found.group(1))
        yield mapping
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# --- the gateway's two ports, over HTTP ---------------------------------------------------------


def admin(base: str, method: str, path: str, token: str, body: Obj | None = None) -> httpx2.Response:
    return httpx2.request(
        method, base + path, json=body, timeout=30,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )


def call_tool(base: str, token: str, name: str, arguments: Obj | None = None) -> httpx2.Response:
    """One 2026-07-28 `tools/call` as raw HTTP: what one replica answers to one token."""
    body = {
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {
            "name": name, "arguments": arguments or {},
            "_meta": {"io.modelcontextprotocol/protocolVersion": PROTOCOL, "io.modelcontextprotocol/clientCapabilities": {}},
        },
    }
    return httpx2.post(
        base + "/mcp", content=json.dumps(body).encode(), timeout=30,
        headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": PROTOCOL,
            "Mcp-Method": "tools/call", "Mcp-Name": name,
        },
    )


def refusal(response: httpx2.Response) -> str | None:
    """The reason a 401 gives (`revoked`, `expired`, ...), or None when the token was accepted."""
    if response.status_code != 401:
        return None
    return str(response.json().get("error_description"))
