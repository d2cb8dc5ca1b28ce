"""The rendered children of a VirtualMCPServer, compared as whole objects."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from portcullis.api.resources import VirtualMCPServer
from portcullis.compile import compile
from portcullis.render.autoscaler import build_autoscaler
from portcullis.render.children import build_children
from portcullis.render.config_map import build_config_map, build_revocations_config_map
from portcullis.render.deployment import DEFAULT_RESOURCES, GatewayPod, build_deployment
from portcullis.render.disruption_budget import build_disruption_budget
from portcullis.render.rbac import build_auth_delegator_binding, build_vault_role
from portcullis.render.secret import build_signing_key_secret, keys_digest
from portcullis.render.service import build_service

LABELS = {
    "app.kubernetes.io/name": "portcullis-gateway",
    "app.kubernetes.io/instance": "summarizer",
    "app.kubernetes.io/component": "gateway",
    "app.kubernetes.io/managed-by": "portcullis-operator",
    "app.kubernetes.io/part-of": "portcullis",
    "portcullis.dev/server": "summarizer",
}
OWNER = {
    "apiVersion": "portcullis.dev/v1alpha1",
    "kind": "VirtualMCPServer",
    "name": "summarizer",
    "uid": "uid-1",
    "controller": True,
    "blockOwnerDeletion": True,
}
META = {"name": "summarizer", "namespace": "acme", "labels": LABELS, "ownerReferences": [OWNER]}
SELECTOR = {"app.kubernetes.io/name": "portcullis-gateway", "app.kubernetes.io/instance": "summarizer"}
POD = GatewayPod(image="i")


def server(**spec: Any) -> VirtualMCPServer:
    return VirtualMCPServer.model_validate(
        {"metadata": {"name": "summarizer", "namespace": "acme", "uid": "uid-1"}, "spec": spec}
    )


def test_config_map_carries_the_compiled_config_and_nothing_else() -> None:
    srv = server()
    config = compile(srv, [], []).config
    assert build_config_map(srv, config) == {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {**META, "name": "summarizer-config"},
        "data": {"config.json": config.model_dump_json()},
    }


def test_revocations_config_map_starts_empty() -> None:
    assert build_revocations_config_map(server()) == {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {**META, "name": "summarizer-revocations"},
        "data": {},
    }


def test_signing_key_secret_holds_keys_json_base64() -> None:
    keys = json.dumps({"keys": [{"kid": "k1"}]})
    assert build_signing_key_secret(server(), keys) == {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {**META, "name": "summarizer-signing-keys"},
        "type": "Opaque",
        "data": {"keys.json": base64.b64encode(keys.encode()).decode()},
    }


def test_deployment_is_hardened_and_rolls_on_keys_not_on_config() -> None:
    assert build_deployment(server(replicas=2), pod=GatewayPod(image="ghcr.io/x/portcullis:1"), keys_digest="abc") == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": META,
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": SELECTOR},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": LABELS, "annotations": {"portcullis.dev/signing-keys-digest": "abc"}},
                "spec": {
                    "serviceAccountName": "summarizer-gateway",
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 10001,
                        "runAsGroup": 10001,
                        "fsGroup": 10001,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": "gateway",
                            "image": "ghcr.io/x/portcullis:1",
                            "imagePullPolicy": "IfNotPresent",
                            "args": ["gateway", "--in-cluster", "--server", "summarizer", "--namespace", "acme"],
                            "env": [
                                {"name": "PORTCULLIS_SERVER", "value": "summarizer"},
                                {"name": "PORTCULLIS_NAMESPACE", "value": "acme"},
                                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                                {"name": "PORTCULLIS_STATE_DIR", "value": "/var/lib/portcullis"},
                            ],
                            "ports": [
                                {"name": "mcp", "containerPort": 8080, "protocol": "TCP"},
                                {"name": "admin", "containerPort": 8081, "protocol": "TCP"},
                                {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
                                {"name": "connect", "containerPort": 8083, "protocol": "TCP"},
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
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "128Mi"},
                                "limits": {"cpu": "1", "memory": "512Mi"},
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "runAsNonRoot": True,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "volumeMounts": [
                                {"name": "tmp", "mountPath": "/tmp"},
                                {"name": "state", "mountPath": "/var/lib/portcullis"},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                        {"name": "state", "emptyDir": {"sizeLimit": "1Gi"}},
                    ],
                },
            },
        },
    }


def test_deployment_leaves_replicas_to_the_autoscaler() -> None:
    deployment = build_deployment(server(autoscaling={"maxReplicas": 5}), pod=POD, keys_digest="d")
    assert "replicas" not in deployment["spec"]


def gateway_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "gateway"
    return container  # type: ignore[no-any-return]


def test_the_pod_defaults_set_pull_policy_pull_secrets_and_resources() -> None:
    pod = GatewayPod(
        image="registry.example/portcullis:2",
        pull_policy="Always",
        pull_secrets=("regcred", "mirror"),
        resources={"requests": {"cpu": "250m"}, "limits": {"memory": "1Gi"}},
    )
    deployment = build_deployment(server(), pod=pod, keys_digest="d")
    container = gateway_container(deployment)
    assert (container["image"], container["imagePullPolicy"]) == ("registry.example/portcullis:2", "Always")
    assert container["resources"] == {"requests": {"cpu": "250m"}, "limits": {"memory": "1Gi"}}
    assert deployment["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]


def test_without_pull_secrets_the_pod_names_none() -> None:
    assert "imagePullSecrets" not in build_deployment(server(), pod=POD, keys_digest="d")["spec"]["template"]["spec"]


def test_the_default_pod_is_the_operators_built_in_default() -> None:
    container = gateway_container(build_deployment(server(), pod=POD, keys_digest="d"))
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["resources"] == DEFAULT_RESOURCES


def test_a_servers_image_and_resources_win_over_the_pod_defaults() -> None:
    pod = GatewayPod(image="default:1", resources={"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1"}})
    srv = server(image="mine:2", resources={"limits": {"memory": "2Gi"}})
    container = gateway_container(build_deployment(srv, pod=pod, keys_digest="d"))
    assert container["image"] == "mine:2"
    # As a whole: nothing of the default's requests or CPU limit is merged in.
    assert container["resources"] == {"limits": {"memory": "2Gi"}}
    # Everything else still comes from the pod defaults.
    assert container["imagePullPolicy"] == pod.pull_policy


def test_quantities_are_rendered_as_the_api_server_stores_them() -> None:
    # A Deployment read back says `500m` for `0.5`: rendering the same keeps it unpatched.
    srv = server(resources={"requests": {"cpu": "0.5", "memory": "1024Mi"}, "limits": {"cpu": "2000m", "memory": "1.5Gi"}})
    assert gateway_container(build_deployment(srv, pod=POD, keys_digest="d"))["resources"] == {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"cpu": "2", "memory": "1536Mi"},
    }
    pod = GatewayPod(image="i", resources={"limits": {"cpu": "1.0"}})
    assert gateway_container(build_deployment(server(), pod=pod, keys_digest="d"))["resources"] == {"limits": {"cpu": "1"}}


def test_rendering_does_not_share_the_pod_defaults() -> None:
    pod = GatewayPod(image="i")
    container = gateway_container(build_deployment(server(), pod=pod, keys_digest="d"))
    container["resources"]["limits"]["cpu"] = "64"
    assert pod.resources == DEFAULT_RESOURCES


def test_keys_digest_changes_with_the_keys_only() -> None:
    assert keys_digest('{"a": 1}') == keys_digest('{"a": 1}')
    assert keys_digest('{"a": 1}') != keys_digest('{"a": 2}')


def test_service_exposes_mcp_admin_and_metrics() -> None:
    assert build_service(server()) == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": META,
        "spec": {
            "type": "ClusterIP",
            "selector": SELECTOR,
            "ports": [
                {"name": "mcp", "port": 8080, "targetPort": "mcp", "protocol": "TCP"},
                {"name": "admin", "port": 8081, "targetPort": "admin", "protocol": "TCP"},
                {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"},
                {"name": "connect", "port": 8083, "targetPort": "connect", "protocol": "TCP"},
            ],
        },
    }


def test_vault_role_lives_in_the_vault_namespace_without_owner() -> None:
    assert build_vault_role(server(vault={"namespace": "acme-vault"})) == {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "summarizer-vault", "namespace": "acme-vault", "labels": LABELS},
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["secrets"],
                "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
            }
        ],
    }


def test_vault_role_in_own_namespace_is_owned() -> None:
    assert build_vault_role(server())["metadata"] == {**META, "name": "summarizer-vault"}


def test_auth_delegator_binding_is_cluster_scoped_and_unowned() -> None:
    assert build_auth_delegator_binding(server()) == {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "portcullis:acme:summarizer:auth-delegator", "labels": LABELS},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:auth-delegator"},
        "subjects": [{"kind": "ServiceAccount", "name": "summarizer-gateway", "namespace": "acme"}],
    }


def test_autoscaler_only_when_autoscaling() -> None:
    assert build_autoscaler(server()) is None
    srv = server(autoscaling={"minReplicas": 2, "maxReplicas": 6, "targetCPUUtilizationPercentage": 70})
    assert build_autoscaler(srv) == {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": META,
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "summarizer"},
            "minReplicas": 2,
            "maxReplicas": 6,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
                }
            ],
        },
    }


def test_disruption_budget_only_with_more_than_one_replica() -> None:
    assert build_disruption_budget(server(replicas=1)) is None
    expected = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": META,
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": SELECTOR}},
    }
    assert build_disruption_budget(server(replicas=3)) == expected
    assert build_disruption_budget(server(replicas=1, autoscaling={"maxReplicas": 3})) == expected


def test_children_of_a_single_replica_server() -> None:
    srv = server()
    children = build_children(srv, compile(srv, [], []).config, pod=POD, keys_json="{}")
    assert [(c["kind"], c["metadata"]["name"]) for c in children] == [
        ("ServiceAccount", "summarizer-gateway"),
        ("Role", "summarizer-gateway"),
        ("RoleBinding", "summarizer-gateway"),
        ("Role", "summarizer-vault"),
        ("RoleBinding", "summarizer-vault"),
        ("ClusterRoleBinding", "portcullis:acme:summarizer:auth-delegator"),
        ("ConfigMap", "summarizer-config"),
        ("ConfigMap", "summarizer-revocations"),
        ("Secret", "summarizer-signing-keys"),
        ("Deployment", "summarizer"),
        ("Service", "summarizer"),
    ]
    assert all(c["metadata"]["labels"] == LABELS for c in children)
    (deployment,) = [c for c in children if c["kind"] == "Deployment"]
    assert deployment == build_deployment(srv, pod=POD, keys_digest=keys_digest("{}"))


def test_children_of_an_autoscaled_server_add_hpa_and_pdb() -> None:
    srv = server(autoscaling={"maxReplicas": 4})
    kinds = [c["kind"] for c in build_children(srv, compile(srv, [], []).config, pod=POD, keys_json="{}")]
    assert kinds[-2:] == ["HorizontalPodAutoscaler", "PodDisruptionBudget"]


def test_a_server_without_uid_cannot_be_rendered() -> None:
    srv = VirtualMCPServer.model_validate({"metadata": {"name": "s", "namespace": "acme"}})
    with pytest.raises(ValueError, match="uid"):
        build_service(srv)


def test_the_gateway_account_records_its_vault_namespace() -> None:
    from portcullis.render.rbac import build_service_account

    assert build_service_account(server(vault={"namespace": "acme-vault"}))["metadata"] == {
        **META, "name": "summarizer-gateway", "annotations": {"portcullis.dev/vault-namespace": "acme-vault"},
    }
    assert build_service_account(server())["metadata"]["annotations"] == {"portcullis.dev/vault-namespace": "acme"}
