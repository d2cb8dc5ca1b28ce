"""What the API server would do with a custom object, as far as it can be done offline.

`admit(doc, crd)` follows the API server's order for a create: apply the schema's defaults,
validate against the OpenAPI schema (unknown fields rejected, as `kubectl apply`'s strict
field validation does), then evaluate the CEL `x-kubernetes-validations` rules (with
cel-python, when it is installed). It returns the problems found, empty when admitted.

`structural_problems(schema)` checks the rules that make a schema *structural*, which
kubernetes_validate cannot see (it validates the CRD's shape, not its meaning).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # comes with kubernetes-validate; no stubs

JSON = dict[str, Any]

try:  # cel-python: optional, so the rest runs without it
    import celpy
    from celpy.adapter import json_to_cel

    HAVE_CEL = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_CEL = False


def openapi_schema(crd: JSON) -> JSON:
    schema: JSON = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def apply_defaults(value: Any, schema: JSON) -> Any:
    """Fill in defaults the way the API server does: missing fields, recursively."""
    if isinstance(value, dict) and "properties" in schema:
        for name, prop in schema["properties"].items():
            if name not in value and "default" in prop:
                value[name] = copy.deepcopy(prop["default"])
            if name in value:
                value[name] = apply_defaults(value[name], prop)
    elif isinstance(value, list) and "items" in schema:
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


def _closed(schema: JSON) -> JSON:
    """A copy that rejects unknown fields, like strict field validation does."""
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if "properties" in out:
        out["properties"] = {k: _closed(v) for k, v in out["properties"].items()}
        out["additionalProperties"] = False
    if "items" in out:
        out["items"] = _closed(out["items"])
    return out


def _cel_problems(value: Any, schema: JSON, path: str) -> Iterator[str]:
    if value is None:
        return
    for rule in schema.get("x-kubernetes-validations", ()):
        env = celpy.Environment()
        program = env.program(env.compile(rule["rule"]))
        if not program.evaluate({"self": json_to_cel(value)}):
            yield f"{path or '<root>'}: {rule.get('message', rule['rule'])}"
    if isinstance(value, dict):
        for name, prop in schema.get("properties", {}).items():
            if name in value:
                yield from _cel_problems(value[name], prop, f"{path}.{name}")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            yield from _cel_problems(item, schema["items"], f"{path}[{index}]")


def admit(doc: JSON, crd: JSON, *, cel: bool = True) -> list[str]:
    """Problems the API server would report for creating `doc`; empty when it would accept it."""
    schema = openapi_schema(crd)
    doc = apply_defaults(copy.deepcopy(doc), schema)
    validator = jsonschema.Draft7Validator(_closed(schema))
    problems = [
        f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]
    if not problems and cel and HAVE_CEL:
        problems.extend(_cel_problems(doc, schema, ""))
    return problems


# --- structural schemas ----------------------------------------------------------------------

_ALLOWED_KEYS = {
    "description", "type", "format", "enum", "pattern", "minLength", "maxLength", "minimum",
    "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems", "items",
    "properties", "required", "additionalProperties", "default", "nullable",
    "x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
}


def structural_problems(schema: JSON, path: str = "") -> list[str]:
    """Violations of the structural-schema rules (and of this project's stricter habits)."""
    problems: list[str] = []
    where = path or "<root>"
    unknown = set(schema) - _ALLOWED_KEYS
    if unknown:
        problems.append(f"{where}: keys not allowed here: {sorted(unknown)}")
    if "type" not in schema and path != ".metadata":
        problems.append(f"{where}: no type")
    if "properties" in schema and "additionalProperties" in schema:
        problems.append(f"{where}: properties and additionalProperties together")
    if schema.get("type") == "object" and path != ".metadata" and not (
        "properties" in schema or "additionalProperties" in schema
    ):
        problems.append(f"{where}: object without properties would need preserve-unknown-fields")
    for name in schema.get("required", ()):
        if name not in schema.get("properties", {}):
            problems.append(f"{where}: required {name!r} is not a property")
    if "default" in schema:
        errors = list(jsonschema.Draft7Validator(_closed(schema)).iter_errors(
            apply_defaults(copy.deepcopy(schema["default"]), schema)
        ))
        problems.extend(f"{where}: default does not validate: {e.message}" for e in errors)
    if "pattern" in schema:
        try:
            re.compile(schema["pattern"])
        except re.error as exc:
            problems.append(f"{where}: bad pattern: {exc}")
    if schema.get("x-kubernetes-list-type") == "map":
        item = schema.get("items", {})
        for key in schema.get("x-kubernetes-list-map-keys", ()):
            if key not in item.get("required", ()) and "default" not in item.get("properties", {}).get(key, {}):
                problems.append(f"{where}: list-map key {key!r} must be required or defaulted")
    for name, prop in schema.get("properties", {}).items():
        problems.extend(structural_problems(prop, f"{path}.{name}"))
    if "items" in schema:
        problems.extend(structural_problems(schema["items"], f"{path}[]"))
    if isinstance(schema.get("additionalProperties"), dict):
        problems.extend(structural_problems(schema["additionalProperties"], f"{path}{{}}"))
    return problems


def resolve_json_path(schema: JSON, json_path: str) -> JSON | None:
    """The schema node a printer column's simple JSONPath points at, or None when it points nowhere.

    Understands `.a.b` and the filter `.conditions[?(@.type=="X")].field` (it descends into
    the list's items).
    """
    node: JSON | None = schema
    for part in re.findall(r"\.([A-Za-z0-9_]+)(\[\?\(@\.[A-Za-z]+==\"[^\"]*\"\)\])?", json_path):
        name, filt = part
        if node is None:
            return None
        node = node.get("properties", {}).get(name)
        if node is not None and filt:
            node = node.get("items")
    return node
