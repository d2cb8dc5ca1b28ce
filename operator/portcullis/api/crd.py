"""CustomResourceDefinitions, generated from the API models.

The pydantic models in `api.resources` are the single source of truth; this module turns
their JSON Schema into the *structural* OpenAPI v3 schema the Kubernetes API server
demands, so the cluster rejects what `portcullis serve` would reject. The translation:

- `$ref`s are inlined: structural schemas allow no references.
- `anyOf: [X, null]` (pydantic's spelling of `X | None`) becomes plain `X`. A null sent by
  a client is pruned by the API server before validation, which is what `None` means here.
- `additionalProperties: false` is dropped: structural schemas forbid it next to
  `properties`; the API server prunes unknown fields instead, and `kubectl apply`
  (field validation `Strict`) reports them to the user.
- `const` becomes a one-value `enum`; JSON Schema's numeric `exclusiveMinimum` becomes
  OpenAPI v3's boolean form.
- Pydantic `title`s are dropped; descriptions are kept (the field's, else the model's
  docstring) so `kubectl explain` reads like the model's documentation.
- A field with a `default_factory` (no `default` in JSON Schema, not required, an object)
  gets `default: {}`, so the API server fills in the nested defaults exactly as pydantic
  does and `kubectl get -o yaml` shows the effective values.
- Rules that span two fields, which pydantic states as model validators, are restated in
  CEL (`x-kubernetes-validations`) in `_CEL_RULES`, keyed by model. Three are not:
  `defaultTTL <= maxTTL` (CEL's `duration()` has no `d` unit, which the pattern allows),
  `replicas` vs `autoscaling` (`replicas` has a default, so "set both" cannot be told
  apart from "set autoscaling"), and a resource request within its limit (CEL's
  `quantity()` needs Kubernetes 1.29, the chart supports 1.25); the operator reports those
  as conditions.

Status is not part of any spec model, so its models live here (`VirtualMCPServerStatus`,
`ResourceStatus`): they describe what the operator writes, and the printer columns read
them. `x-kubernetes-preserve-unknown-fields` appears nowhere: every field is declared.

Output is deterministic (model field order, no timestamps), so `crds/` can be checked for
staleness by regenerating and comparing bytes: `python -m portcullis.api.crd --check crds/`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field

from portcullis.api.resources import (
    GROUP,
    VERSION,
    AuditSpec,
    AutoscalingSpec,
    CredentialSpec,
    LimitsSpec,
    MCPConnection,
    OAuthSpec,
    ToolMapping,
    VaultSpec,
    VirtualMCPServer,
    WireModel,
)
from portcullis.api.status import ConditionType, Phase

JSON = dict[str, Any]

CATEGORY = "portcullis"
HEADER = "# Generated from the models in portcullis.api by `python -m portcullis.api.crd --write crds/`.\n# Do not edit: change the models and regenerate.\n"

# --- status models ------------------------------------------------------------------------

# metav1.Condition's own bounds, so conditions look and validate like the built-in ones.
_CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
_CONDITION_TYPE_PATTERN = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"


class Condition(WireModel):
    """One aspect of the object's state, in the shape of Kubernetes' metav1.Condition."""

    type: Annotated[
        str,
        Field(
            max_length=316,
            pattern=_CONDITION_TYPE_PATTERN,
            description=f"Kind of condition: {', '.join(t.value for t in ConditionType)}.",
        ),
    ]
    status: Annotated[Literal["True", "False", "Unknown"], Field(description="True, False or Unknown.")]
    reason: Annotated[
        str | None,
        Field(
            max_length=1024,
            pattern=_CONDITION_REASON_PATTERN,
            description="Machine-readable CamelCase reason for the last transition.",
        ),
    ] = None
    message: Annotated[
        str | None, Field(max_length=32768, description="Human-readable details of the last transition.")
    ] = None
    last_transition_time: Annotated[
        datetime | None, Field(description="When the status last changed.")
    ] = None
    observed_generation: Annotated[
        int | None, Field(ge=0, description="metadata.generation the condition was computed from.")
    ] = None


_CONDITIONS_FIELD = Field(
    max_length=32,
    description="Current conditions, one per type.",
    json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
)


class SchemaTokens(WireModel):
    """Estimated tokens the tool schemas cost an agent's context."""

    exposed: Annotated[int | None, Field(ge=0, description="Tokens of the exposed tools' schemas.")] = None
    upstream: Annotated[int | None, Field(ge=0, description="Tokens of all upstream tools' schemas.")] = None


