"""The gateway's identity and exactly the permissions it needs, nothing wider.

- ServiceAccount `<name>-gateway`.
- Role `<name>-gateway` in the server's namespace: read ConfigMaps and Secrets (its config
  and signing keys, watched live), and write only its own revocations ConfigMap.
- Role `<name>-vault` in the vault namespace: the tenant's credential Secrets.
- ClusterRoleBinding to `system:auth-delegator`: TokenReview and SubjectAccessReview, so
  the admin API can authenticate callers and authorize `mint` with plain RBAC. It is
  cluster-scoped, hence no owner reference; the operator's finalizer deletes it.
"""

from __future__ import annotations

from typing import Any

from portcullis.api.resources import VirtualMCPServer
from portcullis.render.metadata import (
    VAULT_NAMESPACE_ANNOTATION,
    auth_delegator_binding_name,
    gateway_account_name,
    object_meta,
    revocations_name,
    vault_role_name,
)

RBAC_API = "rbac.authorization.k8s.io/v1"


def _subject(server: VirtualMCPServer) -> dict[str, Any]:
    return {"kind": "ServiceAccount", "name": gateway_account_name(server), "namespace": server.metadata.namespace}


def build_service_account(server: VirtualMCPServer) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            **object_meta(server, gateway_account_name(server)),
            "annotations": {VAULT_NAMESPACE_ANNOTATION: server.vault_namespace},
        },
    }


def build_gateway_role(server: VirtualMCPServer) -> dict[str, Any]:
    return {
        "apiVersion": RBAC_API,
        "kind": "Role",
        "metadata": object_meta(server, gateway_account_name(server)),
        "rules": [
            {"apiGroups": [""], "resources": ["configmaps", "secrets"], "verbs": ["get", "list", "watch"]},
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": [revocations_name(server)],
                "verbs": ["patch", "update"],
            },
        ],
    }


def build_gateway_role_binding(server: VirtualMCPServer) -> dict[str, Any]:
    return {
        "apiVersion": RBAC_API,
        "kind": "RoleBinding",
        "metadata": object_meta(server, gateway_account_name(server)),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": gateway_account_name(server)},
        "subjects": [_subject(server)],
    }


def build_vault_role(server: VirtualMCPServer) -> dict[str, Any]:
    return {
        "apiVersion": RBAC_API,
        "kind": "Role",
        "metadata": object_meta(server, vault_role_name(server), namespace=server.vault_namespace),
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["secrets"],
                "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
            }
        ],
    }


def build_vault_role_binding(server: VirtualMCPServer) -> dict[str, Any]:
    return {
        "apiVersion": RBAC_API,
        "kind": "RoleBinding",
        "metadata": object_meta(server, vault_role_name(server), namespace=server.vault_namespace),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": vault_role_name(server)},
        "subjects": [_subject(server)],
    }


def build_auth_delegator_binding(server: VirtualMCPServer) -> dict[str, Any]:
    return {
        "apiVersion": RBAC_API,
        "kind": "ClusterRoleBinding",
        "metadata": object_meta(server, auth_delegator_binding_name(server), namespace=None),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:auth-delegator"},
        "subjects": [_subject(server)],
    }
