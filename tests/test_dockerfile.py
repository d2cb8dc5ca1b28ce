"""The image, checked from its files: what can be known about it without a container engine.

No Docker daemon runs where this suite runs, so nothing here builds the image; the kind workflow
and the release workflow do. What the files alone can prove is checked: the base is pinned by
digest, the final stage runs as a numeric non-root user with `portcullis` as its entrypoint,
carries the example upstream the cluster examples start, installs without a pip cache and
without compilers, is labelled the OCI way, and the build context leaves out what it must.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from portcullis.render.deployment import GATEWAY_UID

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DIGEST = re.compile(r"(?P<name>[a-z0-9./-]+):(?P<tag>[\w.-]+)@sha256:(?P<digest>[0-9a-f]{64})")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuations joined, comments and the parser directive dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment line inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def parse() -> tuple[dict[str, str], list[Stage]]:
    """The global ARG defaults and the stages, in order."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, args in instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages and keyword == "ARG":
            key, _, default = args.partition("=")
            global_args[key] = default.strip('"')
        elif stages:
            stages[-1].instructions.append((keyword, args))
    return global_args, stages


GLOBAL_ARGS, STAGES = parse()
FINAL = STAGES[-1]


def resolved(base: str) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: GLOBAL_ARGS.get(m.group(1) or m.group(2), m.group(0)), base)


def test_it_is_multi_stage_and_the_builder_builds_a_wheel() -> None:
    assert len(STAGES) >= 2
    builder = STAGES[0]
    assert builder.name == "builder"
    assert any("pip wheel" in run for run in builder.all("RUN"))


def test_every_base_is_a_slim_python_pinned_by_digest_or_an_earlier_stage() -> None:
    names = {s.name for s in STAGES if s.name}
    for stage in STAGES:
        if stage.base in names:
            continue
        pinned = DIGEST.fullmatch(resolved(stage.base))
        assert pinned is not None, f"FROM {stage.base} ({resolved(stage.base)}) is not pinned by digest"
        assert (pinned["name"], pinned["tag"]) == ("python", "3.11-slim-bookworm")
    assert resolved(FINAL.base) == GLOBAL_ARGS["PYTHON_IMAGE"]


