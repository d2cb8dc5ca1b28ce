"""compile(): the custom resources in, the gateway config out; problems name object and field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from portcullis.api.resources import MCPConnection, ToolMapping, VirtualMCPServer
from portcullis.api.status import Reason
from portcullis.compile import CompileError, compile, compile_strict, orphan_mappings


def server(name: str = "summarizer", ns: str = "acme", **spec: Any) -> VirtualMCPServer:
    return VirtualMCPServer.model_validate({"metadata": {"name": name, "namespace": ns}, "spec": spec})


def connection(name: str = "gmail", ns: str = "acme", source: str = "user") -> MCPConnection:
    return MCPConnection.model_validate(
        {"metadata": {"name": name, "namespace": ns}, "spec": {"url": f"http://{name}.tools.svc:8080/mcp", "credential": {"source": source}}}
    )


def mapping(name: str, tools: list[dict[str, Any]], *, server_name: str = "summarizer", conn: str = "gmail", ns: str = "acme", **extra: Any) -> ToolMapping:
    return ToolMapping.model_validate(
        {
            "metadata": {"name": name, "namespace": ns},
            "spec": {"serverRef": {"name": server_name}, "connectionRef": {"name": conn}, "tools": tools, **extra},
        }
    )


def test_exposed_tools_are_sorted_renamed_and_tied_to_their_connection() -> None:
    result = compile(
        server(),
        [mapping("m", [{"name": "send"}, {"name": "fetch_mails", "as": "gmail_fetch", "description": "Read mail"}])],
        [connection()],
    )
    assert result.problems == ()
    assert [(t.name, t.upstream_name, t.connection, t.description) for t in result.config.tools] == [
        ("gmail_fetch", "fetch_mails", "gmail", "Read mail"),
        ("send", "send", "gmail", None),
    ]
    assert result.config.server.url == "http://summarizer.acme.svc:8080/mcp"
    assert result.config.tenant == "acme"
    assert list(result.config.connections) == ["gmail"]


def test_unknown_connection_is_reported_and_other_mappings_still_compile() -> None:
    result = compile(
        server(),
        [mapping("good", [{"name": "fetch"}]), mapping("bad", [{"name": "x"}], conn="nope")],
        [connection()],
    )
    assert [(p.kind, p.name, p.field, p.reason) for p in result.problems] == [
        ("ToolMapping", "bad", "spec.connectionRef.name", Reason.CONNECTION_NOT_FOUND)
    ]
    assert [t.name for t in result.config.tools] == ["fetch"]
    assert result.accepted_mappings == ("good",)


def test_two_mappings_exposing_one_name_is_a_duplicate_naming_both() -> None:
    result = compile(
        server(),
        [mapping("a", [{"name": "fetch"}]), mapping("b", [{"name": "other", "as": "fetch"}], conn="drive")],
        [connection(), connection("drive")],
    )
    (problem,) = result.problems
    assert (problem.name, problem.field, problem.reason) == ("b", "spec.tools[0].as", Reason.DUPLICATE_TOOL_NAME)
    assert "ToolMapping 'a'" in problem.message


def test_invalid_exposed_name_is_an_error_with_the_rule() -> None:
    with pytest.raises(CompileError) as caught:
        compile_strict(server(), [mapping("m", [{"name": "fetch", "as": "fetch mails!"}])], [connection()])
    (problem,) = caught.value.problems
    assert problem.reason == Reason.INVALID_TOOL_NAME
    assert "1-128 of A-Z a-z 0-9 _ . -" in str(caught.value)
    assert "ToolMapping/m: spec.tools[0].as" in str(caught.value)


def test_a_name_of_128_characters_is_accepted_and_129_rejected_by_the_model() -> None:
    ok = compile(server(), [mapping("m", [{"name": "t", "as": "a" * 127 + "."}])], [connection()])
    assert ok.problems == ()
    with pytest.raises(ValidationError, match="at most 128 characters"):
        mapping("m", [{"name": "t", "as": "a" * 129}])


def test_mappings_of_other_servers_and_namespaces_are_ignored() -> None:
    result = compile(
        server(),
        [mapping("other-server", [{"name": "a"}], server_name="x"), mapping("other-ns", [{"name": "b"}], ns="beta")],
        [connection()],
    )
    assert result.config.tools == ()
    assert result.problems == ()


def test_orphan_mapping_names_its_missing_server() -> None:
    (problem,) = orphan_mappings([server()], [mapping("m", [{"name": "a"}], server_name="ghost")])
    assert problem.reason == Reason.SERVER_NOT_FOUND
    assert "ghost" in problem.message


def test_compile_is_deterministic() -> None:
    maps = [mapping("b", [{"name": "z"}, {"name": "a"}]), mapping("a", [{"name": "m"}], conn="drive")]
    first = compile(server(), maps, [connection(), connection("drive")]).config.model_dump_json()
    second = compile(server(), list(reversed(maps)), [connection("drive"), connection()]).config.model_dump_json()
    assert first == second


def test_user_connections_lists_only_per_user_credentials_in_use() -> None:
    config = compile(
        server(),
        [mapping("a", [{"name": "x"}]), mapping("b", [{"name": "y"}], conn="public")],
        [connection(), connection("public", source="none"), connection("unused")],
    ).config
    assert config.user_connections() == ["gmail"]


def test_token_policy_and_vault_namespace_come_from_the_server() -> None:
    config = compile(
        server(sessionTokens={"defaultTTL": "5m", "maxTTL": "2h"}, vault={"namespace": "acme-vault"}), [], []
    ).config
    assert (config.tokens.default_ttl_seconds, config.tokens.max_ttl_seconds) == (300, 7200)
    assert config.vault_namespace == "acme-vault"


def test_resource_templates_are_denied_by_default_and_exposed_as_listed() -> None:
    templates = [{"uriTemplate": "gmail://mails/{id}"}, {"uriTemplate": "gmail://labels/{label}/mails"}]
    none = compile(server(), [mapping("m", [{"name": "send"}])], [connection()])
    listed = compile(server(), [mapping("m", [{"name": "send"}], resourceTemplates=templates)], [connection()])
    assert none.config.resource_templates == ()
    assert [(t.uri_template, t.connection, t.mapping) for t in listed.config.resource_templates] == [
        ("gmail://labels/{label}/mails", "gmail", "m"),
        ("gmail://mails/{id}", "gmail", "m"),
    ]


def test_a_connection_used_only_by_a_template_still_needs_the_users_credential() -> None:
    only_template = mapping("m", [], resourceTemplates=[{"uriTemplate": "gmail://mails/{id}"}])
    config = compile(server(), [only_template], [connection()]).config
    assert config.user_connections() == ["gmail"]


@pytest.mark.parametrize("template", ["gmail://mails/{id", "gmail://mails/{}", "gmail://{a{b}}", ""])
def test_a_template_with_unbalanced_or_empty_braces_is_refused(template: str) -> None:
    with pytest.raises(ValidationError):
        mapping("m", [], resourceTemplates=[{"uriTemplate": template}])


def test_the_tenant_key_secret_is_compiled_and_may_not_pose_as_a_credential() -> None:
    from pydantic import ValidationError

    from portcullis.api.resources import VaultSpec

    compiled = compile_strict(
        server(vault={"namespace": "acme-vault", "tenantKeySecret": "acme-sealing-key"}),
        [mapping("m", [{"name": "fetch"}])], [connection()],
    )
    assert (compiled.vault_namespace, compiled.vault_key_secret) == ("acme-vault", "acme-sealing-key")
    assert VaultSpec.model_validate({}).tenant_key_secret == "portcullis-tenant-key"
    assert VaultSpec.model_validate({"tenantKeySecret": "acme-sealing-key"}).tenant_key_secret == "acme-sealing-key"
    with pytest.raises(ValidationError, match="portcullis-cred-"):
        VaultSpec.model_validate({"tenantKeySecret": "portcullis-cred-0123456789abcdef"})


def test_oidc_sign_in_defaults_its_audience_to_the_server_url() -> None:
    from portcullis.api.resources import VirtualMCPServer
    from portcullis.compile import compile as compile_config

    server = VirtualMCPServer.model_validate(
        {"metadata": {"name": "triage", "namespace": "acme"}, "spec": {"auth": {"oidc": {"issuer": "https://login.example"}}}}
    )
    config = compile_config(server, [], [], url="https://agents.example/mcp").config
    assert config.oidc is not None
    assert (config.oidc.issuer, config.oidc.audience, config.oidc.user_claim) == ("https://login.example", "https://agents.example/mcp", "sub")
    explicit = server.model_copy(update={"spec": server.spec.model_copy(update={"auth": type(server.spec.auth).model_validate(
        {"oidc": {"issuer": "https://login.example", "audience": "api://triage"}})})})
    assert compile_config(explicit, [], [], url="https://agents.example/mcp").config.oidc.audience == "api://triage"  # type: ignore[union-attr]
    plain = VirtualMCPServer.model_validate({"metadata": {"name": "triage", "namespace": "acme"}})
    assert compile_config(plain, [], []).config.oidc is None
