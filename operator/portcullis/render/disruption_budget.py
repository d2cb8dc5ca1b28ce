"""The PodDisruptionBudget: at most one gateway down at a time during voluntary disruptions.

Only when there is more than one replica (or an HPA): a budget over a single pod would
block node drains forever.
"""

from __future__ import annotations

from typing import Any

from portcullis.api.resources import VirtualMCPServer
from portcullis.render.metadata import object_meta, selector_labels


def wants_disruption_budget(server: VirtualMCPServer) -> bool:
    return server.spec.autoscaling is not None or server.spec.replicas > 1


def build_disruption_budget(server: VirtualMCPServer) -> dict[str, Any] | None:
    if not wants_disruption_budget(server):
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": object_meta(server, server.metadata.name),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(server)}},
    }
