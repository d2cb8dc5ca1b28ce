"""The catalog: what each upstream offers, as last seen, and the exposed slice of it.

The exposed tool list is a function of two things that change rarely: the
compiled allowlist and the upstreams' tool lists. It is built once per change
(`Exposure`) and served from memory, so `tools/list` costs no upstream round
trip and no per-request JSON work.

Every gateway replica builds its own catalog from its upstreams; nothing a
request needs lives only in another process.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from portcullis.api.config import ExposedTool, GatewayConfig


def estimate_tokens(definition: dict[str, Any]) -> int:
    """Estimated model tokens of one tool definition as a client puts it in context.

    A tokenizer is model-specific and none ships offline; four characters of
    compact JSON per token is the common rule of thumb for English-and-JSON text.
    It is an estimate, used for the exposed-vs-upstream ratio, and labelled so.
    """
    return math.ceil(len(json.dumps(definition, separators=(",", ":"), sort_keys=True)) / 4)


@dataclass
class UpstreamListing:
    """One connection's tools as last fetched (prompts and resources are fetched per request)."""

    tools: dict[str, dict[str, Any]] | None = None
    error: str | None = None
    fetched_at: float = 0.0

    @property
    def settled(self) -> bool:
        """Known or failed: either way readiness no longer waits for it."""
        return self.tools is not None or self.error is not None

    @property
    def state(self) -> str:
        """pending (never listed), unreachable (the last listing failed and none ever worked), stale
        (the last failed, an earlier one is served), empty (listed, no tools) or listed."""
        if self.error is not None:
            return "stale" if self.tools else "unreachable"
        if self.tools is None:
            return "pending"
        return "listed" if self.tools else "empty"


@dataclass(frozen=True)
class Exposure:
    """The exposed slice, ready to serve."""

    tools: tuple[dict[str, Any], ...]
    by_name: dict[str, ExposedTool]
    input_schemas: dict[str, dict[str, Any]]
    missing: tuple[ExposedTool, ...]
    """Allowlisted tools the upstream does not (or not yet) list: not served, reported in status."""
    upstream_tool_count: int
    exposed_tokens: int
    upstream_tokens: int
    read_only: frozenset[str] = frozenset()
    """Exposed names a read-only token may use: the mapping's readOnly, else the upstream's readOnlyHint."""

    def scoped(self, allowed: Iterable[str] | None) -> tuple[dict[str, Any], ...]:
        if allowed is None:
            return self.tools
        names = set(allowed)
        return tuple(t for t in self.tools if t["name"] in names)


@dataclass
class Catalog:
    listings: dict[str, UpstreamListing] = field(default_factory=dict)

    def listing(self, connection: str) -> UpstreamListing:
        return self.listings.setdefault(connection, UpstreamListing())

    def record_tools(self, connection: str, tools: list[dict[str, Any]]) -> None:
        listing = self.listing(connection)
        listing.tools = {str(t.get("name")): t for t in tools if isinstance(t, dict) and "name" in t}
        listing.error = None
        listing.fetched_at = time.time()

    def record_failure(self, connection: str, error: str) -> None:
        listing = self.listing(connection)
        listing.error = error
        listing.fetched_at = time.time()

    def settled(self, config: GatewayConfig) -> bool:
        return all(self.listing(name).settled for name in config.connections)

    def _in_upstream_order(self, config: GatewayConfig) -> list[ExposedTool]:
        """The allowlisted tools as their upstreams list them: connections by name, each in its own
        order (an agent sees what it would see directly, less what is hidden); those no upstream
        lists come last, by name."""
        positions = {
            name: {tool: index for index, tool in enumerate(self.listing(name).tools or {})} for name in config.connections
        }
        ranks = {name: rank for rank, name in enumerate(sorted(config.connections))}

        def key(exposed: ExposedTool) -> tuple[int, int, int, str]:
            index = positions.get(exposed.connection, {}).get(exposed.upstream_name)
            if index is None:
                return (1, 0, 0, exposed.name)
            return (0, ranks.get(exposed.connection, 0), index, exposed.name)

        return sorted(config.tools, key=key)

    def expose(self, config: GatewayConfig) -> Exposure:
        """Apply the allowlist to what the upstreams list: names, description overrides, order."""
        served: list[dict[str, Any]] = []
        by_name: dict[str, ExposedTool] = {}
        schemas: dict[str, dict[str, Any]] = {}
        missing: list[ExposedTool] = []
        read_only: set[str] = set()
        for exposed in self._in_upstream_order(config):
            upstream = (self.listing(exposed.connection).tools or {}).get(exposed.upstream_name)
            if upstream is None:
                missing.append(exposed)
                continue
            definition = dict(upstream)
            definition["name"] = exposed.name
            if exposed.description is not None:
                definition["description"] = exposed.description
            served.append(definition)
            by_name[exposed.name] = exposed
            hint = (definition.get("annotations") or {}).get("readOnlyHint") if isinstance(definition.get("annotations"), dict) else None
            if exposed.read_only if exposed.read_only is not None else hint is True:
                read_only.add(exposed.name)
            schema = definition.get("inputSchema")
            if isinstance(schema, dict):
                schemas[exposed.name] = schema
        upstream_defs = [
            t for name in config.connections for t in (self.listing(name).tools or {}).values()
        ]
        return Exposure(
            tools=tuple(served),
            by_name=by_name,
            input_schemas=schemas,
            missing=tuple(missing),
            upstream_tool_count=len(upstream_defs),
            exposed_tokens=sum(estimate_tokens(t) for t in served),
            upstream_tokens=sum(estimate_tokens(t) for t in upstream_defs),
            read_only=frozenset(read_only),
        )

