"""What a gateway says about itself (`GET :8081/v1/status`), read at the edge into types.

The gateway answers (portcullis.gateway.admin.status):

    {"server": str, "url": str, "ready": bool,
     "exposed": int, "upstream": int,
     "schemaTokens": {"exposed": int, "upstream": int},
     "unknownTools": [{"mapping": str, "name": str, "exposedAs": str, "connection": str}, ...],
     "connections": {<connection>: {"toolCount": int | null, "error": str | null}, ...}}

`unknownTools` lists every allowlisted tool the gateway does not serve, which includes
the tools of a connection it could not list at all (`toolCount` null). Only the first
kind is a typo in a mapping, so a tool counts as unknown here only when its connection
was listed. The report is also older than the config the operator just compiled (it is
fetched on the resync), so the reconciler reports only unknown tools the current config
still exposes under the same mapping, name and connection (`still_unknown`).

A body that does not follow the contract is no report at all (None), not a partial one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from portcullis.api.config import ExposedTool


@dataclass(frozen=True)
class UnknownTool:
    mapping: str
    name: str  # the upstream name the mapping used
    exposed_as: str
    connection: str


@dataclass(frozen=True)
class GatewayReport:
    ready: bool
    exposed: int
    upstream: int
    schema_tokens_exposed: int
    schema_tokens_upstream: int
    unknown_tools: tuple[UnknownTool, ...]
    # Connections whose tools the gateway listed (toolCount is a number).
    listed: frozenset[str]

    def still_unknown(self, tools: Iterable[ExposedTool]) -> dict[str, list[UnknownTool]]:
        """Unknown tools by mapping name: listed connections only, and only those `tools` still expose."""
        current = {(t.mapping, t.upstream_name, t.name, t.connection) for t in tools}
        out: dict[str, list[UnknownTool]] = {}
        for tool in self.unknown_tools:
            if tool.connection in self.listed and (tool.mapping, tool.name, tool.exposed_as, tool.connection) in current:
                out.setdefault(tool.mapping, []).append(tool)
        return out


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_gateway_status(body: Any) -> GatewayReport | None:
    """The report in `body`, or None if `body` does not follow the contract above."""
    if not isinstance(body, dict) or not isinstance(body.get("ready"), bool):
        return None
    exposed, upstream = _int(body.get("exposed")), _int(body.get("upstream"))
    tokens = body.get("schemaTokens")
    if exposed is None or upstream is None or not isinstance(tokens, dict):
        return None
    tokens_exposed, tokens_upstream = _int(tokens.get("exposed")), _int(tokens.get("upstream"))
    unknown_raw, connections = body.get("unknownTools"), body.get("connections")
    if tokens_exposed is None or tokens_upstream is None or not isinstance(unknown_raw, list) or not isinstance(connections, dict):
        return None
    unknown = []
    for item in unknown_raw:
        fields = [item.get(k) if isinstance(item, dict) else None for k in ("mapping", "name", "exposedAs", "connection")]
        strings = [f for f in fields if isinstance(f, str)]
        if len(strings) != len(fields):
            return None
        unknown.append(UnknownTool(*strings))
    listed = frozenset(
        name for name, c in connections.items() if isinstance(c, dict) and _int(c.get("toolCount")) is not None
    )
    return GatewayReport(
        ready=body["ready"],
        exposed=exposed,
        upstream=upstream,
        schema_tokens_exposed=tokens_exposed,
        schema_tokens_upstream=tokens_upstream,
        unknown_tools=tuple(unknown),
        listed=listed,
    )
