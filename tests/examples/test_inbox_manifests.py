"""The demo's manifests compile, strictly, to a server exposing exactly two inbox tools."""

from __future__ import annotations

from portcullis.api.manifests import load_manifests
from portcullis.compile import compile_strict

from tests.support.servers import REPO_ROOT

MANIFESTS = REPO_ROOT / "examples" / "inbox" / "manifests"


def test_the_demo_manifests_expose_exactly_two_inbox_tools() -> None:
    manifests = load_manifests([MANIFESTS])
    assert [(s.metadata.namespace, s.metadata.name) for s in manifests.servers] == [("demo", "summarizer")]
    config = compile_strict(manifests.servers[0], manifests.mappings, manifests.connections)
    assert [(t.name, t.upstream_name, t.connection) for t in config.tools] == [
        ("inbox_fetch_mails", "fetch_mails", "inbox"),
        ("search_mails", "search_mails", "inbox"),
    ]
    assert config.prompts == () and config.resources == ()


def test_the_inbox_connection_sends_each_users_own_bearer_credential() -> None:
    (connection,) = load_manifests([MANIFESTS]).connections
    assert connection.metadata.name == "inbox"
    assert connection.spec.url == "http://127.0.0.1:8765/mcp"
    credential = connection.spec.credential
    assert (credential.source, credential.header, credential.scheme) == ("user", "Authorization", "Bearer")
