"""The documentation is an example too: generated pages are current, and every link lands.

docs/crd-reference.md is generated from crds/*.yaml by docs/crd_reference.py; it must be exactly
what the generator makes now, and must name every field of every CRD. The README links the docs,
and the docs' relative links (files, and `#anchors` into Markdown headings) must resolve.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("crd_reference", DOCS / "crd_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["crd_reference"] = module
    spec.loader.exec_module(module)
    return module


generator = load_generator()


def test_the_crd_reference_is_what_the_generator_makes_from_the_crds() -> None:
    page = (DOCS / "crd-reference.md").read_text()
    assert page == generator.render(), f"docs/crd-reference.md is stale: run `{generator.COMMAND}`"


def test_a_changed_crd_makes_the_reference_stale(tmp_path: Path) -> None:
    for path in (ROOT / "crds").glob("*.yaml"):
        shutil.copy(path, tmp_path / path.name)
    target = tmp_path / "portcullis.dev_mcpconnections.yaml"
    original = target.read_text()
    changed = original.replace("Idle timeout towards the upstream", "Per-call deadline")
    assert changed != original, "the description this test edits is gone from the CRD: pick another"
    target.write_text(changed)
    assert generator.render(tmp_path) != generator.render()
    assert "Per-call deadline" in generator.render(tmp_path)


def field_paths(schema: dict[str, Any], path: str) -> Iterator[str]:
    yield path
    for name, child in (schema.get("properties") or {}).items():
        yield from field_paths(child, f"{path}.{name}")
    items = schema.get("items") or {}
    for name, child in (items.get("properties") or {}).items():
        yield from field_paths(child, f"{path}[].{name}")


@pytest.mark.parametrize("crd", sorted((ROOT / "crds").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_reference_names_every_field_with_its_type_and_default(crd: Path) -> None:
    doc = yaml.safe_load(crd.read_text())
    schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    page = (DOCS / "crd-reference.md").read_text()
    section = page.split(f"## {doc['spec']['names']['kind']}\n", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([^`]+)`[^\n]*$", section, flags=re.M)}
    for part in ("spec", "status"):
        for path in field_paths(schema["properties"][part], part):
            assert path in rows, f"{doc['spec']['names']['kind']}: {path} is missing from docs/crd-reference.md"
    assert "| `15m`" not in section  # defaults are JSON: strings quoted
    if doc["spec"]["names"]["kind"] == "VirtualMCPServer":
        assert '| `"15m"` |' in rows["spec.sessionTokens.defaultTTL"]


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), flags=re.M):
        out.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return out


def links(markdown: str) -> list[str]:
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    text = re.sub(r"(`+).+?\1", "", text)  # inline code: a regex's `](` is no link
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("page", [ROOT / "README.md", *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_every_relative_link_lands(page: Path) -> None:
    for target in links(page.read_text()):
        file, _, anchor = target.partition("#")
        destination = (page.parent / file).resolve() if file else page
        assert destination.exists(), f"{page.name}: link to {target} goes nowhere"
        if anchor and destination.suffix == ".md":
            assert anchor in anchors(destination.read_text()), f"{page.name}: no heading #{anchor} in {destination.name}"


def test_the_readme_links_every_operating_document() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in ("quickstart-kind.md", "agents.md", "security.md", "operations.md", "crd-reference.md", "audit.md"):
        assert f"](docs/{name})" in readme, name


def test_the_kind_walkthrough_explains_every_line_of_the_readme_quickstart_in_order() -> None:
    from tests.e2e.quickstart import script

    walkthrough = (DOCS / "quickstart-kind.md").read_text()
    position = 0
    for line in (raw for raw in script().splitlines() if raw.strip()):
        found = walkthrough.find(line, position)
        assert found != -1, f"docs/quickstart-kind.md does not quote this README line (after the previous one): {line}"
        position = found + len(line)
