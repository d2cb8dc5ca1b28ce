"""The call path's JSON (gateway/jsonwire.py) reads and writes what the standard library would."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portcullis.gateway import jsonwire

# Every JSON value: text with any code point (lone surrogates included), integers past 64 bits,
# floats of every magnitude. NaN is left out only because it is not equal to itself.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=False)
    | st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF))
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(values, st.booleans())
def test_reads_what_json_reads(value: object, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    assert jsonwire.loads(text) == json.loads(text)
    if ascii_only:  # bytes as they come off a socket
        assert jsonwire.loads(text.encode()) == json.loads(text.encode())


@settings(max_examples=400, deadline=None)
@given(values)
def test_writes_compact_json_that_reads_back_the_same(value: object) -> None:
    written = jsonwire.dumps(value)
    assert isinstance(written, bytes)
    assert json.loads(written) == value
    try:
        standard = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate, which UTF-8 cannot hold: written escaped
        standard = json.dumps(value, separators=(",", ":")).encode()
    if not _has_float(value):  # a float may be spelled another way (0.00001 for 1e-05), the same number
        assert written == standard


def _has_float(value: object) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_has_float(v) for v in value.values())
    return isinstance(value, list) and any(_has_float(v) for v in value)


def test_non_ascii_is_written_as_utf8_and_a_lone_surrogate_as_its_escape() -> None:
    assert jsonwire.dumps({"text": "naïve – ✓"}) == '{"text":"naïve – ✓"}'.encode()
    assert jsonwire.dumps({"text": "\ud800"}) == b'{"text":"\\ud800"}'
    assert jsonwire.dumps({"a": [1, 2.5, None, True]}) == b'{"a":[1,2.5,null,true]}'


@pytest.mark.parametrize(
    "text",
    [
        b'"\\ud800"',  # a lone surrogate escape: json reads it, pydantic-core does not
        b"\xef\xbb\xbf{}",  # a UTF-8 byte-order mark
        '{"a": 1}'.encode("utf-16"),  # UTF-16 with its mark, which json.loads detects
        b'{"a": NaN, "b": -Infinity}',
        b'{"a": 1, "a": 2}',
        b"123456789012345678901234567890123",
        b"1e400",
    ],
)
def test_what_only_json_reads_is_still_read(text: bytes) -> None:
    expected = json.loads(text)
    got = jsonwire.loads(text)
    assert repr(got) == repr(expected)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=24) | st.text(alphabet='{}[]",:0123456789.eE+-tfnulrsaNIiy \\\n', max_size=24).map(str.encode))
def test_any_bytes_are_read_or_refused_as_json_would(text: bytes) -> None:
    try:
        expected = json.loads(text)
    except ValueError:
        with pytest.raises(ValueError):
            jsonwire.loads(text)
    else:
        assert repr(jsonwire.loads(text)) == repr(expected)


@pytest.mark.parametrize(
    "text",
    [b"", b" ", b"{", b"[1,]", b'{"a" 1}', b"\xff", b"nul", b'"\x01"', b"{} {}", b"'a'", b"01", b"+1", b".5", b"1.",
     b"-", b'"\\x"', b'"\\u12"', b"[1] x", b"nan", b"infinity", b'{"a":1,}', b"\x00"],
)
def test_what_is_not_json_is_refused_as_json_refuses_it(text: bytes) -> None:
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        jsonwire.loads(text)


def test_a_document_nested_too_deeply_to_read_is_a_value_error() -> None:
    with pytest.raises(RecursionError):  # what the standard library does
        json.loads(b"[" * 5000 + b"]" * 5000)
    with pytest.raises(ValueError, match="nested too deeply"):
        jsonwire.loads(b"[" * 5000 + b"]" * 5000)
    assert jsonwire.loads(b"[" * 200 + b"]" * 200) == json.loads(b"[" * 200 + b"]" * 200)
