"""Kubernetes-style conditions and the status documents built from them.

A condition's `lastTransitionTime` says when its *status* last flipped, so it is carried
over from the previous condition of the same type unless the status changed; otherwise
every reconcile would rewrite the status, and "nothing changed" would still be a write.
The clock is an argument, so these builders stay pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from portcullis.api.status import ConditionType, Phase, Reason
from portcullis.compile import Problem
from portcullis.controller.gateway_report import GatewayReport

JsonObject = dict[str, Any]


@dataclass(frozen=True)
class Condition:
    type: ConditionType
    ok: bool
    reason: Reason
    message: str


def render_conditions(
    new: Iterable[Condition], previous: Sequence[JsonObject] | None, *, generation: int | None, now: str
) -> list[JsonObject]:
    before = {c.get("type"): c for c in previous or ()}
    out = []
    for cond in new:
        status = "True" if cond.ok else "False"
        old = before.get(cond.type.value)
        changed = old is None or old.get("status") != status
        doc: JsonObject = {
            "type": cond.type.value,
            "status": status,
            "reason": cond.reason.value,
            "message": cond.message,
            "lastTransitionTime": now if changed or old is None else old.get("lastTransitionTime", now),
        }
        if generation is not None:
            doc["observedGeneration"] = generation
        out.append(doc)
    return out


def problems_message(problems: Sequence[Problem], limit: int = 10) -> str:
    lines = [str(p) for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more")
    return "; ".join(lines)


def mapping_condition(problems: Sequence[Problem]) -> Condition:
    if not problems:
        return Condition(ConditionType.ACCEPTED, True, Reason.ACCEPTED, "all tools are exposed")
    return Condition(ConditionType.ACCEPTED, False, problems[0].reason, problems_message(problems))


@dataclass(frozen=True)
class ServerState:
    """What the reconciler learned about one server; `server_status` turns it into `status`."""

    url: str
    generation: int | None
    problems: Sequence[Problem] = ()
    rejected_mappings: int = 0
    exposed_tools: int = 0
    available_replicas: int = 0
    wanted_replicas: int = 1
    gateway: GatewayReport | None = None
    invalid_spec: str | None = None


def server_status(state: ServerState, previous: JsonObject | None, *, now: str) -> JsonObject:
    previous = previous or {}
    if state.invalid_spec is not None:
        conditions = [
            Condition(ConditionType.READY, False, Reason.INVALID_SPEC, "the spec is invalid; nothing was deployed"),
            Condition(ConditionType.CONFIG_VALID, False, Reason.INVALID_SPEC, state.invalid_spec),
        ]
        return _drop_none({
            "phase": Phase.FAILED.value,
            "observedGeneration": state.generation,
            "conditions": render_conditions(conditions, previous.get("conditions"), generation=state.generation, now=now),
        })

    if state.problems:
        config = Condition(
            ConditionType.CONFIG_VALID,
            False,
            Reason.SOME_MAPPINGS_REJECTED,
            f"{state.rejected_mappings} mapping(s) rejected, the rest are served: {problems_message(state.problems)}",
        )
    else:
        config = Condition(ConditionType.CONFIG_VALID, True, Reason.COMPILED, f"{state.exposed_tools} tool(s) exposed")
    available = state.available_replicas >= min(1, state.wanted_replicas)
    if available:
        ready = Condition(
            ConditionType.READY, True, Reason.DEPLOYMENT_AVAILABLE, f"{state.available_replicas} gateway(s) available"
        )
    else:
        ready = Condition(ConditionType.READY, False, Reason.DEPLOYMENT_PROGRESSING, "waiting for gateway pods")
    phase = Phase.PENDING if not available else Phase.DEGRADED if state.problems else Phase.READY

    tools: JsonObject = {"exposed": state.exposed_tools}
    summary_upstream = "?"
    if state.gateway is not None:
        tools["upstream"] = state.gateway.upstream
        summary_upstream = str(state.gateway.upstream)
        tools["schemaTokens"] = {
            "exposed": state.gateway.schema_tokens_exposed,
            "upstream": state.gateway.schema_tokens_upstream,
        }
    return _drop_none({
        "phase": phase.value,
        "url": state.url,
        "observedGeneration": state.generation,
        "conditions": render_conditions([ready, config], previous.get("conditions"), generation=state.generation, now=now),
        "tools": tools,
        "toolsSummary": f"{state.exposed_tools}/{summary_upstream}",
    })


def accepted_status(condition: Condition, previous: JsonObject | None, *, generation: int | None, now: str) -> JsonObject:
    """Status of a ToolMapping or MCPConnection: one `Accepted` condition."""
    previous = previous or {}
    return _drop_none({
        "observedGeneration": generation,
        "conditions": render_conditions([condition], previous.get("conditions"), generation=generation, now=now),
    })


def _drop_none(doc: JsonObject) -> JsonObject:
    # In a merge patch null means "delete", and an absent key never equals None: leave it out.
    return {k: v for k, v in doc.items() if v is not None}
