"""The gateway's own pagination of `tools/list`, `prompts/list`, `resources/list` and templates.

A virtual server's list is the allowlisted slice of several upstreams' lists,
each fetched whole (their pages followed), so the upstreams' cursors mean
nothing to an agent. The gateway pages the merged list itself, PAGE_SIZE items
at a time, with a cursor of its own.

The cursor is opaque to agents and needs no state: it encodes the offset of the
next page in the list the agent is allowed to see, so any replica continues
any agent's listing. It reveals nothing an agent could not count itself. When
the list changes between two pages an agent may see an item twice or miss
one, as with any offset; the change is announced (`list_changed`), and the
agent refetches. A cursor this gateway did not issue, or one past the end, is
refused with -32602 (Invalid params), as the spec asks.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from typing import Final, TypeVar

from portcullis.gateway.core import INVALID_PARAMS, RPCError

PAGE_SIZE: Final = 50
_PREFIX: Final = "portcullis-page:"
_DIGITS: Final = re.compile(r"[0-9]{1,9}")

Item = TypeVar("Item")


def page(items: Sequence[Item], cursor: str | None, size: int = PAGE_SIZE) -> tuple[Sequence[Item], str | None]:
    """The page `cursor` points at (the first when None), and the cursor of the next one (None at the end)."""
    start = 0 if cursor is None else _offset(cursor, len(items))
    end = start + size
    return items[start:end], (_cursor(end) if end < len(items) else None)


def _cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"{_PREFIX}{offset}".encode()).decode().rstrip("=")


def _offset(cursor: str, length: int) -> int:
    try:
        decoded = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        decoded = ""
    digits = decoded.removeprefix(_PREFIX)
    if decoded == digits or _DIGITS.fullmatch(digits) is None:
        raise RPCError(INVALID_PARAMS, "Invalid cursor: it was not issued by this server; list again without one")
    offset = int(digits)
    if offset > length:
        raise RPCError(INVALID_PARAMS, "Invalid cursor: the list has changed since it was issued; list again without one")
    return offset
