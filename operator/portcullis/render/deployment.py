"""The gateway Deployment.

Hardened the way the restricted Pod Security Standard asks: non-root uid 10001, read-only
root filesystem (a small emptyDir for /tmp), no capabilities, RuntimeDefault seccomp.

The pod template carries a digest of the signing keys, not of the config: a key rotation
must reach every replica (it rolls the pods), while an allowlist change is watched live
by the running gateways and must not restart anything.

What a cluster decides rather than a server (image, pull policy, pull secrets, resources) comes
in as one `GatewayPod`: the operator builds it at start from its environment, which the Helm
chart sets from its values. A server's `spec.image` and `spec.resources` win over it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from portcullis.api.quantities import canonical_quantity
from portcullis.api.resources import VirtualMCPServer
from portcullis.render.metadata import (
    ADMIN_PORT,
    CONNECT_PORT,
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
# The defaults when the operator's environment names none; the chart's gateway.resources and
# image.pullPolicy defaults are the same (a test holds them together).
DEFAULT_PULL_POLICY = "IfNotPresent"
DEFAULT_RESOURCES: Mapping[str, Mapping[str, str]] = {
    "requests": {"cpu": "100m", "memory": "128Mi"},
    "limits": {"cpu": "1", "memory": "512Mi"},
}
PULL_POLICIES = ("Always", "IfNotPresent", "Never")


@dataclass(frozen=True)
class GatewayPod:
    """The cluster-wide defaults of every gateway pod."""

    image: str
    pull_policy: str = DEFAULT_PULL_POLICY
    # Names of Secrets in each server's own namespace (a pod can use no other namespace's).
    pull_secrets: tuple[str, ...] = ()
    # A container's `resources`: {"requests": {...}, "limits": {...}}, quantities as strings.
    resources: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: copy.deepcopy(DEFAULT_RESOURCES))


def container_resources(server: VirtualMCPServer, pod: GatewayPod) -> dict[str, Any]:
    """The server's own requests and limits when it sets them (as a whole), else the default;
    quantities spelled as the API server stores them (`0.5` is read back as `500m`), so an
    unchanged Deployment compares equal to what was rendered and is not patched again."""
    chosen = server.spec.resources.as_container_resources() if server.spec.resources is not None else pod.resources
    return {key: {name: canonical_quantity(q) for name, q in amounts.items()} for key, amounts in chosen.items()}


def build_deployment(server: VirtualMCPServer, *, pod: GatewayPod, keys_digest: str) -> dict[str, Any]:
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
                **({"imagePullSecrets": [{"name": secret} for secret in pod.pull_secrets]} if pod.pull_secrets else {}),
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
                        "image": server.spec.image or pod.image,
                        "imagePullPolicy": pod.pull_policy,
                        "args": ["gateway", "--in-cluster", "--server", name, "--namespace", ns],
                        "env": [
                            {"name": "PORTCULLIS_SERVER", "value": name},
                            {"name": "PORTCULLIS_NAMESPACE", "value": ns},
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            # Where the other replicas pass on answers to requests relayed from this one.
                            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                            {"name": "PORTCULLIS_STATE_DIR", "value": STATE_DIR},
                        ],
                        "ports": [
                            {"name": "mcp", "containerPort": MCP_PORT, "protocol": "TCP"},
                            {"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
                            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
                            {"name": "connect", "containerPort": CONNECT_PORT, "protocol": "TCP"},
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
                        "resources": container_resources(server, pod),
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
