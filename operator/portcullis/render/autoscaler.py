"""The HorizontalPodAutoscaler (autoscaling/v2, CPU), only when `spec.autoscaling` is set."""

from __future__ import annotations

from typing import Any

from portcullis.api.resources import VirtualMCPServer
from portcullis.render.metadata import object_meta


def build_autoscaler(server: VirtualMCPServer) -> dict[str, Any] | None:
    scaling = server.spec.autoscaling
    if scaling is None:
        return None
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": object_meta(server, server.metadata.name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": server.metadata.name},
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": scaling.target_cpu_utilization_percentage},
                    },
                }
            ],
        },
    }
