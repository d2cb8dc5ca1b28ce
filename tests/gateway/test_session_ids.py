"""Session ids are checked once per replica, and checked again whenever the answer could change."""

from __future__ import annotations

from typing import Any

import jwt
import pytest

from portcullis.gateway import session_ids
from portcullis.gateway.identity.tokens import SigningKeys, TokenError
from portcullis.gateway.session_ids import SessionIds

SESSION_ERA = "2025-11-25"


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every signature check of a session id (PyJWT's decode), by the token it checked."""
    seen: list[str] = []
    real = jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr(session_ids.jwt, "decode", counting)
    return seen


def test_a_session_id_is_checked_once_then_remembered(decodes: list[str]) -> None:
    keys = SigningKeys.generate()
    ids = SessionIds(lambda: keys, lambda: "http://gw/mcp")
    session_id = ids.issue_session("ada", SESSION_ERA, {"roots": {}})
    assert session_id is not None
    first = ids.open_session(session_id)
    assert all(ids.open_session(session_id) == first for _ in range(100))
    assert decodes == [session_id]
    assert (first.user, first.protocol_version, first.capabilities) == ("ada", SESSION_ERA, {"roots": {}})


def test_a_new_key_set_a_new_audience_or_the_clock_send_it_back_to_the_check(
    decodes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    current = {"keys": SigningKeys.generate(), "url": "http://gw/mcp"}
    ids = SessionIds(lambda: current["keys"], lambda: current["url"])
    session_id = ids.issue_session("ada", SESSION_ERA, {})
    assert session_id is not None
    ids.open_session(session_id)

    current["url"] = "http://other/mcp"  # the server moved: ids signed for the old URL no longer open
    with pytest.raises(TokenError):
        ids.open_session(session_id)
    current["url"] = "http://gw/mcp"
    ids.open_session(session_id)

    current["keys"] = SigningKeys.generate()  # rotated, and the signing key pruned
    with pytest.raises(TokenError, match="unknown key"):
        ids.open_session(session_id)
    # Checked at first, and against the other URL; back at the first URL the first check still holds;
    # the pruned key is refused before any signature check.
    assert len(decodes) == 2

    fresh = ids.issue_session("ada", SESSION_ERA, {})
    assert fresh is not None
    ids.open_session(fresh)
    ids.open_session(fresh)
    assert decodes.count(fresh) == 1
    # Past its expiry by this replica's clock, a remembered id goes back to the full check (PyJWT,
    # with its own clock, then decides).
    now = session_ids.time.time()
    monkeypatch.setattr(session_ids.time, "time", lambda: now + session_ids.SESSION_SECONDS + 1)
    ids.open_session(fresh)
    assert decodes.count(fresh) == 2


def test_a_forged_session_id_is_never_remembered(decodes: list[str]) -> None:
    keys = SigningKeys.generate()
    ids = SessionIds(lambda: keys, lambda: "http://gw/mcp")
    forged = SessionIds(lambda: SigningKeys.generate(), lambda: "http://gw/mcp").issue_session("ada", SESSION_ERA, {})
    assert forged is not None
    for _ in range(3):
        with pytest.raises(TokenError):
            ids.open_session(forged)
