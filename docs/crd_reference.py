"""Generate docs/crd-reference.md from the CRDs in crds/*.yaml.

    python docs/crd_reference.py --write     # regenerate docs/crd-reference.md
    python docs/crd_reference.py --check     # exit 1 when it is stale (tests/examples/test_docs.py does the same)
    python docs/crd_reference.py             # print it

It walks each CRD's `openAPIV3Schema` depth first, in the schema's own field order, and writes
one table row per field: its path (`spec.credential.secretRef.name`, `[]` for list items), type,
default and description, followed by the constraints the API server enforces (enum, bounds,
patterns, required fields, CEL rules). The CRDs are generated from the pydantic models
(`python -m portcullis.api.crd --write crds/`), so the chain is models -> CRDs -> this page.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT / "crds"
OUTPUT = ROOT / "docs" / "crd-reference.md"
COMMAND = "python docs/crd_reference.py --write"
ORDER = ["MCPConnection", "VirtualMCPServer", "ToolMapping"]

Schema = dict[str, Any]


def code(text: str) -> str:
    """Inline code that survives backticks inside and a Markdown table around it."""
    longest = run = 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}".replace("|", "\\|")


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def type_of(schema: Schema) -> str:
    kind = str(schema.get("type", "any"))
    if kind == "array":
        return f"[]{type_of(schema.get('items') or {})}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"map[string]{type_of(schema['additionalProperties'])}"
    if "format" in schema:
        return f"{kind} ({schema['format']})"
    return kind


def constraints(schema: Schema) -> list[str]:
    out = []
    if "enum" in schema:
        out.append("One of " + ", ".join(code(json.dumps(v) if not isinstance(v, str) else v) for v in schema["enum"]) + ".")
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None and high is not None:
        out.append(f"From {low} to {high}.")
    elif low is not None:
        out.append(f"At least {low}.")
    elif high is not None:
        out.append(f"At most {high}.")
    short, long = schema.get("minLength"), schema.get("maxLength")
    if short is not None and long is not None:
        out.append(f"{short} to {long} characters.")
    elif long is not None:
        out.append(f"At most {long} characters.")
    elif short is not None:
        out.append(f"At least {short} characters.")
    if "maxItems" in schema:
        out.append(f"At most {schema['maxItems']} items.")
    if "pattern" in schema:
        out.append(f"Matches {code(schema['pattern'])}.")
    if schema.get("x-kubernetes-list-type") == "map":
        out.append("A map keyed by " + ", ".join(code(k) for k in schema.get("x-kubernetes-list-map-keys", [])) + ".")
    if schema.get("required"):
        out.append("Requires " + ", ".join(code(r) for r in schema["required"]) + ".")
    for rule in schema.get("x-kubernetes-validations") or []:
        out.append(f"Rule {code(rule['rule'])}: {rule.get('message', 'must hold')}.")
    values = schema.get("additionalProperties")
    if isinstance(values, dict) and (value_rules := constraints(values)):
        joined = " ".join(value_rules)
        out.append(f"Each value: {joined[:1].lower()}{joined[1:]}")
    return out


def rows(schema: Schema, path: str, required: bool) -> list[str]:
    description = cell(str(schema.get("description", "")))
    if description and not description.endswith("."):
        description += "."
    notes = " ".join([description, *constraints(schema)]).strip()
    default = code(json.dumps(schema["default"], sort_keys=True)) if "default" in schema else ""
    field = code(path) + (" (required)" if required else "")
    out = [f"| {field} | {type_of(schema)} | {default} | {notes} |"]
    children = schema.get("properties") or {}
    needed = set(schema.get("required") or [])
    for name, child in children.items():
        out.extend(rows(child, f"{path}.{name}", name in needed))
    items = schema.get("items")
    if isinstance(items, dict) and items.get("properties"):
        needed_items = set(items.get("required") or [])
        for name, child in items["properties"].items():
            out.extend(rows(child, f"{path}[].{name}", name in needed_items))
    return out


def section(crd: Schema) -> list[str]:
    names = crd["spec"]["names"]
    (version,) = crd["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]
    lines = [
        f"## {names['kind']}",
        "",
        cell(str(schema.get("description", ""))),
        "",
        f"`{crd['spec']['group']}/{version['name']}`, {crd['spec']['scope'].lower()}; "
        f"`kubectl get {names['plural']}`"
        + "".join(f", `{n}`" for n in names.get("shortNames", []))
        + (f"; category {', '.join(f'`{c}`' for c in names.get('categories', []))}" if names.get("categories") else "")
        + ".",
        "",
    ]
    columns = version.get("additionalPrinterColumns") or []
    if columns:
        lines += ["| column | from | shown |", "|---|---|---|"]
        lines += [
            f"| {c['name']} | {code(c['jsonPath'])} | {'with `-o wide`' if c.get('priority', 0) else 'always'} |"
            for c in columns
        ]
        lines.append("")
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    required = set(schema.get("required") or [])
    for part in ("spec", "status"):
        if part in (schema.get("properties") or {}):
            lines.extend(rows(schema["properties"][part], part, part in required))
    lines.append("")
    return lines


def load_crds(directory: Path = CRDS) -> list[Schema]:
    crds = [yaml.safe_load(p.read_text()) for p in sorted(directory.glob("*.yaml"))]
    known = {c["spec"]["names"]["kind"]: c for c in crds}
    return [known[k] for k in ORDER if k in known] + [c for k, c in sorted(known.items()) if k not in ORDER]


def render(directory: Path = CRDS) -> str:
    lines = [
        "# Custom resource reference",
        "",
        f"<!-- Generated from crds/*.yaml by `{COMMAND}`. Do not edit: change the models in",
        "     operator/portcullis/api/, regenerate the CRDs (python -m portcullis.api.crd --write crds/),",
        "     then this page. tests/examples/test_docs.py fails when it is stale. -->",
        "",
        "Every field of the three kinds, as the API server validates it. `(required)` fields must be",
        "set; a default is what the API server fills in when a field is left out. `status` is written",
        "by the operator; do not set it. How the three fit together: [the README](../README.md#use-it);",
        "examples in `examples/cluster/`.",
        "",
    ]
    for crd in load_crds(directory):
        lines.extend(section(crd))
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help=f"write {OUTPUT.relative_to(ROOT)}")
    group.add_argument("--check", action="store_true", help="exit 1 when the page is stale")
    args = parser.parse_args(argv)
    page = render()
    if args.write:
        OUTPUT.write_text(page)
        return 0
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != page:
            print(f"{OUTPUT.relative_to(ROOT)} is stale: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
