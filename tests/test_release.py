"""What a release publishes, checked from the files: the chart installs the image the release
workflow pushes (`ghcr.io/<owner>/portcullis` at the package's version), the workflow refuses to
run when the chart says otherwise (a fork that kept ours), and the chart itself is published, as
an OCI artifact beside the image, only after the image is."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

from portcullis import __version__
from portcullis.controller.options import DEFAULT_IMAGE

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_PATH = ROOT / ".github" / "workflows" / "release.yaml"
WORKFLOW = yaml.safe_load(WORKFLOW_PATH.read_text())
CHART = ROOT / "charts" / "portcullis"
CHART_META = yaml.safe_load((CHART / "Chart.yaml").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
# GitHub owner names: alphanumerics and single hyphens, lower-cased by the workflow.
OWNER = r"[a-z0-9](?:-?[a-z0-9])*"


def steps() -> list[dict[str, Any]]:
    (job,) = WORKFLOW["jobs"].values()
    found: list[dict[str, Any]] = job["steps"]
    return found


def step_index(predicate: Any) -> int:
    return next(i for i, step in enumerate(steps()) if predicate(step))


def pushed(variable: str) -> re.Pattern[str]:
    """What the workflow writes into `variable` (in $GITHUB_ENV), as a pattern over any owner."""
    text = WORKFLOW_PATH.read_text()
    match = re.search(rf'echo "{variable}=([^"]+)"', text)
    assert match is not None, f"release.yaml sets no {variable}"
    value = match.group(1)
    assert "${GITHUB_REPOSITORY_OWNER,,}" in value, f"{variable} is not per owner, lower case: {value}"
    prefix, _, suffix = value.partition("${GITHUB_REPOSITORY_OWNER,,}")
    return re.compile(re.escape(prefix) + OWNER + re.escape(suffix))


def test_the_workflow_pushes_the_image_to_ghcr_per_owner() -> None:
    assert pushed("IMAGE").pattern == re.escape("ghcr.io/") + OWNER + re.escape("/portcullis")


def test_the_charts_default_repository_is_where_the_workflow_pushes() -> None:
    repository = VALUES["image"]["repository"]
    assert pushed("IMAGE").fullmatch(repository), f"image.repository {repository!r} is not ghcr.io/<owner>/portcullis"
    assert VALUES["image"]["tag"] == "", "an empty tag installs the chart's appVersion, the release's version"


def test_the_charts_app_version_is_the_packages_version() -> None:
    assert CHART_META["appVersion"] == VERSION == __version__


def test_the_operators_fallback_image_is_the_charts_default() -> None:
    assert DEFAULT_IMAGE == f"{VALUES['image']['repository']}:{CHART_META['appVersion']}"


def test_the_workflow_refuses_a_chart_that_names_another_image_before_building() -> None:
    check = step_index(lambda s: "image.repository" in str(s.get("run", "")) and "::error" in str(s.get("run", "")))
    script = steps()[check]["run"]
    assert "charts/portcullis/values.yaml" in script
    assert re.search(r'if \[ "\$repository" != "\$IMAGE" \]', script), "it compares the chart's repository with IMAGE"
    assert "a fork must set image.repository" in script
    assert "exit 1" in script
    # It runs once IMAGE is known and before anything is built.
    sets_image = step_index(lambda s: 'echo "IMAGE=' in str(s.get("run", "")))
    first_build = step_index(lambda s: str(s.get("uses", "")).startswith("docker/build-push-action"))
    assert sets_image < check < first_build


def test_the_chart_is_packaged_at_the_release_version_and_pushed_after_the_image() -> None:
    charts = pushed("CHARTS")
    assert charts.pattern == re.escape("oci://ghcr.io/") + OWNER + re.escape("/charts")
    publish = step_index(lambda s: "helm push" in str(s.get("run", "")))
    script = steps()[publish]["run"]
    assert re.search(r'helm package charts/portcullis --version "?\$VERSION"? --app-version "?\$VERSION"?', script)
    assert re.search(r'helm push "?dist/portcullis-\$VERSION\.tgz"? "?\$CHARTS"?', script)
    # Logged in to ghcr.io with the workflow's own token, read from stdin (never on a command line).
    assert "helm registry login ghcr.io" in script and "--password-stdin" in script
    assert steps()[publish]["env"]["REGISTRY_TOKEN"] == "${{ secrets.GITHUB_TOKEN }}"
    (job,) = WORKFLOW["jobs"].values()
    assert job["permissions"]["packages"] == "write"
    image_push = step_index(lambda s: str(s.get("uses", "")).startswith("docker/build-push-action") and s.get("with", {}).get("push"))
    assert image_push < publish, "the chart is published only once the image it names is"
    helm = step_index(lambda s: str(s.get("uses", "")).startswith("azure/setup-helm"))
    assert helm < publish
