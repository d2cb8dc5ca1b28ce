"""The gateway Deployment.

Hardened the way the restricted Pod Security Standard asks: non-root uid 10001, read-only
root filesystem (a small emptyDir for /tmp), no capabilities, RuntimeDefault seccomp.

The pod template carries a digest of the signing keys, not of the config: a key rotation
must reach every replica (it rolls the pods), while an allowlist change is watched live
by the running gateways and must not restart anything.
"""

from __future__ import annotations

from typing import Any

from portcullis.api.resources import VirtualMCPServer
from portcullis.render.metadata import (
    ADMIN_PORT,
    MCP_PORT,
    METRICS_PORT,
    gateway_account_name,
    object_meta,
    selector_labels,
)
from portcullis.render.metadata import labels as child_labels

KEYS_DIGEST_ANNOTATION = "portcullis.dev/signing-keys-digest"
STATE_DIR = "/var/lib/portcullis"
STATE_SIZE = "1Gi"
GATEWAY_UID = 10001
RESOURCES = {
    "requests": {"cpu": "100m", "memory": "128Mi"},
    "limits": {"cpu": "1", "memory": "512Mi"},
}


def build_deployment(server: VirtualMCPServer, *, image: str, keys_digest: str) -> dict[str, Any]:
    name = server.metadata.name
    ns = server.metadata.namespace
    spec: dict[str, Any] = {
        "selector": {"matchLabels": selector_labels(server)},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "template": {
            "metadata": {
                "labels": child_labels(server),
                "annotations": {KEYS_DIGEST_ANNOTATION: keys_digest},
            },
            "spec": {
                "serviceAccountName": gateway_account_name(server),
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": GATEWAY_UID,
                    "runAsGroup": GATEWAY_UID,
                    "fsGroup": GATEWAY_UID,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [
                    {
                        "name": "gateway",
                        "image": image,
                        "imagePullPolicy": "IfNotPresent",
                        "args": ["gateway", "--in-cluster", "--server", name, "--namespace", ns],
                        "env": [
                            {"name": "PORTCULLIS_SERVER", "value": name},
                            {"name": "PORTCULLIS_NAMESPACE", "value": ns},
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "PORTCULLIS_STATE_DIR", "value": STATE_DIR},
                        ],
                        "ports": [
                            {"name": "mcp", "containerPort": MCP_PORT, "protocol": "TCP"},
                            {"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
                            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
                        ],
                        "livenessProbe": {
                            "httpGet": {"path": "/healthz", "port": "mcp"},
                            "periodSeconds": 10,
                            "failureThreshold": 3,
                        },
                        "readinessProbe": {
                            "httpGet": {"path": "/readyz", "port": "mcp"},
                            "periodSeconds": 5,
                            "failureThreshold": 2,
                        },
                        "resources": RESOURCES,
                        "securityContext": {
                            "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [
                            {"name": "tmp", "mountPath": "/tmp"},
                            {"name": "state", "mountPath": STATE_DIR},
                        ],
                    }
                ],
                "volumes": [
                    {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                    # The embedded audit store (spec.audit.store: sqlite) lives here, as long as the pod.
                    {"name": "state", "emptyDir": {"sizeLimit": STATE_SIZE}},
                ],
            },
        },
    }
    if server.spec.autoscaling is None:
        # With autoscaling the HPA owns spec.replicas; writing it here would fight the HPA.
        spec = {"replicas": server.spec.replicas, **spec}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(server, name),
        "spec": spec,
    }