class ToolCounts(WireModel):
    """How much of the upstreams' tool surface this server exposes."""

    # No defaults: an absent count means "not known yet", which 0 would misstate.
    exposed: Annotated[int | None, Field(ge=0, description="Tools agents see.")] = None
    upstream: Annotated[
        int | None, Field(ge=0, description="Tools the mapped connections offer; absent until a gateway reports.")
    ] = None
    schema_tokens: Annotated[SchemaTokens | None, Field(description="Tool-schema size, exposed vs upstream.")] = None


class VirtualMCPServerStatus(WireModel):
    """Observed state of a VirtualMCPServer, written by the operator."""

    observed_generation: Annotated[
        int | None, Field(ge=0, description="metadata.generation last reconciled.")
    ] = None
    phase: Annotated[Phase | None, Field(description="Summary of the conditions.")] = None
    url: Annotated[str | None, Field(description="MCP endpoint agents connect to (the mcp_server_url).")] = None
    conditions: Annotated[list[Condition] | None, _CONDITIONS_FIELD] = None
    tools: Annotated[ToolCounts | None, Field(description="Tool counts, exposed vs upstream.")] = None
    tools_summary: Annotated[
        str | None,
        Field(max_length=64, description='"<exposed>/<upstream>" tools, for the printer column.'),
    ] = None


class ResourceStatus(WireModel):
    """Observed state of a ToolMapping or MCPConnection, written by the operator."""

    observed_generation: Annotated[
        int | None, Field(ge=0, description="metadata.generation last evaluated.")
    ] = None
    conditions: Annotated[list[Condition] | None, _CONDITIONS_FIELD] = None


# --- cross-field rules --------------------------------------------------------------------

_CEL_RULES: dict[type[BaseModel], list[JSON]] = {
    CredentialSpec: [
        {
            "rule": "(has(self.source) && self.source == 'shared') == has(self.secretRef)",
            "message": "secretRef is required when source is shared, and only allowed then",
        },
        {
            "rule": "(has(self.source) && self.source == 'oauth') == has(self.oauth)",
            "message": "oauth is required when source is oauth, and only allowed then",
        },
    ],
    OAuthSpec: [
        {
            "rule": "has(self.authorizationEndpoint) == has(self.tokenEndpoint)",
            "message": "authorizationEndpoint and tokenEndpoint go together: give both or neither",
        },
        {
            "rule": "!has(self.authorizationEndpoint) || has(self.clientId)",
            "message": "clientId is required with explicit endpoints (dynamic registration needs the server's metadata)",
        },
        {
            "rule": "!has(self.clientSecretRef) || has(self.clientId)",
            "message": "clientSecretRef needs clientId (a dynamically registered client gets its own secret)",
        },
    ],
    AuditSpec: [
        {
            "rule": "(has(self.store) && self.store == 'postgres') == has(self.postgres)",
            "message": "postgres is required when store is postgres, and only allowed then",
        }
    ],
    VaultSpec: [
        {
            "rule": "!has(self.tenantKeySecret) || !self.tenantKeySecret.startsWith('portcullis-cred-')",
            "message": "tenantKeySecret must not start with portcullis-cred- (the users' credential Secrets)",
        }
    ],
    LimitsSpec: [
        {
            "rule": "(has(self.store) && self.store == 'postgres') == has(self.postgres)",
            "message": "postgres is required when store is postgres, and only allowed then",
        }
    ],
    AutoscalingSpec: [
        {
            "rule": "!has(self.minReplicas) || self.minReplicas <= self.maxReplicas",
            "message": "minReplicas must not exceed maxReplicas",
        }
    ],
}

# --- schema translation -------------------------------------------------------------------

# Keys copied as they are; everything else is translated or dropped. Order is output order.
_PLAIN_KEYS = (
    "format",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "minItems",
    "maxItems",
)


def _ref_name(ref: str) -> str:
    prefix = "#/$defs/"
    if not ref.startswith(prefix):
        raise ValueError(f"unsupported $ref {ref!r}")
    return ref[len(prefix) :]


def _join(*texts: str | None) -> str | None:
    parts: list[str] = []
    for text in texts:
        if text and text.strip() not in parts:
            parts.append(text.strip())
    return "\n\n".join(parts) or None


