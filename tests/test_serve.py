"""`portcullis serve`'s public URL: the tokens' audience, the RFC 9728 resource and the allowed Origin.

By default it is the address the gateway bound. Given one (`public_url`, `serve --url`),
as every replica behind a load balancer must be, it is what agents see, while the
replica still listens, and is reached directly, on its own port.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml

from portcullis.gateway.audit import MemoryAuditSink
from portcullis.gateway.local import admin_secret
from portcullis.serve import LocalGateway, ServeError, check_public_url, local_gateway
from tests.support.servers import load_example, run_asgi

fixture = load_example("examples/fixture/server.py")
PUBLIC = "http://lb.example:9000/mcp"
LIST = {
    "jsonrpc": "2.0", "id": 1, "method": "tools/list",
    "params": {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}},
}
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
           "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/list"}


def manifests(fixture_url: str) -> list[dict[str, Any]]:
    meta = {"namespace": "acme"}
    return [
        {"apiVersion": "portcullis.dev/v1alpha1", "kind": "MCPConnection", "metadata": {"name": "fixture", **meta},
         "spec": {"url": fixture_url, "timeoutSeconds": 5, "credential": {"source": "none"}}},
        {"apiVersion": "portcullis.dev/v1alpha1", "kind": "VirtualMCPServer", "metadata": {"name": "behind", **meta},
         "spec": {"sessionTokens": {"defaultTTL": "15m", "maxTTL": "1h"}}},
        {"apiVersion": "portcullis.dev/v1alpha1", "kind": "ToolMapping", "metadata": {"name": "behind-fixture", **meta},
         "spec": {"serverRef": {"name": "behind"}, "connectionRef": {"name": "fixture"}, "tools": [{"name": "test_simple_text"}]}},
    ]


@contextmanager
def serving(tmp_path: Path, public_url: str | None) -> Iterator[LocalGateway]:
    with run_asgi(fixture.build_app()) as fixture_url:
        path = tmp_path / "manifests.yaml"
        path.write_text(yaml.safe_dump_all(manifests(fixture_url)))
        with local_gateway([path], state_dir=tmp_path / "state", port=0, admin_port=0, audit=MemoryAuditSink(),
                           public_url=public_url) as gw:
            yield gw


def mint(gw: LocalGateway, state: Path) -> dict[str, Any]:
    request = urllib.request.Request(
        gw.admin_url + "/v1/tokens", data=json.dumps({"user": "ada@example.com"}).encode(), method="POST",
        headers={"Authorization": f"Bearer {admin_secret(state)}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def post(url: str, token: str | None = None, **headers: str) -> httpx2.Response:
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx2.post(url, json=LIST, headers={**HEADERS, **auth, **headers}, timeout=10)


def test_a_public_url_is_what_agents_see_while_the_replica_listens_on_its_own_port(tmp_path: Path) -> None:
    with serving(tmp_path, PUBLIC) as gw:
        assert gw.public_url == gw.gateway.config.server.url == PUBLIC
        assert gw.url.startswith("http://127.0.0.1:") and gw.url.endswith("/mcp")

        minted = mint(gw, tmp_path / "state")
        assert minted["audience"] == PUBLIC
        assert post(gw.url, minted["token"]).status_code == 200  # reached on its bound port, audience the public URL

        base = gw.url.removesuffix("/mcp")
        document = httpx2.get(base + "/.well-known/oauth-protected-resource/mcp", timeout=10).json()
        assert document["resource"] == PUBLIC
        challenge = post(gw.url).headers["WWW-Authenticate"]
        assert 'resource_metadata="http://lb.example:9000/.well-known/oauth-protected-resource/mcp"' in challenge

        # A page of the balancer's origin is allowed; a foreign one is not; a replica bound to
        # loopback still accepts loopback pages, as it does without a public URL.
        assert post(gw.url, minted["token"], Origin="http://lb.example:9000").status_code == 200
        assert post(gw.url, minted["token"], Origin="http://localhost:3000").status_code == 200
        assert post(gw.url, minted["token"], Origin="http://evil.example.com").status_code == 403


def test_without_a_public_url_the_bound_address_is_the_audience(tmp_path: Path) -> None:
    with serving(tmp_path, None) as gw:
        assert gw.public_url == gw.url == gw.gateway.config.server.url
        assert mint(gw, tmp_path / "state")["audience"] == gw.url


@pytest.mark.parametrize("url", ["http://lb:9000/mcp", "https://mcp.example.com/acme/mcp", "http://[::1]:9000/mcp"])
def test_a_public_url_is_an_http_or_https_url_with_a_host_and_a_path(url: str) -> None:
    assert check_public_url(url) == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("lb:9000/mcp", "not an http:// or https:// URL"),
        ("ftp://lb/mcp", "not an http:// or https:// URL"),
        ("http:///mcp", "not an http:// or https:// URL"),
        ("http://lb:9000", "has no path"),
        ("http://lb:9000/", "has no path"),
        ("http://lb:port/mcp", "invalid port"),
        ("http://user:pw@lb/mcp", "no user name or password"),
        ("http://lb/mcp?x=1", "query or fragment"),
    ],
)
def test_a_url_that_cannot_be_public_is_refused_saying_why(url: str, why: str) -> None:
    with pytest.raises(ServeError, match=why):
        check_public_url(url)


def test_a_bad_public_url_is_refused_before_anything_is_bound(tmp_path: Path) -> None:
    with pytest.raises(ServeError, match="has no path"):
        with local_gateway([tmp_path], state_dir=tmp_path / "state", port=0, admin_port=0, public_url="http://lb:9000"):
            pass
    assert not (tmp_path / "state").exists()
