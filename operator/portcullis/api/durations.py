"""Durations as Kubernetes users write them: `15m`, `1h30m`, `90s`, `500ms`, `7d`."""

from __future__ import annotations

import re

_PART = re.compile(r"([0-9]+)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Return the duration in whole seconds (rounded down); raise ValueError on bad input."""
    text = text.strip()
    pos, total = 0, 0.0
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        total += int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"invalid duration {text!r}: use a number and a unit, e.g. 15m, 1h or 90s")
    return int(total)


def format_duration(seconds: int) -> str:
    """The shortest `1h30m`-style spelling of a whole number of seconds."""
    if seconds <= 0:
        return "0s"
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            out.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(out)
