"""Protocol fidelity: the official MCP conformance suite through a gateway, against the fixture directly.

The gateway claims to relay MCP faithfully. The referee is the official suite
(`@modelcontextprotocol/conformance`), run twice per protocol era in one test
session: directly against the conformance fixture (examples/fixture/server.py),
and against a gateway fronting a second fixture instance through a ToolMapping
that exposes every one of the fixture's tools, prompts, static resources and resource templates
under their own names. Each scenario is one test case: if it passes directly it
must pass through the gateway.

Two kinds of scenario are held to something else, each with its reason:

- STATELESS_EXCEPTIONS: what a gateway that keeps no per-session state in any
  replica cannot pass by construction (a session id refused once its session was
  ended). Sessions themselves, their standalone streams, the upstream's questions
  mid-call, and what a session changes after it opened (log levels, resource
  subscriptions: on the agent's upstream sessions, the same on every replica,
  gateway/upstream_sessions.py) do pass: the session id carries what the session
  is (gateway/sessions.py). Such a case asserts that the scenario does *not* pass
  through the gateway, so the list cannot go stale silently.
- GATEWAY_BUGS: real gateway gaps, found by this comparison and not fixed yet.
  They are strict xfails: reported in every run's summary (`-ra`) with the code
  location, and a fix turns them into an XPASS failure until the entry is removed.

The suite cannot send a bearer token: `conformance server` (0.2.0-alpha.12) has
no header or auth option (its `--token` flags belong to the GitHub-facing
subcommands) and its scenarios build their own requests. So it reaches the
gateway through tests/support/auth_proxy.py, a loopback proxy that adds the
session token and is otherwise transparent.

Both suite runs of an era go concurrently (two subprocesses, two fixture
instances: the fixture's list-change hooks must not leak between the runs). The
suite needs the npm packages of package.json (`npm ci`); without them every case
here skips and says why.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from portcullis.gateway.audit import MemoryAuditSink
from portcullis.gateway.local import admin_secret
from portcullis.serve import LocalGateway, local_gateway
from tests.examples.test_fixture_conformance import EXPECTED_2026, EXPECTED_SESSION_ERA, parse_summary, suite_missing
from tests.support.auth_proxy import auth_proxy
from tests.support.servers import REPO_ROOT, load_example, run_asgi

pytestmark = pytest.mark.interop
needs_suite = pytest.mark.skipif(suite_missing() is not None, reason=str(suite_missing()))

fixture = load_example("examples/fixture/server.py")

SESSION_ERA = "2025-11-25"
MODERN_ERA = "2026-07-28"
SUITE_ARGS = {SESSION_ERA: (), MODERN_ERA: ("--requirements", MODERN_ERA)}
SCENARIOS = {SESSION_ERA: EXPECTED_SESSION_ERA, MODERN_ERA: EXPECTED_2026}
SUITE_TIMEOUT = 420

STATELESS_EXCEPTIONS: dict[tuple[str, str], str] = {
    (SESSION_ERA, "server-session-lifecycle"): (
        "DELETE ends the agent's upstream sessions and is answered as they answer (200), but the gateway's own "
        "session id cannot be revoked without a replica remembering it: the tools/list sent on it afterwards is "
        "served (200), where the scenario expects 404 (docs/fidelity.md)"
    ),
}

GATEWAY_BUGS: dict[tuple[str, str], str] = {  # none open: each entry that was here is fixed and now compared
}


# --- the stack --------------------------------------------------------------------------


def manifests(fixture_url: str) -> list[dict[str, Any]]:
    """Everything the fixture offers, each under its own name: the ToolMapping hides nothing."""
    meta = {"namespace": "conformance"}
    return [
        {
            "apiVersion": "portcullis.dev/v1alpha1",
            "kind": "MCPConnection",
            "metadata": {"name": "fixture", **meta},
            "spec": {"url": fixture_url, "timeoutSeconds": 30, "credential": {"source": "none"}},
        },
        {
            "apiVersion": "portcullis.dev/v1alpha1",
            "kind": "VirtualMCPServer",
            "metadata": {"name": "fidelity", **meta},
            "spec": {"sessionTokens": {"defaultTTL": "1h", "maxTTL": "1h"}},
        },
        {
            "apiVersion": "portcullis.dev/v1alpha1",
            "kind": "ToolMapping",
            "metadata": {"name": "fidelity-fixture", **meta},
            "spec": {
                "serverRef": {"name": "fidelity"},
                "connectionRef": {"name": "fixture"},
                "tools": [{"name": t.name} for t in [*fixture.TOOLS, *fixture.MRTR_TOOLS]],
                "prompts": [{"name": p.name} for p in [*fixture.PROMPTS, fixture.MRTR_PROMPT]],
                "resources": [{"uri": str(r.uri)} for r in fixture.RESOURCES],
                "resourceTemplates": [{"uriTemplate": t.uri_template} for t in fixture.TEMPLATES],
            },
        },
    ]


def mint(gw: LocalGateway, state_dir: Path, user: str = "conformance@example.com") -> str:
    request = urllib.request.Request(
        gw.admin_url + "/v1/tokens",
        data=json.dumps({"user": user}).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {admin_secret(state_dir)}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(json.loads(response.read())["token"])


@contextmanager
def gateway_in_front_of_fixture(workdir: Path) -> Iterator[str]:
    """A fresh fixture, a gateway exposing all of it, and the token-presenting proxy; yields the proxy's URL."""
    manifest_dir, state_dir = workdir / "manifests", workdir / "state"
    manifest_dir.mkdir(parents=True)
    with run_asgi(fixture.build_app()) as fixture_url:
        (manifest_dir / "fidelity.yaml").write_text(yaml.safe_dump_all(manifests(fixture_url)))
        with local_gateway([manifest_dir], state_dir=state_dir, port=0, admin_port=0, audit=MemoryAuditSink()) as gw:
            with auth_proxy(gw.url, mint(gw, state_dir)) as url:
                yield url


