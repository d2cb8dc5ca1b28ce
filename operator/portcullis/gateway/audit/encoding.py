"""The two JSON forms audit data is written in, each by one encoder made once.

- **canonical**: sorted keys, no spaces, UTF-8, no NaN. The digests and the chain's links
  hash it, so its bytes must never change (tests/gateway/audit/test_event_bytes.py).
- **line**: keys in their given order, ASCII-escaped, no spaces: the JSON lines on stdout
  and in files.

`json.dumps` with options builds a new encoder per call; these are built once with the
same options, so they write the same bytes. An event is encoded in both forms on every
call, so `Fields` writes both in one pass: each value's JSON text is the same in both
forms unless it is a string holding a character they escape differently (non-ASCII,
DEL, control characters other than the named ones), which is then escaped twice.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import Any, Final

_CANONICAL: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_LINE: Final = json.JSONEncoder(separators=(",", ":"))


def canonical_json(value: Any) -> bytes:
    """One byte string per JSON value: sorted keys, no spaces, UTF-8."""
    return _CANONICAL.encode(value).encode()


def canonical_text(value: Any) -> str:
    """`canonical_json(value)` before its UTF-8 encoding."""
    return _CANONICAL.encode(value)


def line_json(value: Any) -> str:
    """`json.dumps(value, separators=(",", ":"))`."""
    return _LINE.encode(value)


def canonical_scalar(value: str | int | None) -> str:
    """`canonical_text(value)` for a string, an int or None, without an encoder's setup."""
    if type(value) is str:
        return encode_basestring(value)
    if value is None:
        return "null"
    if type(value) is int:
        return int.__repr__(value)
    return canonical_text(value)


class Fields:
    """Both forms of flat objects that all have these keys, in this order (an event's)."""

    def __init__(self, keys: Sequence[str]):
        self._line_keys = [encode_basestring_ascii(key) + ":" for key in keys]
        self._sorted = sorted(range(len(keys)), key=keys.__getitem__)  # json's sort_keys order
        self._canonical_keys = [encode_basestring(keys[i]) + ":" for i in self._sorted]

    def encode(self, values: Sequence[Any]) -> tuple[str, str] | None:
        """(line, canonical text) of the object, exactly as `line_json` and `canonical_text` write
        it; None if a value is not a str, None, an int or a finite float (encode the dict then)."""
        line: list[str] = []
        canonical: list[str] = []
        for value in values:
            kind = type(value)
            if kind is str:
                text = encode_basestring_ascii(value)
                line.append(text)
                # Without a \u escape both forms escape alike (", \, \n, \r, \t, \b, \f);
                # "\\u" may also be an escaped backslash before a u: escaping again is then merely redundant.
                canonical.append(encode_basestring(value) if "\\u" in text else text)
                continue
            if value is None:
                text = "null"
            elif kind is int:
                text = int.__repr__(value)
            elif kind is float and math.isfinite(value):
                text = float.__repr__(value)
            else:
                return None
            line.append(text)
            canonical.append(text)
        keys = self._canonical_keys
        return (
            "{" + ",".join([key + text for key, text in zip(self._line_keys, line)]) + "}",
            "{" + ",".join([keys[n] + canonical[i] for n, i in enumerate(self._sorted)]) + "}",
        )