class _Translator:
    def __init__(self, defs: Mapping[str, JSON], rules: Mapping[str, list[JSON]]) -> None:
        self.defs = defs
        self.rules = rules
        self.used_rules: set[str] = set()

    def schema(self, node: JSON) -> JSON:
        """One pydantic JSON Schema node, as a structural schema node."""
        node = dict(node)
        # Resolve the indirections first; the field's own keys win over the target's.
        if "$ref" in node:
            name = _ref_name(node.pop("$ref"))
            target = self.schema(self.defs[name])
            if name in self.rules:
                self.used_rules.add(name)
                target["x-kubernetes-validations"] = self.rules[name]
            own, inherited = node.pop("description", None), target.pop("description", None)
            description = own or inherited
            return self._merge(description, target, node)
        if "anyOf" in node:
            options = [o for o in node.pop("anyOf") if o != {"type": "null"}]
            if len(options) != 1:
                raise ValueError(f"only `X | None` unions are structural, got {options!r}")
            target = self.schema(options[0])
            own, inherited = node.pop("description", None), target.pop("description", None)
            description = own or inherited
            return self._merge(description, target, node)

        out: JSON = {}
        if description := _join(node.get("description")):
            out["description"] = description
        if "type" in node:
            out["type"] = node["type"]
        if "const" in node:
            out["enum"] = [node["const"]]
        elif "enum" in node:
            out["enum"] = list(node["enum"])
        for key in _PLAIN_KEYS:
            if key in node:
                out[key] = node[key]
        for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if bound in node:
                out[plain] = node[bound]
                out[bound] = True
        if "items" in node:
            out["items"] = self.schema(node["items"])
        if "properties" in node:
            required = list(node.get("required", ()))
            out["properties"] = {
                name: self._property(prop, name in required) for name, prop in node["properties"].items()
            }
            if required:
                out["required"] = required
        elif isinstance(node.get("additionalProperties"), dict):
            out["additionalProperties"] = self.schema(node["additionalProperties"])
        for key, value in node.items():
            if key.startswith("x-kubernetes-"):
                out[key] = value
        return out

    def _merge(self, description: str | None, target: JSON, field: JSON) -> JSON:
        out: JSON = {"description": description} if description else {}
        out.update(target)
        for key, value in self.schema(field).items():
            if key != "description":
                out[key] = value
        return out

    def _property(self, prop: JSON, required: bool) -> JSON:
        out = self.schema(prop)
        if prop.get("default") is not None:
            out["default"] = prop["default"]
        elif "default" not in prop and not required and out.get("type") == "object":
            # A default_factory: let the API server build it, nested defaults included.
            out["default"] = {}
        return out


def structural_schema(model: type[BaseModel], rules: Mapping[type[BaseModel], list[JSON]] | None = None) -> JSON:
    """The structural OpenAPI v3 schema of `model`, with CEL `rules` attached to the models they name."""
    schema, _ = _structural(model, rules or {})
    return schema


def _structural(model: type[BaseModel], rules: Mapping[type[BaseModel], list[JSON]]) -> tuple[JSON, set[str]]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = dict(raw.pop("$defs", {}))
    translator = _Translator(defs, {cls.__name__: cel for cls, cel in rules.items()})
    out = translator.schema(raw)
    if model in rules:
        translator.used_rules.add(model.__name__)
        out["x-kubernetes-validations"] = rules[model]
    return out, translator.used_rules


# --- the three CRDs -----------------------------------------------------------------------

_META_PROPERTIES: JSON = {
    "apiVersion": {
        "description": "Versioned schema of this representation of an object.",
        "type": "string",
    },
    "kind": {"description": "REST resource this object represents.", "type": "string"},
    "metadata": {"type": "object"},
}


def _column(name: str, json_path: str, description: str, type_: str = "string", priority: int = 0) -> JSON:
    column: JSON = {"name": name, "type": type_, "jsonPath": json_path, "description": description}
    if priority:
        column["priority"] = priority
    return column


def _condition_column(name: str, condition: ConditionType) -> JSON:
    return _column(name, f'.status.conditions[?(@.type=="{condition.value}")].status', f"{condition.value} condition.")


_AGE = _column("Age", ".metadata.creationTimestamp", "Time since creation.", type_="date")


