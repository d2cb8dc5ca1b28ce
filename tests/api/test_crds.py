"""The generated CRDs: up to date on disk, valid for Kubernetes, and as strict as the models."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel, ValidationError

from portcullis.api.crd import crd_files, generate_crds, main, structural_schema
from portcullis.api.resources import parse_resource
from tests.support.crd_schema import HAVE_CEL, admit, openapi_schema, resolve_json_path, structural_problems

ROOT = Path(__file__).resolve().parents[2]
CRDS_DIR = ROOT / "crds"
EXAMPLES_DIR = ROOT / "examples"
KINDS = ("MCPConnection", "VirtualMCPServer", "ToolMapping")
# Oldest Kubernetes whose CRD schema accepts ours, the version we test against, the newest known.
K8S_VERSIONS = ("1.25", "1.33", "1.37")

needs_cel = pytest.mark.skipif(not HAVE_CEL, reason="cel-python is not installed: CEL rules cannot be evaluated")


def crd_of(kind: str) -> dict[str, Any]:
    return next(c for c in generate_crds() if c["spec"]["names"]["kind"] == kind)


def example_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(EXAMPLES_DIR.rglob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") in KINDS)
    return docs


# --- on disk -------------------------------------------------------------------------------


def test_crds_directory_matches_the_models() -> None:
    on_disk = {p.name: p.read_text() for p in CRDS_DIR.glob("*.yaml")}
    assert on_disk == crd_files(), "crds/ is stale: run python -m portcullis.api.crd --write crds/"


def test_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    assert main(["--write", str(tmp_path)]) == 0
    assert main(["--check", str(tmp_path)]) == 0
    victim = sorted(tmp_path.iterdir())[0]
    victim.write_text(victim.read_text().replace("maxLength: 2048", "maxLength: 4096"))
    (tmp_path / sorted(crd_files())[1]).unlink()
    assert main(["--check", str(tmp_path)]) == 1


def test_generation_is_deterministic() -> None:
    assert crd_files() == crd_files()
    assert [yaml.safe_load(text) for text in crd_files().values()] == generate_crds()


def test_print_mode_writes_every_crd(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert docs == generate_crds()


# --- as Kubernetes sees the CRD itself -------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_crd_is_a_valid_custom_resource_definition(kind: str, version: str) -> None:
    kubernetes_validate.validate(crd_of(kind), version, strict=True)


@pytest.mark.parametrize("kind", KINDS)
def test_schema_is_structural(kind: str) -> None:
    assert structural_problems(openapi_schema(crd_of(kind))) == []


def test_structural_check_catches_what_kubernetes_rejects() -> None:
    bad = {"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}]}, "b": {"type": "object"}}}
    problems = structural_problems(bad)
    assert any("anyOf" in p for p in problems)
    assert any(".b: object without properties" in p for p in problems)


def test_names_short_names_and_category() -> None:
    names = {c["spec"]["names"]["kind"]: c["spec"]["names"] for c in generate_crds()}
    assert {k: (n["plural"], n["shortNames"], n["categories"]) for k, n in names.items()} == {
        "MCPConnection": ("mcpconnections", ["mcpconn"], ["portcullis"]),
        "VirtualMCPServer": ("virtualmcpservers", ["pvmcp"], ["portcullis"]),
        "ToolMapping": ("toolmappings", ["tmap"], ["portcullis"]),
    }
    for crd in generate_crds():
        assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.portcullis.dev"
        (version,) = crd["spec"]["versions"]
        assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
        assert version["subresources"] == {"status": {}}


def test_printer_columns() -> None:
    columns = {
        c["spec"]["names"]["kind"]: [col["name"] for col in c["spec"]["versions"][0]["additionalPrinterColumns"]
                                     if not col.get("priority")]
        for c in generate_crds()
    }
    assert columns == {
        "MCPConnection": ["URL", "Accepted", "Age"],
        "VirtualMCPServer": ["URL", "Ready", "Tools", "Age"],
        "ToolMapping": ["Server", "Connection", "Accepted", "Age"],
    }


@pytest.mark.parametrize("kind", KINDS)
def test_every_printer_column_points_at_a_declared_field(kind: str) -> None:
    crd = crd_of(kind)
    schema = openapi_schema(crd)
    for column in crd["spec"]["versions"][0]["additionalPrinterColumns"]:
        if column["jsonPath"].startswith(".metadata."):
            continue
        node = resolve_json_path(schema, column["jsonPath"])
        assert node is not None, f"{kind} column {column['name']}: {column['jsonPath']} is not in the schema"
        assert node["type"] == column["type"]


def test_descriptions_reach_kubectl_explain() -> None:
    spec = openapi_schema(crd_of("VirtualMCPServer"))["properties"]["spec"]
    assert spec["properties"]["autoscaling"]["description"] == "Run an HPA instead of a fixed replica count."
    assert spec["properties"]["autoscaling"]["properties"]["maxReplicas"]["description"] == "Upper bound of replicas."
    item = openapi_schema(crd_of("ToolMapping"))["properties"]["spec"]["properties"]["tools"]["items"]
    assert item["description"] == "One upstream tool to expose."


def test_no_field_preserves_unknown_fields() -> None:
    assert "preserve-unknown-fields" not in "".join(crd_files().values())


def test_status_schema_has_what_the_operator_reports() -> None:
    status = openapi_schema(crd_of("VirtualMCPServer"))["properties"]["status"]["properties"]
    assert list(status) == ["observedGeneration", "phase", "url", "conditions", "tools", "toolsSummary"]
    assert status["phase"]["enum"] == ["Pending", "Ready", "Degraded", "Failed"]
    assert list(status["tools"]["properties"]) == ["exposed", "upstream", "schemaTokens"]
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    condition = status["conditions"]["items"]["properties"]
    assert list(condition) == ["type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"]
    for kind in ("ToolMapping", "MCPConnection"):
        assert list(openapi_schema(crd_of(kind))["properties"]["status"]["properties"]) == [
            "observedGeneration", "conditions",
        ]


def test_status_has_no_defaults() -> None:
    # The API server would fill them in on every write: an unknown upstream count would read 0.
    for crd in generate_crds():
        assert "default:" not in yaml.safe_dump(openapi_schema(crd)["properties"]["status"])


def test_a_status_the_operator_writes_is_accepted() -> None:
    doc: dict[str, Any] = {
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "VirtualMCPServer",
        "metadata": {"name": "summarizer", "namespace": "acme"},
        "spec": {},
        "status": {
            "observedGeneration": 3,
            "phase": "Ready",
            "url": "http://summarizer.acme.svc:8080/mcp",
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "DeploymentAvailable", "message": "2/2 replicas",
                 "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 3},
            ],
            "tools": {"exposed": 1, "upstream": 30, "schemaTokens": {"exposed": 180, "upstream": 6100}},
            "toolsSummary": "1/30",
        },
    }
    assert admit(doc, crd_of("VirtualMCPServer")) == []
    doc["status"]["phase"] = "Running"
    assert admit(doc, crd_of("VirtualMCPServer")) != []


def test_cel_rules_sit_on_the_models_they_restate() -> None:
    spec = openapi_schema(crd_of("MCPConnection"))["properties"]["spec"]
    assert [r["message"] for r in spec["properties"]["credential"]["x-kubernetes-validations"]] == [
        "secretRef is required when source is shared, and only allowed then",
        "oauth is required when source is oauth, and only allowed then",
    ]
    oauth = spec["properties"]["credential"]["properties"]["oauth"]
    assert len(oauth["x-kubernetes-validations"]) == 3
    vmcp = openapi_schema(crd_of("VirtualMCPServer"))["properties"]["spec"]
    assert len(vmcp["properties"]["autoscaling"]["x-kubernetes-validations"]) == 1


def test_a_cel_rule_for_a_model_no_crd_uses_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from portcullis.api import crd as module
    from portcullis.api.config import ServerInfo

    rules: dict[type[BaseModel], list[dict[str, Any]]] = module._CEL_RULES
    unused: type[BaseModel] = ServerInfo
    monkeypatch.setitem(rules, unused, [{"rule": "true"}])
    with pytest.raises(ValueError, match="ServerInfo"):
        generate_crds()


def test_structural_schema_of_a_plain_model() -> None:
    from portcullis.api.resources import LocalObjectReference

    assert structural_schema(LocalObjectReference) == {
        "description": "A reference to an object in the same namespace.",
        "type": "object",
        "properties": {
            "name": {
                "description": "Name of the object.",
                "type": "string",
                "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
                "minLength": 1,
                "maxLength": 253,
            }
        },
        "required": ["name"],
    }


# --- custom objects against the schema -------------------------------------------------------


def test_there_are_examples_of_every_kind() -> None:
    assert {d["kind"] for d in example_docs()} == set(KINDS)


@pytest.mark.parametrize("doc", example_docs(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_examples_are_admitted_and_parse(doc: dict[str, Any]) -> None:
    assert admit(doc, crd_of(doc["kind"])) == []
    parse_resource(doc)


def test_defaults_are_filled_in_like_the_model_does() -> None:
    from tests.support.crd_schema import apply_defaults

    doc = {"spec": {"autoscaling": {"maxReplicas": 3}}}
    schema = openapi_schema(crd_of("VirtualMCPServer"))
    defaulted = apply_defaults(copy.deepcopy(doc), schema)
    model = parse_resource({"kind": "VirtualMCPServer", "metadata": {"name": "x"}, **doc})
    assert defaulted["spec"] == model.model_dump(by_alias=True, exclude_none=True)["spec"]


def _obj(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "portcullis.dev/v1alpha1", "kind": kind, "metadata": {"name": "x", "namespace": "acme"}, "spec": spec}


REFS = {"serverRef": {"name": "s"}, "connectionRef": {"name": "c"}}
SHARED = {"name": "key", "key": "token"}

# (kind, spec, the field the error names). Each is rejected by the model too.
REJECTED_BY_SCHEMA: dict[str, tuple[str, dict[str, Any], str]] = {
    "bad credential source": ("MCPConnection", {"url": "http://u/mcp", "credential": {"source": "ldap"}}, "source"),
    "url without scheme": ("MCPConnection", {"url": "gmail-mcp:8080"}, "url"),
    "timeout too long": ("MCPConnection", {"url": "http://u", "timeoutSeconds": 601}, "timeoutSeconds"),
    "header with a space": ("MCPConnection", {"url": "http://u", "credential": {"header": "X Key"}}, "header"),
    "missing url": ("MCPConnection", {}, "url"),
    "too many replicas": ("VirtualMCPServer", {"replicas": 101}, "replicas"),
    "negative replicas": ("VirtualMCPServer", {"replicas": -1}, "replicas"),
    "autoscaling without max": ("VirtualMCPServer", {"autoscaling": {"minReplicas": 2}}, "maxReplicas"),
    "cpu target over 100": (
        "VirtualMCPServer", {"autoscaling": {"maxReplicas": 2, "targetCPUUtilizationPercentage": 120}}, "targetCPU"
    ),
    "duration in words": ("VirtualMCPServer", {"sessionTokens": {"defaultTTL": "15 minutes"}}, "defaultTTL"),
    "vault namespace with capitals": ("VirtualMCPServer", {"vault": {"namespace": "Acme"}}, "namespace"),
    "unknown field": ("VirtualMCPServer", {"replica": 2}, "replica"),
    "oidc without an issuer": ("VirtualMCPServer", {"auth": {"oidc": {"userClaim": "email"}}}, "issuer"),
    "oidc skew over five minutes": ("VirtualMCPServer", {"auth": {"oidc": {"issuer": "https://i", "clockSkewSeconds": 600}}}, "clockSkewSeconds"),
    "mapping without server": ("ToolMapping", {"connectionRef": {"name": "c"}}, "serverRef"),
    "empty tool name": ("ToolMapping", {**REFS, "tools": [{"name": ""}]}, "name"),
    "bad server name": ("ToolMapping", {"serverRef": {"name": "Summarizer"}, "connectionRef": {"name": "c"}}, "name"),
    "quantity in words": ("VirtualMCPServer", {"resources": {"limits": {"memory": "lots"}}}, "memory"),
    "negative quantity": ("VirtualMCPServer", {"resources": {"requests": {"cpu": "-1"}}}, "cpu"),
    "quantity as a number": ("VirtualMCPServer", {"resources": {"limits": {"cpu": 1}}}, "cpu"),
    "resources claims": ("VirtualMCPServer", {"resources": {"claims": [{"name": "gpu"}]}}, "claims"),
}

OAUTH = "https://as.example/oauth"
REJECTED_BY_CEL: dict[str, tuple[str, dict[str, Any], str]] = {
    "oauth without its settings": ("MCPConnection", {"url": "http://u", "credential": {"source": "oauth"}}, "oauth"),
    "oauth settings on a user secret": (
        "MCPConnection", {"url": "http://u", "credential": {"source": "user", "oauth": {}}}, "oauth"
    ),
    "oauth with half its endpoints": (
        "MCPConnection", {"url": "http://u", "credential": {"source": "oauth", "oauth": {"tokenEndpoint": f"{OAUTH}/token"}}}, "oauth"
    ),
    "explicit endpoints without a client": (
        "MCPConnection",
        {"url": "http://u", "credential": {"source": "oauth", "oauth": {
            "authorizationEndpoint": f"{OAUTH}/authorize", "tokenEndpoint": f"{OAUTH}/token"}}},
        "clientId",
    ),
    "client secret without a client": (
        "MCPConnection",
        {"url": "http://u", "credential": {"source": "oauth", "oauth": {"clientSecretRef": SHARED}}},
        "clientSecretRef",
    ),
    "shared without secretRef": ("MCPConnection", {"url": "http://u", "credential": {"source": "shared"}}, "secretRef"),
    "user with secretRef": (
        "MCPConnection", {"url": "http://u", "credential": {"source": "user", "secretRef": SHARED}}, "secretRef"
    ),
    "secretRef with the default source": ("MCPConnection", {"url": "http://u", "credential": {"secretRef": SHARED}}, "secretRef"),
    "min above max": ("VirtualMCPServer", {"autoscaling": {"minReplicas": 5, "maxReplicas": 3}}, "minReplicas"),
}

ACCEPTED: dict[str, tuple[str, dict[str, Any]]] = {
    "oauth, discovered, dynamic client": ("MCPConnection", {"url": "https://u/mcp", "credential": {"source": "oauth", "oauth": {}}}),
    "oauth, explicit, confidential client": (
        "MCPConnection",
        {"url": "https://u/mcp", "credential": {"source": "oauth", "oauth": {
            "authorizationEndpoint": f"{OAUTH}/authorize", "tokenEndpoint": f"{OAUTH}/token",
            "clientId": "portcullis", "clientSecretRef": SHARED, "scopes": ["repo", "read:org"]}}},
    ),
    "callback URL": ("VirtualMCPServer", {"connectedAccounts": {"callbackURL": "https://agents.example/oauth/callback"}}),
    "oidc sign-in": (
        "VirtualMCPServer",
        {"auth": {"oidc": {"issuer": "https://login.example/realms/acme", "userClaim": "email", "requiredScopes": ["mcp:tools"],
                           "requiredGroup": "mcp-users", "clockSkewSeconds": 30}}},
    ),
    "minimal connection": ("MCPConnection", {"url": "https://u/mcp"}),
    "shared with secretRef": ("MCPConnection", {"url": "http://u", "credential": {"source": "shared", "secretRef": SHARED}}),
    "empty scheme": ("MCPConnection", {"url": "http://u", "credential": {"source": "user", "scheme": ""}}),
    "empty server": ("VirtualMCPServer", {}),
    "zero replicas": ("VirtualMCPServer", {"replicas": 0}),
    "min equals max": ("VirtualMCPServer", {"autoscaling": {"minReplicas": 3, "maxReplicas": 3}}),
    "compound duration": ("VirtualMCPServer", {"sessionTokens": {"defaultTTL": "1h30m", "maxTTL": "7d"}}),
    "resources": (
        "VirtualMCPServer",
        {"resources": {"requests": {"cpu": "0.5", "memory": "256Mi"}, "limits": {"cpu": "2", "memory": "1Gi", "ephemeral-storage": "1e9"}}},
    ),
    "limits only": ("VirtualMCPServer", {"resources": {"limits": {"memory": "512Mi"}}}),
    "renamed tool": ("ToolMapping", {**REFS, "tools": [{"name": "a", "as": "b", "description": "d"}]}),
    "prompts and resources": ("ToolMapping", {**REFS, "prompts": [{"name": "p"}], "resources": [{"uri": "file:///x"}]}),
}


@pytest.mark.parametrize("case", sorted(REJECTED_BY_SCHEMA))
def test_schema_rejects_what_the_model_rejects(case: str) -> None:
    kind, spec, field = REJECTED_BY_SCHEMA[case]
    problems = admit(_obj(kind, spec), crd_of(kind), cel=False)
    assert problems and any(field in p for p in problems), problems
    with pytest.raises(ValidationError):
        parse_resource(_obj(kind, spec))


@needs_cel
@pytest.mark.parametrize("case", sorted(REJECTED_BY_CEL))
def test_cel_rules_reject_what_the_model_rejects(case: str) -> None:
    kind, spec, field = REJECTED_BY_CEL[case]
    assert admit(_obj(kind, spec), crd_of(kind), cel=False) == []  # only the rule catches it
    problems = admit(_obj(kind, spec), crd_of(kind))
    assert problems and any(field in p for p in problems), problems
    with pytest.raises(ValidationError):
        parse_resource(_obj(kind, spec))


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_schema_accepts_what_the_model_accepts(case: str) -> None:
    kind, spec = ACCEPTED[case]
    assert admit(_obj(kind, spec), crd_of(kind)) == []
    parse_resource(_obj(kind, spec))


def test_known_gap_a_request_above_its_limit_is_left_to_the_operator() -> None:
    # CEL's quantity() needs Kubernetes 1.29 (the CRDs serve 1.25): the model refuses it, and the
    # operator reports InvalidSpec instead of having the Deployment refused mid-reconcile.
    doc = _obj("VirtualMCPServer", {"resources": {"requests": {"memory": "1Gi"}, "limits": {"memory": "512Mi"}}})
    assert admit(doc, crd_of("VirtualMCPServer")) == []
    with pytest.raises(ValidationError, match=r"requests.memory \(1Gi\) must not exceed limits.memory \(512Mi\)"):
        parse_resource(doc)


def test_resources_have_no_default_so_the_operators_applies() -> None:
    spec = openapi_schema(crd_of("VirtualMCPServer"))["properties"]["spec"]["properties"]["resources"]
    assert "default" not in spec
    assert parse_resource(_obj("VirtualMCPServer", {})).spec.resources is None  # type: ignore[union-attr]


def test_known_gap_ttl_order_is_left_to_the_operator() -> None:
    # CEL's duration() has no `d` unit, so defaultTTL <= maxTTL is checked by the model only.
    doc = _obj("VirtualMCPServer", {"sessionTokens": {"defaultTTL": "2h", "maxTTL": "1h"}})
    assert admit(doc, crd_of("VirtualMCPServer")) == []
    with pytest.raises(ValidationError, match="defaultTTL must not exceed maxTTL"):
        parse_resource(doc)
