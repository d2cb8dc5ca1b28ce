"""Desired ⊆ observed: the one comparison that decides whether the operator writes.

The API server adds fields (defaults, status, uid, resourceVersion, managedFields, a
clusterIP...), so equality would never hold and a naive operator would patch forever. We
only own what we render: a child is in sync when every field we render is present in the
observed object with the same value. Dicts compare key by key; lists compare item by item
at equal length (the server defaults fields *inside* containers and ports, so an item is
itself compared as a subset). When something differs, the patch is the rendered object:
a JSON merge patch replaces each rendered list whole and leaves foreign keys alone.
"""

from __future__ import annotations

from typing import Any


def is_subset(desired: Any, observed: Any) -> bool:
    if isinstance(desired, dict):
        if not isinstance(observed, dict):
            return False
        return all(key in observed and is_subset(value, observed[key]) for key, value in desired.items())
    if isinstance(desired, list):
        if not isinstance(observed, list) or len(desired) != len(observed):
            return False
        return all(is_subset(d, o) for d, o in zip(desired, observed, strict=True))
    return bool(desired == observed)


def without(obj: dict[str, Any], *keys: str) -> dict[str, Any]:
    """A shallow copy of `obj` without top-level `keys` (fields we create but do not own)."""
    return {k: v for k, v in obj.items() if k not in keys}