def operator_pod_uid() -> int:
    """The uid the chart runs the operator as, with its default values."""
    with helm.Chart.load(ROOT / "charts" / "portcullis") as chart:
        rendered = chart.render({}, name="portcullis", namespace="portcullis-system")
    docs = [d for path, text in rendered.items() if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    return int(deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"])


def test_the_final_stage_runs_as_the_numeric_non_root_uid_the_pods_set() -> None:
    (user,) = FINAL.all("USER")[-1:]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and (not gid or gid.isdigit()), f"USER {user}: the kubelet can check runAsNonRoot only on a numeric uid"
    assert int(uid) != 0
    assert int(uid) == GATEWAY_UID  # render/deployment.py: the gateway pods
    assert operator_pod_uid() == int(uid)  # the chart's operator pod
    assert [kw for kw, _ in FINAL.instructions].index("USER") > max(
        i for i, (kw, _) in enumerate(FINAL.instructions) if kw in ("RUN", "COPY")
    ), "nothing may run or be copied after dropping to the runtime user"


def test_the_entrypoint_is_the_portcullis_command_the_package_installs() -> None:
    (entrypoint,) = FINAL.all("ENTRYPOINT")
    assert entrypoint.startswith("["), "exec form, so signals reach portcullis, not a shell"
    assert yaml.safe_load(entrypoint) == ["portcullis"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "portcullis" in scripts


def test_the_example_upstream_the_cluster_examples_start_is_in_the_image() -> None:
    copies = [shlex.split(c) for c in FINAL.all("COPY")]
    assert ["examples", "/opt/portcullis/examples"] in copies
    upstream = yaml.safe_load_all((ROOT / "examples" / "cluster" / "inbox-upstream.yaml").read_text())
    (deployment,) = [d for d in upstream if d and d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    script = container["command"][1]
    assert script.startswith("/opt/portcullis/examples/")
    assert (ROOT / "examples" / script.removeprefix("/opt/portcullis/examples/")).is_file()


def test_the_final_stage_installs_without_a_pip_cache_and_without_compilers() -> None:
    runs = " && ".join(FINAL.all("RUN"))
    for command in re.split(r"&&|;|\|\|", runs):
        if re.search(r"\bpip3?\s+install\b|\bpython3?\s+-m\s+pip\s+install\b", command):
            assert "--no-cache-dir" in command, f"pip install without --no-cache-dir in the final stage: {command.strip()}"
    for compiler in ("build-essential", "gcc", "g++", "clang", "make", "python3-dev"):
        assert not re.search(rf"apt-get install[^&;]*\b{re.escape(compiler)}\b", runs), f"{compiler} in the final stage"
    # The builder's wheels are bind-mounted for the install, never copied into a layer.
    assert not any("--from=builder" in c for c in FINAL.all("COPY"))


def test_the_final_stage_carries_the_oci_labels() -> None:
    labels = " ".join(FINAL.all("LABEL"))
    for key in ("title", "description", "source", "version", "revision", "created", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    license_ = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]
    assert f'org.opencontainers.image.licenses="{license_}"' in labels


# --- the build context --------------------------------------------------------------------------


def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, pattern) per line, in order, as Docker's matcher reads them."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:] if negated else line
        pattern = pattern.strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negated, re.compile(regex)))
    return rules


def excluded(path: str) -> bool:
    """Whether Docker leaves `path` out of the build context: the last matching rule wins, and a
    rule that matches a directory matches everything below it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for negated, rule in dockerignore():
        if any(rule.fullmatch(p) for p in prefixes):
            verdict = not negated
    return verdict


@pytest.mark.parametrize(
    "path",
    [".git/HEAD", ".venv/bin/python", "tests/test_cli.py", "node_modules/x/package.json", "benchmarks/stack.py",
     "charts/portcullis/values.yaml", ".github/workflows/e2e-kind.yaml", "docs/security.md",
     "operator/portcullis/__pycache__/cli.cpython-311.pyc", "operator/portcullis.egg-info/PKG-INFO",
     "examples/inbox/__pycache__/server.cpython-311.pyc", ".env"],
)
def test_the_build_context_leaves_out(path: str) -> None:
    assert excluded(path)


def test_the_build_context_holds_every_path_the_dockerfile_copies() -> None:
    sources = []
    for stage in STAGES:
        for copy in stage.all("COPY"):
            words = [w for w in shlex.split(copy) if not w.startswith("--")]
            sources.extend(words[:-1])
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not excluded(source), f"COPY {source}: .dockerignore leaves it out of the context"
    for kept in ("operator/portcullis/cli.py", "examples/inbox/server.py", "examples/fixture/server.py"):
        assert not excluded(kept), kept


# --- the release workflow -------------------------------------------------------------------------


def test_the_release_workflow_builds_both_architectures_scans_and_pushes_to_ghcr_on_tags() -> None:
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yaml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    assert triggers["push"]["tags"], "releases are cut from tags"
    (job,) = workflow["jobs"].values()
    steps = job["steps"]
    uses = [str(s.get("uses", "")) for s in steps]
    assert any(u.startswith("docker/setup-buildx-action") for u in uses)
    assert any(u.startswith("aquasecurity/trivy-action") for u in uses)
    pushes = [s for s in steps if str(s.get("uses", "")).startswith("docker/build-push-action") and s.get("with", {}).get("push")]
    assert pushes, "one build pushes"
    (push,) = pushes
    platforms = re.sub(r"\$\{\{\s*env\.(\w+)\s*\}\}", lambda m: str(job.get("env", {})[m.group(1)]), str(push["with"]["platforms"]))
    assert set(platforms.replace(" ", "").split(",")) == {"linux/amd64", "linux/arm64"}
    text = (ROOT / ".github" / "workflows" / "release.yaml").read_text()
    assert "ghcr.io/" in text and "/portcullis" in text
    scan = uses.index(next(u for u in uses if u.startswith("aquasecurity/trivy-action")))
    assert scan < steps.index(push), "the image is scanned before anything is pushed"