# --- running the suite ---------------------------------------------------------------------

_RESULT_DIR = re.compile(r"^server-(.+)-\d{4}-\d{2}-\d{2}T[\d-]+Z$")


@dataclass
class SuiteRun:
    """One suite run: `{scenario: (passed, failed)}` and the checks that did not succeed."""

    summary: dict[str, tuple[int, int]]
    problems: dict[str, list[str]] = field(default_factory=dict)  # scenario -> "STATUS id: message"
    warnings: dict[str, set[str]] = field(default_factory=dict)  # scenario -> ids of checks that warned

    def passes(self, scenario: str) -> bool:
        # 0 passed, 0 failed: the scenario found nothing applicable, which is not a pass.
        passed, failed = self.summary.get(scenario, (0, 0))
        return passed > 0 and failed == 0

    def verdict(self, scenario: str) -> str:
        if scenario not in self.summary:
            return "not run"
        passed, failed = self.summary[scenario]
        word = "pass" if self.passes(scenario) else ("n/a" if passed == failed == 0 else "FAIL")
        warned = len(self.warnings.get(scenario, ()))
        return f"{word} {passed}/{passed + failed}" + (f" {warned}w" if warned else "")

    def explain(self, scenario: str) -> str:
        lines = self.problems.get(scenario) or [f"no check details (summary {self.summary.get(scenario)})"]
        return "\n".join(lines)


def read_checks(output_dir: Path) -> tuple[dict[str, list[str]], dict[str, set[str]]]:
    """Per scenario: the checks that failed or warned (with their messages), and the ids that warned."""
    problems: dict[str, list[str]] = {}
    warnings: dict[str, set[str]] = {}
    for result in sorted(output_dir.iterdir()):
        match = _RESULT_DIR.match(result.name)
        checks_file = result / "checks.json"
        if match is None or not checks_file.is_file():
            continue
        for check in json.loads(checks_file.read_text()):
            if check.get("status") in ("FAILURE", "WARNING"):
                message = check.get("errorMessage") or check.get("description") or ""
                problems.setdefault(match.group(1), []).append(f"{check['status']} {check.get('id')}: {message}"[:600])
            if check.get("status") == "WARNING":
                warnings.setdefault(match.group(1), set()).add(str(check.get("id")))
    return problems, warnings


def start_suite(url: str, era: str, output_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["npx", "--no-install", "conformance", "server", "--url", url, "-o", str(output_dir), *SUITE_ARGS[era]],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )


@contextmanager
def suite_process(url: str, era: str, output_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """A running suite that is killed if the block is left before it finished."""
    process = start_suite(url, era, output_dir)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)


def finish_suite(process: subprocess.Popen[str], output_dir: Path) -> SuiteRun:
    try:
        stdout, stderr = process.communicate(timeout=SUITE_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate(timeout=10)
        raise
    summary = parse_summary(stdout)
    assert summary, f"no summary in the suite's output:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return SuiteRun(summary, *read_checks(output_dir))


@dataclass
class Comparison:
    era: str
    direct: SuiteRun
    gateway: SuiteRun

    def table(self) -> str:
        rows = [f"{'scenario':48} {'direct':12} {'gateway':12} note"]
        for scenario in sorted(set(self.direct.summary) | set(self.gateway.summary)):
            key = (self.era, scenario)
            note = "stateless" if key in STATELESS_EXCEPTIONS else "GATEWAY BUG" if key in GATEWAY_BUGS else ""
            rows.append(f"{scenario:48} {self.direct.verdict(scenario):12} {self.gateway.verdict(scenario):12} {note}")
        return "\n".join(rows)


def compare(era: str, workdir: Path) -> Comparison:
    direct_out, gateway_out = workdir / "direct-results", workdir / "gateway-results"
    with ExitStack() as stack:
        direct_url = stack.enter_context(run_asgi(fixture.build_app()))
        proxied_url = stack.enter_context(gateway_in_front_of_fixture(workdir / "gateway"))
        direct = stack.enter_context(suite_process(direct_url, era, direct_out))
        through = stack.enter_context(suite_process(proxied_url, era, gateway_out))
        return Comparison(era, finish_suite(direct, direct_out), finish_suite(through, gateway_out))


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Comparison]:
    """Runs an era's comparison on first use and keeps it for the module's other cases."""
    done: dict[str, Comparison | BaseException] = {}

    def get(era: str) -> Comparison:
        if era not in done:
            try:
                done[era] = compare(era, tmp_path_factory.mktemp(f"conformance-{era}"))
            except Exception as exc:  # kept: one broken run must not be repeated by every case
                done[era] = exc
        outcome = done[era]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return get


