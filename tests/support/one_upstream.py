"""A local gateway in front of one upstream, exposing the tools a test names: the most common stack.

`one_upstream(url, tools, directory, **spec)` writes the three resources (one
MCPConnection with `spec` merged into its spec, one VirtualMCPServer, one ToolMapping),
serves them with `local_gateway` on free ports, mints a session token for one user,
and yields both with the gateway's in-memory audit sink.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import yaml

from portcullis.gateway.audit import MemoryAuditSink
from portcullis.gateway.local import admin_secret
from portcullis.serve import LocalGateway, local_gateway

CONNECTION = "up"


@dataclass
class OneUpstream:
    gw: LocalGateway
    token: str
    audit: MemoryAuditSink
    state_dir: Path

    def mint(self, user: str) -> str:
        """Another user's session token."""
        return mint(self.gw, self.state_dir, user)


def manifests(url: str, tools: Iterable[str], *, prompts: Iterable[str] = (), **spec: Any) -> list[dict[str, Any]]:
    meta = {"namespace": "acme"}
    return [
        {
            "apiVersion": "portcullis.dev/v1alpha1",
            "kind": "MCPConnection",
            "metadata": {"name": CONNECTION, **meta},
            "spec": {"url": url, "credential": {"source": "none"}, **spec},
        },
        {"apiVersion": "portcullis.dev/v1alpha1", "kind": "VirtualMCPServer", "metadata": {"name": "s", **meta}},
        {
            "apiVersion": "portcullis.dev/v1alpha1",
            "kind": "ToolMapping",
            "metadata": {"name": "m", **meta},
            "spec": {
                "serverRef": {"name": "s"},
                "connectionRef": {"name": CONNECTION},
                "tools": [{"name": t} for t in tools],
                "prompts": [{"name": p} for p in prompts],
            },
        },
    ]


def mint(gw: LocalGateway, state_dir: Path, user: str) -> str:
    answer = httpx2.post(
        gw.admin_url + "/v1/tokens", json={"user": user}, headers={"Authorization": f"Bearer {admin_secret(state_dir)}"}, timeout=10
    )
    answer.raise_for_status()
    return str(answer.json()["token"])


@contextmanager
def one_upstream(
    url: str, tools: Iterable[str], directory: Path, *, user: str = "u", prompts: Iterable[str] = (), **spec: Any
) -> Iterator[OneUpstream]:
    (directory / "manifests.yaml").write_text(yaml.safe_dump_all(manifests(url, tools, prompts=prompts, **spec)))
    state = directory / "state"
    audit = MemoryAuditSink()
    with local_gateway([directory / "manifests.yaml"], state_dir=state, port=0, admin_port=0, audit=audit) as gw:
        yield OneUpstream(gw, mint(gw, state, user), audit, state)
