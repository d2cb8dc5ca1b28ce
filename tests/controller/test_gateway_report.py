"""The operator reads exactly what a gateway's `GET /v1/status` says."""

from __future__ import annotations

from typing import Any

from portcullis.api.config import ExposedTool
from portcullis.controller.gateway_report import UnknownTool, read_gateway_status
from tests.gateway.conftest import Stack, stack  # noqa: F401  (the gateway suite's running stack)


def body(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "server": "summarizer", "url": "http://summarizer.acme.svc:8080/mcp", "ready": True,
        "exposed": 1, "upstream": 30, "schemaTokens": {"exposed": 180, "upstream": 6100},
        "unknownTools": [
            {"mapping": "summarizer-gmail", "name": "fetch_mail", "exposedAs": "gmail_fetch", "connection": "gmail"},
            {"mapping": "summarizer-down", "name": "anything", "exposedAs": "anything", "connection": "down"},
        ],
        "connections": {"gmail": {"toolCount": 30, "error": None}, "down": {"toolCount": None, "error": "refused"}},
    }
    return {**base, **overrides}


def test_the_status_contract_is_read_field_by_field() -> None:
    report = read_gateway_status(body())
    assert report is not None
    assert (report.ready, report.exposed, report.upstream) == (True, 1, 30)
    assert (report.schema_tokens_exposed, report.schema_tokens_upstream) == (180, 6100)
    assert report.listed == {"gmail"}
    assert report.unknown_tools[0] == UnknownTool("summarizer-gmail", "fetch_mail", "gmail_fetch", "gmail")


def test_only_listed_connections_and_still_mapped_tools_are_unknown() -> None:
    report = read_gateway_status(body())
    assert report is not None
    typo = ExposedTool(name="gmail_fetch", connection="gmail", upstream_name="fetch_mail", mapping="summarizer-gmail")
    down = ExposedTool(name="anything", connection="down", upstream_name="anything", mapping="summarizer-down")
    # "down" could not be listed at all: its tools are not typos.
    assert report.still_unknown([typo, down]) == {"summarizer-gmail": [report.unknown_tools[0]]}
    # Fixed since the report was fetched: no longer exposed, no longer reported.
    fixed = typo.model_copy(update={"upstream_name": "fetch_mails"})
    assert report.still_unknown([fixed, down]) == {}


def test_a_body_off_the_contract_is_no_report() -> None:
    assert read_gateway_status(body(upstream="30")) is None
    assert read_gateway_status(body(ready=None)) is None
    assert read_gateway_status(body(schemaTokens={"exposed": 1})) is None
    assert read_gateway_status(body(unknownTools=[{"mapping": "m", "name": "n"}])) is None
    assert read_gateway_status(body(connections=None)) is None
    assert read_gateway_status(["not", "a", "dict"]) is None


def test_a_running_gateway_status_reads_as_a_report(stack: Stack) -> None:  # noqa: F811
    status, answer = stack.admin("GET", "/v1/status")
    assert status == 200
    report = read_gateway_status(answer)
    assert report is not None
    assert report.exposed == 7 and report.upstream > 30
    assert "inbox" in report.listed and "down" not in report.listed
    config = stack.gw.gateway.config
    # The "down" connection refuses connections: its mapped tool is missing, not a typo.
    assert [t.mapping for t in report.unknown_tools] == ["summarizer-down"]
    assert report.still_unknown(config.tools) == {}
