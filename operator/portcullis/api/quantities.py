"""Resource quantities as Kubernetes writes them: `500m`, `1`, `0.5`, `128Mi`, `1G`, `1e3`.

The pattern is apimachinery's `resource.Quantity` (the one controller-gen puts in CRDs) without
the sign (a negative request or limit is refused by the API server anyway) and with whole
exponents only. `parse_quantity` reads one into an exact Decimal, enough to compare a request
with its limit before the API server is asked (it would refuse the Deployment deep in a
reconcile otherwise); `canonical_quantity` spells one the way the API server stores it.
"""

from __future__ import annotations

import re
from decimal import ROUND_CEILING, Context, Decimal

_NUMBER = r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
QUANTITY_PATTERN = rf"^{_NUMBER}(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?[0-9]+))?$"
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
# Exact arithmetic for any quantity a pod could hold (the default context keeps 28 digits).
_EXACT = Context(prec=80)


def _split(text: str) -> tuple[Decimal, str]:
    """(value, suffix as written); raise ValueError on anything that is not a quantity."""
    match = _QUANTITY_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid quantity {text!r}: use a number with an optional suffix, e.g. 500m, 1, 128Mi or 1G")
    number = match.group(1)
    suffix = text[len(number) :]
    value = Decimal(number)
    if suffix in _BINARY:
        return _EXACT.multiply(value, _BINARY[suffix]), suffix
    if suffix in _DECIMAL:
        return value.scaleb(_DECIMAL[suffix], _EXACT), suffix
    return value.scaleb(int(suffix[1:]), _EXACT), suffix  # an exponent: e3, E-2


def parse_quantity(text: str) -> Decimal:
    """The value of a quantity (`128Mi` -> 134217728); raise ValueError on anything else."""
    return _split(text)[0]


_NANO = Decimal("1e-9")
_DECIMAL_SUFFIXES = {exponent: suffix for suffix, exponent in _DECIMAL.items()}
_BINARY_SUFFIXES = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]


def canonical_quantity(text: str) -> str:
    """The spelling the API server stores a quantity in (`0.5` -> `500m`, `1024Mi` -> `1Gi`).

    A Deployment read back carries its quantities in this form, so rendering them the same way
    keeps "rendered ⊆ observed" true and an unchanged server unpatched. apimachinery's rules:
    the value is rounded up to nano units; a binary-suffixed value that is a whole number of at
    least 1024 keeps a binary suffix (the largest that leaves a whole mantissa), anything else is
    written as a whole mantissa with the largest decimal suffix (or exponent, as it was written)
    that leaves it whole.
    """
    value, suffix = _split(text)
    if value == 0:
        return "0"
    value = value.quantize(_NANO, rounding=ROUND_CEILING, context=_EXACT)
    if suffix in _BINARY and value >= 1024 and value == value.to_integral_value():
        mantissa, power = int(value), 0
        while mantissa % 1024 == 0 and power < len(_BINARY_SUFFIXES) - 1:
            mantissa, power = mantissa // 1024, power + 1
        return f"{mantissa}{_BINARY_SUFFIXES[power]}"
    exponent = -9
    mantissa = int(value.scaleb(9, _EXACT))
    while mantissa % 1000 == 0 and exponent < 18:
        mantissa, exponent = mantissa // 1000, exponent + 3
    if suffix[:1] in ("e", "E") and suffix not in _DECIMAL:
        return f"{mantissa}e{exponent}" if exponent else str(mantissa)
    return f"{mantissa}{_DECIMAL_SUFFIXES[exponent]}"
