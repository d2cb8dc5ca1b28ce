"""One event per request, written when the request's block exits, whatever ends it."""

from __future__ import annotations

import asyncio

import pytest

from portcullis.gateway.audit import MemoryAuditSink
from portcullis.gateway.audit.keys import MemoryAuditKeys
from portcullis.gateway.audit.recorder import recording
from portcullis.gateway.audit.trail import AuditTrail
from portcullis.gateway.identity.tokens import SessionClaims

CLAIMS = SessionClaims(iss="https://gw.example", aud="acme/summarizer", sub="ada@example.com", tenant="acme", exp=2**40, iat=0.0, jti="j1")


class Surprise(Exception):
    pass


def trail() -> tuple[AuditTrail, MemoryAuditSink]:
    sink = MemoryAuditSink()
    return AuditTrail(server="acme/summarizer", tenant="acme", keys=MemoryAuditKeys(), sinks=[sink]), sink


def test_a_request_that_ends_normally_is_recorded_once_with_what_it_learned() -> None:
    audit, sink = trail()
    with recording(audit, CLAIMS, "tools/call", "fetch_mails") as record:
        record.allow("inbox")
        with record.upstream():
            pass
        record.result({"content": []}, "ok")
    [event] = sink.events
    assert (event.request_id, event.user, event.jti, event.tool, event.connection) == (record.request_id, "ada@example.com", "j1", "fetch_mails", "inbox")
    assert (event.decision, event.reason, event.outcome) == ("allow", "allowlisted", "ok")
    assert event.upstream_ms is not None and event.latency_ms >= event.upstream_ms >= 0


def test_an_unanticipated_exception_is_recorded_by_its_class_and_goes_on_up() -> None:
    audit, sink = trail()
    with pytest.raises(Surprise), recording(audit, CLAIMS, "tools/call", "fetch_mails") as record:
        record.allow("inbox")
        with record.upstream():
            raise Surprise("payload that must not be recorded")
    [event] = sink.events
    assert (event.outcome, event.reason, event.detail) == ("error", "internal_error", "Surprise")
    assert event.upstream_ms is not None  # timed although the upstream raised


def test_a_cancelled_request_is_recorded_as_cancelled() -> None:
    audit, sink = trail()
    with pytest.raises(asyncio.CancelledError), recording(audit, CLAIMS, "tools/call", "fetch_mails"):
        raise asyncio.CancelledError
    [event] = sink.events
    assert (event.decision, event.outcome, event.reason) == ("deny", "error", "cancelled")


def test_an_outcome_already_known_is_kept_when_the_block_then_raises() -> None:
    audit, sink = trail()
    with pytest.raises(Surprise), recording(audit, None, "tools/call", "fetch_mails") as record:
        record.deny("not_exposed")
        raise Surprise
    [event] = sink.events
    assert (event.user, event.decision, event.outcome, event.reason, event.detail) == (None, "deny", "denied", "not_exposed", None)


def test_every_request_gets_its_own_request_id() -> None:
    audit, sink = trail()
    for _ in range(100):
        with recording(audit, CLAIMS, "tools/list", None):
            pass
    assert len({e.request_id for e in sink.events}) == 100
