"""The official conformance suite against the reference "everything" server, directly and through a gateway.

tests/interop/test_gateway_conformance.py holds the gateway to the suite in front
of the project's own fixture. This is the same comparison in front of a server
the project did not write (`@modelcontextprotocol/server-everything`, see
tests/support/foreign.py), per protocol era: the suite runs against one
everything-server instance directly and, concurrently, against a second one
behind a gateway that exposes all of it (through the token-presenting proxy of
tests/support/auth_proxy.py). Each scenario that passes directly is one case and
must pass through the gateway.

The suite's scenarios are written for its own `test_*` fixture tools, so most of
them fail against the everything server already directly (it has no
`test_simple_text` tool, no `test://` resources); those are not compared. The
everything server speaks only the session protocol, so at `--requirements
2026-07-28` almost nothing passes directly (DIRECT_PASSES records what does).

Three exception lists: STATELESS_EXCEPTIONS (imported from the fixture's
comparison: what a session-less gateway cannot pass by construction; such a case
asserts it still does not), NOT_COMPARABLE (scenarios that pass directly only
because of how the everything server answers a tool or a resource it does not
have; each case asserts that is still so), and FOREIGN_GAPS (strict xfails with the observed
failure; a fix turns one into an XPASS failure until the entry is removed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.examples.test_fixture_conformance import suite_missing
from tests.interop.test_foreign_servers import discover
from tests.interop.test_gateway_conformance import (
    MODERN_ERA,
    SESSION_ERA,
    STATELESS_EXCEPTIONS,
    SuiteRun,
    finish_suite,
    suite_process,
)
from tests.support.auth_proxy import auth_proxy
from tests.support.foreign import everything_missing, everything_server, gateway_in_front

pytestmark = pytest.mark.interop
_missing = suite_missing() or everything_missing()
needs_both = pytest.mark.skipif(_missing is not None, reason=str(_missing))

# What passes directly against server-everything 2026.8.31 with the suite 0.2.0-alpha.12 (observed).
DIRECT_PASSES: dict[str, set[str]] = {
    SESSION_ERA: {
        "server-initialize", "logging-set-level", "ping", "tools-list", "tools-call-simple-text", "tools-call-error",
        "server-sse-multiple-streams", "resources-list", "resources-subscribe", "resources-unsubscribe", "prompts-list",
    },
    MODERN_ERA: {"input-required-result-validate-input"},
}  # fmt: skip

FOREIGN_GAPS: dict[tuple[str, str], str] = {}  # none observed: every compared scenario passes through the gateway

_ACCIDENTAL = (
    "passes directly only by accident: the everything server has no {tool} tool and answers the call with an "
    "isError *result* ('MCP error -32602: Tool {tool} not found'), which the scenario's checks accept; the gateway "
    "answers a tool outside its allowlist with the JSON-RPC error 'Unknown tool: {tool}' (the spec's protocol "
    "error for an unknown tool), so there is nothing of the upstream's to compare"
)
_UNKNOWN_RESOURCE = (
    "passes directly only by accident: the everything server accepts a subscription to any URI, the suite's "
    "test://watched-resource (which it does not have) included; the gateway answers a resource outside its allowlist "
    "as resources/read does, 'Resource not found' (a hidden resource looks like a missing one), so there is nothing "
    "of the upstream's to compare (the subscription itself is compared in test_foreign_servers.py)"
)
NOT_COMPARABLE: dict[tuple[str, str], tuple[str, str]] = {
    # (era, scenario): (reason, what the gateway's failure says)
    (SESSION_ERA, "tools-call-simple-text"): (_ACCIDENTAL.format(tool="test_simple_text"), "Unknown tool: test_simple_text"),
    (SESSION_ERA, "tools-call-error"): (_ACCIDENTAL.format(tool="test_error_handling"), "Unknown tool: test_error_handling"),
    (SESSION_ERA, "resources-subscribe"): (_UNKNOWN_RESOURCE, "Resource not found: test://watched-resource"),
    (SESSION_ERA, "resources-unsubscribe"): (_UNKNOWN_RESOURCE, "Resource not found: test://watched-resource"),
}


@contextmanager
def everything_behind_a_gateway(workdir: Path) -> Iterator[str]:
    """A fresh everything server, a gateway exposing all of it, and the token-presenting proxy; yields its URL."""
    with everything_server() as upstream:
        catalog = anyio.run(discover, upstream.url)
        with gateway_in_front("everything", upstream.url, catalog, workdir) as fronted:
            with auth_proxy(fronted.url, fronted.token) as url:
                yield url


def compare(era: str, workdir: Path) -> tuple[SuiteRun, SuiteRun]:
    direct_out, gateway_out = workdir / "direct-results", workdir / "gateway-results"
    with ExitStack() as stack:
        direct_url = stack.enter_context(everything_server()).url
        proxied_url = stack.enter_context(everything_behind_a_gateway(workdir / "gateway"))
        direct = stack.enter_context(suite_process(direct_url, era, direct_out))
        through = stack.enter_context(suite_process(proxied_url, era, gateway_out))
        return finish_suite(direct, direct_out), finish_suite(through, gateway_out)


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[SuiteRun, SuiteRun]]:
    """Runs an era's two suites on first use and keeps them for the module's other cases."""
    done: dict[str, tuple[SuiteRun, SuiteRun] | BaseException] = {}

    def get(era: str) -> tuple[SuiteRun, SuiteRun]:
        if era not in done:
            try:
                done[era] = compare(era, tmp_path_factory.mktemp(f"foreign-conformance-{era}"))
            except Exception as exc:  # kept: one broken run must not be repeated by every case
                done[era] = exc
        outcome = done[era]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return get


def table(era: str, direct: SuiteRun, gateway: SuiteRun) -> str:
    rows = [f"{'scenario':48} {'direct':12} {'gateway':12}"]
    for scenario in sorted(set(direct.summary) | set(gateway.summary)):
        rows.append(f"{scenario:48} {direct.verdict(scenario):12} {gateway.verdict(scenario):12}")
    return f"era {era}\n" + "\n".join(rows)


def _cases() -> list[Any]:
    cases = []
    for era, scenarios in DIRECT_PASSES.items():
        for scenario in sorted(scenarios):
            key = (era, scenario)
            if key in STATELESS_EXCEPTIONS or key in NOT_COMPARABLE:
                continue
            marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=f"GATEWAY GAP: {FOREIGN_GAPS[key]}")] if key in FOREIGN_GAPS else []
            cases.append(pytest.param(era, scenario, marks=marks, id=f"{era}:{scenario}"))
    return cases


def _stateless_cases() -> list[Any]:
    keys = sorted(key for key in STATELESS_EXCEPTIONS if key[1] in DIRECT_PASSES[key[0]])
    return [pytest.param(era, scenario, id=f"{era}:{scenario}") for era, scenario in keys]


@needs_both
@pytest.mark.parametrize(("era", "scenario"), _cases())
def test_a_scenario_passing_directly_against_the_everything_server_passes_through_the_gateway(
    era: str, scenario: str, comparison: Callable[[str], tuple[SuiteRun, SuiteRun]]
) -> None:
    direct, gateway = comparison(era)
    assert direct.passes(scenario), f"{scenario} no longer passes directly:\n{direct.explain(scenario)}"
    assert gateway.passes(scenario), (
        f"{scenario} ({era}) passes directly, not through the gateway:\n{gateway.explain(scenario)}\n\n{table(era, direct, gateway)}"
    )
    new_warnings = gateway.warnings.get(scenario, set()) - direct.warnings.get(scenario, set())
    assert new_warnings == set(), f"{scenario} ({era}) warns only through the gateway:\n{gateway.explain(scenario)}"


@needs_both
@pytest.mark.parametrize(("era", "scenario"), _stateless_cases())
def test_a_stateless_exception_still_fails_through_the_gateway(
    era: str, scenario: str, comparison: Callable[[str], tuple[SuiteRun, SuiteRun]]
) -> None:
    direct, gateway = comparison(era)
    assert direct.passes(scenario), f"{scenario} no longer passes directly:\n{direct.explain(scenario)}"
    assert not gateway.passes(scenario), (
        f"{scenario} now passes through the gateway: remove it from STATELESS_EXCEPTIONS "
        f"(its reason was: {STATELESS_EXCEPTIONS[(era, scenario)]})"
    )


@needs_both
@pytest.mark.parametrize(("era", "scenario"), sorted(NOT_COMPARABLE), ids=[f"{e}:{s}" for e, s in sorted(NOT_COMPARABLE)])
def test_a_scenario_passing_only_by_accident_directly_still_does(
    era: str, scenario: str, comparison: Callable[[str], tuple[SuiteRun, SuiteRun]]
) -> None:
    direct, gateway = comparison(era)
    reason, gateway_says = NOT_COMPARABLE[(era, scenario)]
    assert direct.passes(scenario), f"{scenario} no longer passes directly: drop it from NOT_COMPARABLE ({reason})"
    assert not gateway.passes(scenario) and gateway_says in gateway.explain(scenario), (
        f"{scenario} through the gateway is no longer the recorded refusal ({gateway_says!r}):\n{gateway.explain(scenario)}"
    )


@needs_both
@pytest.mark.parametrize("era", list(DIRECT_PASSES))
def test_what_passes_directly_is_what_is_recorded(era: str, comparison: Callable[[str], tuple[SuiteRun, SuiteRun]]) -> None:
    """A suite or server upgrade that changes what passes directly must update DIRECT_PASSES, not slip past."""
    direct, gateway = comparison(era)
    passing = {s for s in direct.summary if direct.passes(s)}
    assert passing == DIRECT_PASSES[era], table(era, direct, gateway)


def test_the_gap_list_names_only_compared_scenarios() -> None:
    for era, scenario in [*FOREIGN_GAPS, *NOT_COMPARABLE]:
        assert scenario in DIRECT_PASSES[era] and (era, scenario) not in STATELESS_EXCEPTIONS, (era, scenario)
    assert set(FOREIGN_GAPS).isdisjoint(NOT_COMPARABLE)

