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


def mint(gw: LocalGateway | str, state_dir: Path, user: str, **body: Any) -> str:
    """A session token for `user` from the gateway's (or that admin URL's) admin API; `body` adds
    fields of the mint request (`tools`, `access`, ...)."""
    admin_url = gw if isinstance(gw, str) else gw.admin_url
    answer = httpx2.post(
        admin_url + "/v1/tokens", json={"user": user, **body}, headers={"Authorization": f"Bearer {admin_secret(state_dir)}"}, timeout=10
    )
    answer.raise_for_status()
    return str(answer.json()["token"])


@contextmanager
def sample_inbox() -> Iterator[tuple[str, Any]]:
    """The sample inbox (examples/inbox, an MCP SDK server whose tools carry mixed annotations) on
    loopback: its MCP URL, and its record of every tools/call it received."""
    from portcullis.demo import load_inbox
    from tests.support.servers import serve_asgi

    module = load_inbox()
    record = module.CallRecord()
    with serve_asgi(module.build_app(record=record)) as upstream:
        yield upstream.url(), record


@contextmanager
def one_upstream(
    url: str, tools: Iterable[str], directory: Path, *, user: str = "u", prompts: Iterable[str] = (), **spec: Any
) -> Iterator[OneUpstream]:
    (directory / "manifests.yaml").write_text(yaml.safe_dump_all(manifests(url, tools, prompts=prompts, **spec)))
    state = directory / "state"
    audit = MemoryAuditSink()
    with local_gateway([directory / "manifests.yaml"], state_dir=state, port=0, admin_port=0, audit=audit) as gw:
        yield OneUpstream(gw, mint(gw, state, user), audit, state)
