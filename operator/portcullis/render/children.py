"""Every child of one VirtualMCPServer, in the order they are best applied.

Identity and permissions first (so pods never start without them), then config and keys,
then the Deployment that reads them, then what fronts and scales it.
"""

from __future__ import annotations

from typing import Any

from portcullis.api.config import GatewayConfig
from portcullis.api.resources import VirtualMCPServer
from portcullis.render.autoscaler import build_autoscaler
from portcullis.render.config_map import build_config_map, build_revocations_config_map
from portcullis.render.deployment import GatewayPod, build_deployment
from portcullis.render.disruption_budget import build_disruption_budget
from portcullis.render.rbac import (
    build_auth_delegator_binding,
    build_gateway_role,
    build_gateway_role_binding,
    build_service_account,
    build_vault_role,
    build_vault_role_binding,
)
from portcullis.render.secret import build_signing_key_secret, keys_digest
from portcullis.render.service import build_service


def build_children(server: VirtualMCPServer, config: GatewayConfig, *, pod: GatewayPod, keys_json: str) -> list[dict[str, Any]]:
    optional = [build_autoscaler(server), build_disruption_budget(server)]
    return [
        build_service_account(server),
        build_gateway_role(server),
        build_gateway_role_binding(server),
        build_vault_role(server),
        build_vault_role_binding(server),
        build_auth_delegator_binding(server),
        build_config_map(server, config),
        build_revocations_config_map(server),
        build_signing_key_secret(server, keys_json),
        build_deployment(server, pod=pod, keys_digest=keys_digest(keys_json)),
        build_service(server),
        *(obj for obj in optional if obj is not None),
    ]
