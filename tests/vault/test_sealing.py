from __future__ import annotations

import base64

import pytest

from portcullis.vault.sealing import SealError, associated_data, new_key, seal, unseal

PLACE = {"tenant": "acme", "user": "alice@example.com", "connection": "gmail"}


def test_a_sealed_value_opens_where_it_was_sealed() -> None:
    key = new_key()
    sealed = seal(key, "ya29.secret-token", **PLACE)
    assert sealed.startswith("v1.")
    assert "secret" not in sealed
    assert unseal(key, sealed, **PLACE) == "ya29.secret-token"


def test_sealing_twice_gives_different_text() -> None:
    key = new_key()
    assert seal(key, "s", **PLACE) != seal(key, "s", **PLACE)


def test_new_keys_are_32_random_bytes() -> None:
    a, b = new_key(), new_key()
    assert len(a) == 32 and a != b


@pytest.mark.parametrize("moved", [
    {"user": "bob@example.com"},
    {"tenant": "globex"},
    {"connection": "slack"},
])
def test_a_sealed_value_moved_elsewhere_does_not_open(moved: dict[str, str]) -> None:
    key = new_key()
    sealed = seal(key, "the-secret", **PLACE)
    with pytest.raises(SealError) as err:
        unseal(key, sealed, **(PLACE | moved))
    assert "the-secret" not in str(err.value)


def test_a_tampered_value_does_not_open() -> None:
    key = new_key()
    raw = bytearray(base64.urlsafe_b64decode(seal(key, "the-secret", **PLACE)[3:]))
    raw[15] ^= 0x01
    with pytest.raises(SealError):
        unseal(key, "v1." + base64.urlsafe_b64encode(bytes(raw)).decode(), **PLACE)


def test_a_wrong_key_does_not_open() -> None:
    sealed = seal(new_key(), "the-secret", **PLACE)
    with pytest.raises(SealError):
        unseal(new_key(), sealed, **PLACE)


@pytest.mark.parametrize("bad", ["v2.AAAA", "v1.!!!not-base64!!!", "v1.AAAA", "", "v1.ü"])
def test_malformed_values_raise_seal_error(bad: str) -> None:
    with pytest.raises(SealError):
        unseal(new_key(), bad, **PLACE)


def test_a_short_key_is_refused() -> None:
    with pytest.raises(SealError):
        seal(b"short", "x", **PLACE)


def test_associated_data_is_unambiguous_across_separators() -> None:
    assert associated_data("a|b", "c", "d") != associated_data("a", "b|c", "d")
    assert associated_data("a", "bc", "d") != associated_data("ab", "c", "d")
    assert associated_data("t", "u\x00", "c") != associated_data("t", "u", "\x00c")
