"""Resource quantities: which spellings are quantities, their values, and the spelling the API
server stores them in (what a Deployment read back says)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from portcullis.api.quantities import canonical_quantity, parse_quantity


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("500m", "0.5"), ("1", "1"), ("0.5", "0.5"), (".5", "0.5"), ("2.", "2"), ("128Mi", "134217728"),
        ("1Ki", "1024"), ("1G", "1000000000"), ("1k", "1000"), ("1e3", "1000"), ("1E3", "1000"),
        ("1E", "1000000000000000000"), ("100n", "0.0000001"), ("5u", "0.000005"), ("2e-3", "0.002"),
    ],
)
def test_a_quantity_has_the_value_kubernetes_gives_it(text: str, value: str) -> None:
    assert parse_quantity(text) == Decimal(value)


@pytest.mark.parametrize("text", ["", "lots", "-1", "+1", "1.2.3", "1e1.5", "1mi", "1 Gi", "1Mi\n", "Mi", "1KiB", "0x10"])
def test_anything_else_is_refused_with_examples(text: str) -> None:
    with pytest.raises(ValueError, match="e.g. 500m, 1, 128Mi"):
        parse_quantity(text)


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        # Already canonical: left alone (the operator's and the chart's defaults among them).
        ("100m", "100m"), ("1", "1"), ("128Mi", "128Mi"), ("512Mi", "512Mi"), ("1e3", "1e3"), ("1G", "1G"),
        # Decimal: the largest suffix that leaves a whole mantissa.
        ("0.5", "500m"), ("1000m", "1"), ("2000", "2k"), ("1.5", "1500m"), ("0", "0"), ("0Mi", "0"),
        # Binary: kept while whole and at least 1Ki, else decimal.
        ("1024Mi", "1Gi"), ("1.5Gi", "1536Mi"), ("1536Ki", "1536Ki"), ("0.5Ki", "512"),
        # Exponents stay exponents; below a nano unit rounds up to one.
        ("15e2", "1500"), ("0.5e-3", "500e-6"), ("1e-12", "1e-9"),
    ],
)
def test_quantities_are_spelled_as_the_api_server_stores_them(text: str, stored: str) -> None:
    assert canonical_quantity(text) == stored
    assert parse_quantity(stored) == parse_quantity(text) or text == "1e-12"
