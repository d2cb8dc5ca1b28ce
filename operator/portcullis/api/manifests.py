"""Loading Kubernetes-style YAML: multi-document files, directories, and `kind: List`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from portcullis.api.resources import GROUP, KINDS, MCPConnection, ToolMapping, VirtualMCPServer, parse_resource

YAML_SUFFIXES = (".yaml", ".yml", ".json")


class ManifestError(ValueError):
    """A manifest could not be read; the message names the file and the object."""


@dataclass
class Manifests:
    servers: list[VirtualMCPServer] = field(default_factory=list)
    mappings: list[ToolMapping] = field(default_factory=list)
    connections: list[MCPConnection] = field(default_factory=list)
    secrets: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    """Documents of other kinds that were not read (shown, so a typo does not pass unnoticed)."""
    """Plain `v1/Secret` documents, keyed by (namespace, name): shared credentials for local runs."""


def iter_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.suffix in YAML_SUFFIXES and p.is_file())
        elif path.exists():
            yield path
        else:
            raise ManifestError(f"{path}: no such file or directory")


def _secret_data(doc: dict[str, Any]) -> dict[str, str]:
    import base64

    data = {k: str(v) for k, v in (doc.get("stringData") or {}).items()}
    for key, value in (doc.get("data") or {}).items():
        data.setdefault(key, base64.b64decode(str(value)).decode())
    return data


def load_manifests(paths: Iterable[str | Path]) -> Manifests:
    """Read every Portcullis object (and plain Secrets) below `paths`; unrelated kinds are skipped."""
    out = Manifests()
    for path in iter_files(paths):
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as exc:
            raise ManifestError(f"{path}: not valid YAML: {exc}") from exc
        for index, doc in enumerate(_flatten(docs)):
            where = f"{path} (document {index + 1})"
            if not isinstance(doc, dict):
                raise ManifestError(f"{where}: expected a mapping with apiVersion and kind")
            kind = doc.get("kind")
            if kind == "Secret" and doc.get("apiVersion") == "v1":
                meta = doc.get("metadata") or {}
                out.secrets[(meta.get("namespace", "default"), meta.get("name", ""))] = _secret_data(doc)
                continue
            if kind not in KINDS:
                api_version = str(doc.get("apiVersion") or "")
                if api_version.split("/")[0] == GROUP:
                    raise ManifestError(
                        f"{where}: unknown kind {kind!r} in {api_version} (expected one of {', '.join(sorted(KINDS))})"
                    )
                out.skipped.append(f"{where}: {kind or '(no kind)'} {(doc.get('metadata') or {}).get('name', '')!s} ({api_version or 'no apiVersion'})".rstrip())
                continue
            name = (doc.get("metadata") or {}).get("name", "?")
            try:
                obj = parse_resource(doc)
            except ValidationError as exc:
                raise ManifestError(f"{where}: {kind} {name!r} is invalid:\n{format_validation_error(exc)}") from exc
            if isinstance(obj, VirtualMCPServer):
                out.servers.append(obj)
            elif isinstance(obj, ToolMapping):
                out.mappings.append(obj)
            else:
                out.connections.append(obj)
    return out


def _flatten(docs: list[Any]) -> Iterator[Any]:
    for doc in docs:
        if doc is None:
            continue
        if isinstance(doc, dict) and doc.get("kind") == "List":
            yield from _flatten(list(doc.get("items") or []))
        else:
            yield doc


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"])
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)
