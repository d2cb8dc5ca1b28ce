"""Names, labels and owner references shared by every child of a VirtualMCPServer.

Every child carries the same `app.kubernetes.io/*` labels plus `portcullis.dev/server`,
so `kubectl get all -l portcullis.dev/server=<name>` finds the lot and the operator can
watch its own children with one label selector. Children in the server's namespace get
an owner reference (garbage collection on delete); cluster-scoped children and those in
another namespace cannot have one, and a finalizer removes them instead.
"""

from __future__ import annotations

from typing import Any

from portcullis.api.resources import API_VERSION, VirtualMCPServer

MANAGED_BY = "portcullis-operator"
SERVER_LABEL = "portcullis.dev/server"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
# On the gateway ServiceAccount: the namespace its vault Role was granted in. It is how
# the operator finds the old vault Role and RoleBinding when spec.vault.namespace changes
# (they live outside the server's namespace, so no owner reference removes them).
VAULT_NAMESPACE_ANNOTATION = "portcullis.dev/vault-namespace"

MCP_PORT = 8080
ADMIN_PORT = 8081
METRICS_PORT = 9090
CONNECT_PORT = 8083
"""The OAuth callback (gateway/oauth/pages.py): the one port users' browsers reach."""


def labels(server: VirtualMCPServer) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "portcullis-gateway",
        "app.kubernetes.io/instance": server.metadata.name,
        "app.kubernetes.io/component": "gateway",
        MANAGED_BY_LABEL: MANAGED_BY,
        "app.kubernetes.io/part-of": "portcullis",
        SERVER_LABEL: server.metadata.name,
    }


def selector_labels(server: VirtualMCPServer) -> dict[str, str]:
    """The labels a Deployment selects its pods by: immutable, so only the stable ones."""
    return {
        "app.kubernetes.io/name": "portcullis-gateway",
        "app.kubernetes.io/instance": server.metadata.name,
    }


def owner_reference(server: VirtualMCPServer) -> dict[str, Any]:
    if not server.metadata.uid:
        raise ValueError(f"VirtualMCPServer {server.metadata.name!r} has no uid; owner references need one")
    return {
        "apiVersion": API_VERSION,
        "kind": "VirtualMCPServer",
        "name": server.metadata.name,
        "uid": server.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def object_meta(server: VirtualMCPServer, name: str, *, namespace: str | None = "") -> dict[str, Any]:
    """Metadata of one child. `namespace=""` means the server's own (owned) namespace;
    another namespace, or None for a cluster-scoped object, gets no owner reference."""
    meta: dict[str, Any] = {"name": name}
    if namespace == "" or namespace == server.metadata.namespace:
        meta["namespace"] = server.metadata.namespace
        meta["labels"] = labels(server)
        meta["ownerReferences"] = [owner_reference(server)]
    else:
        if namespace is not None:
            meta["namespace"] = namespace
        meta["labels"] = labels(server)
    return meta


def config_map_name(server: VirtualMCPServer) -> str:
    return f"{server.metadata.name}-config"


def signing_keys_name(server: VirtualMCPServer) -> str:
    return f"{server.metadata.name}-signing-keys"


def revocations_name(server: VirtualMCPServer) -> str:
    return f"{server.metadata.name}-revocations"


def gateway_account_name(server: VirtualMCPServer) -> str:
    return f"{server.metadata.name}-gateway"


def vault_role_name(server: VirtualMCPServer) -> str:
    return f"{server.metadata.name}-vault"


def auth_delegator_binding_name(server: VirtualMCPServer) -> str:
    return f"portcullis:{server.metadata.namespace}:{server.metadata.name}:auth-delegator"