def _crd(
    resource: type[BaseModel],
    *,
    kind: str,
    plural: str,
    short_name: str,
    status: type[BaseModel],
    columns: Sequence[JSON],
) -> tuple[JSON, set[str]]:
    spec_field = resource.model_fields["spec"]
    spec_model = spec_field.annotation
    assert isinstance(spec_model, type) and issubclass(spec_model, BaseModel)
    spec_schema, used_rules = _structural(spec_model, _CEL_RULES)
    spec_schema["description"] = f"Desired state of the {kind}, written by its owner."
    if not spec_field.is_required():
        spec_schema["default"] = {}
    status_schema = structural_schema(status)
    root: JSON = {
        "description": _join(spec_model.__doc__),
        "type": "object",
        "properties": {**_META_PROPERTIES, "spec": spec_schema, "status": status_schema},
    }
    if spec_field.is_required():
        root["required"] = ["spec"]
    crd: JSON = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "portcullis", "app.kubernetes.io/part-of": "portcullis"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short_name],
                "categories": [CATEGORY],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [*columns, _AGE],
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }
    return crd, used_rules


def generate_crds() -> list[JSON]:
    """The CustomResourceDefinitions of MCPConnection, VirtualMCPServer and ToolMapping."""
    built = [
        _crd(
            MCPConnection,
            kind="MCPConnection",
            plural="mcpconnections",
            short_name="mcpconn",
            status=ResourceStatus,
            columns=[
                _column("URL", ".spec.url", "Upstream MCP endpoint."),
                _condition_column("Accepted", ConditionType.ACCEPTED),
                _column("Reason", '.status.conditions[?(@.type=="Accepted")].reason', "Why.", priority=1),
            ],
        ),
        _crd(
            VirtualMCPServer,
            kind="VirtualMCPServer",
            plural="virtualmcpservers",
            short_name="pvmcp",
            status=VirtualMCPServerStatus,
            columns=[
                _column("URL", ".status.url", "MCP endpoint agents connect to."),
                _condition_column("Ready", ConditionType.READY),
                _column("Tools", ".status.toolsSummary", "Tools exposed / offered upstream."),
                _column("Phase", ".status.phase", "Summary of the conditions.", priority=1),
            ],
        ),
        _crd(
            ToolMapping,
            kind="ToolMapping",
            plural="toolmappings",
            short_name="tmap",
            status=ResourceStatus,
            columns=[
                _column("Server", ".spec.serverRef.name", "The VirtualMCPServer fed."),
                _column("Connection", ".spec.connectionRef.name", "The MCPConnection mapped."),
                _condition_column("Accepted", ConditionType.ACCEPTED),
                _column("Reason", '.status.conditions[?(@.type=="Accepted")].reason', "Why.", priority=1),
            ],
        ),
    ]
    # A renamed or removed model must not silently drop its rule.
    unused = {cls.__name__ for cls in _CEL_RULES} - set().union(*(used for _, used in built))
    if unused:
        raise ValueError(f"CEL rules for models no CRD uses: {sorted(unused)}")
    return [crd for crd, _ in built]


# --- files --------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Block scalars for multi-line descriptions, so the files read like documentation."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_crd(crd: JSON) -> str:
    """One CRD as YAML, byte-for-byte stable for equal input."""
    return yaml.dump(crd, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=100)


def crd_files() -> dict[str, str]:
    """File name (`<group>_<plural>.yaml`) -> content, for `crds/` and the Helm chart."""
    return {
        f"{GROUP}_{crd['spec']['names']['plural']}.yaml": HEADER + dump_crd(crd) for crd in generate_crds()
    }


def stale_files(directory: Path) -> list[str]:
    """Names of the files in `directory` that differ from freshly generated ones (or are missing)."""
    return sorted(
        name
        for name, text in crd_files().items()
        if not (directory / name).is_file() or (directory / name).read_text() != text
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m portcullis.api.crd",
        description="Print the Portcullis CRDs (multi-document YAML), or write/check a directory of them.",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="DIR", type=Path, help="write one file per CRD into DIR")
    group.add_argument("--check", metavar="DIR", type=Path, help="exit 1 if DIR is not up to date")
    args = parser.parse_args(argv)
    if args.write is not None:
        args.write.mkdir(parents=True, exist_ok=True)
        for name, text in crd_files().items():
            (args.write / name).write_text(text)
        return 0
    if args.check is not None:
        stale = stale_files(args.check)
        for name in stale:
            print(f"{args.check / name}: stale; run python -m portcullis.api.crd --write {args.check}", file=sys.stderr)
        return 1 if stale else 0
    sys.stdout.write("---\n".join(dump_crd(crd) for crd in generate_crds()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