# --- the cases ---------------------------------------------------------------------------


def _cases() -> list[Any]:
    cases = []
    for era, scenarios in SCENARIOS.items():
        for scenario in sorted(scenarios):
            key = (era, scenario)
            if key in STATELESS_EXCEPTIONS:
                continue
            marks = [pytest.mark.xfail(strict=True, reason=f"GATEWAY BUG: {GATEWAY_BUGS[key]}")] if key in GATEWAY_BUGS else []
            cases.append(pytest.param(era, scenario, marks=marks, id=f"{era}:{scenario}"))
    return cases


@needs_suite
@pytest.mark.parametrize(("era", "scenario"), _cases())
def test_a_scenario_passing_directly_passes_through_the_gateway(
    era: str, scenario: str, comparison: Callable[[str], Comparison]
) -> None:
    result = comparison(era)
    if not result.direct.passes(scenario):
        pytest.fail(f"{scenario} does not pass directly against the fixture, so it cannot be compared:\n{result.direct.explain(scenario)}")
    assert result.gateway.passes(scenario), (
        f"{scenario} ({era}) passes directly, not through the gateway:\n{result.gateway.explain(scenario)}\n\n{result.table()}"
    )
    # A SHOULD the fixture meets and the gateway misses is a fidelity loss too.
    new_warnings = result.gateway.warnings.get(scenario, set()) - result.direct.warnings.get(scenario, set())
    assert new_warnings == set(), f"{scenario} ({era}) warns only through the gateway:\n{result.gateway.explain(scenario)}"


@needs_suite
@pytest.mark.parametrize(("era", "scenario"), sorted(STATELESS_EXCEPTIONS), ids=[f"{e}:{s}" for e, s in sorted(STATELESS_EXCEPTIONS)])
def test_a_stateless_exception_still_fails_for_its_stated_reason(
    era: str, scenario: str, comparison: Callable[[str], Comparison]
) -> None:
    result = comparison(era)
    assert result.direct.passes(scenario), f"{scenario} no longer passes directly:\n{result.direct.explain(scenario)}"
    assert not result.gateway.passes(scenario), (
        f"{scenario} now passes through the gateway: remove it from STATELESS_EXCEPTIONS "
        f"(its reason was: {STATELESS_EXCEPTIONS[(era, scenario)]})"
    )


@needs_suite
@pytest.mark.parametrize("era", list(SCENARIOS))
def test_every_scenario_passing_directly_is_compared(era: str, comparison: Callable[[str], Comparison]) -> None:
    """A suite upgrade that adds a scenario must not slip past the comparison unlisted."""
    result = comparison(era)
    passing_directly = {s for s in result.direct.summary if result.direct.passes(s)}
    assert passing_directly - SCENARIOS[era] == set(), result.table()


def test_the_exception_lists_name_only_compared_scenarios_and_do_not_overlap() -> None:
    for era, scenario in [*STATELESS_EXCEPTIONS, *GATEWAY_BUGS]:
        assert scenario in SCENARIOS[era], (era, scenario)
    assert set(STATELESS_EXCEPTIONS).isdisjoint(GATEWAY_BUGS)


def test_the_mapping_exposes_everything_the_fixture_offers() -> None:
    mapping = manifests("http://127.0.0.1:1/mcp")[2]["spec"]
    assert {t["name"] for t in mapping["tools"]} == {t.name for t in [*fixture.TOOLS, *fixture.MRTR_TOOLS]}
    assert {p["name"] for p in mapping["prompts"]} == {p.name for p in [*fixture.PROMPTS, fixture.MRTR_PROMPT]}
    assert {r["uri"] for r in mapping["resources"]} == {str(r.uri) for r in fixture.RESOURCES}
    assert {t["uriTemplate"] for t in mapping["resourceTemplates"]} == {t.uri_template for t in fixture.TEMPLATES}
    assert all("as" not in t for t in mapping["tools"])
