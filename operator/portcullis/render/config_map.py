"""The ConfigMaps of a server: the compiled gateway config, and the (empty) revocation list.

The config is the whole contract between operator and gateway: the gateway watches this
ConfigMap and swaps its allowlist in place, so a change here reaches running pods without
a restart (the Deployment deliberately carries no hash of it).
"""

from __future__ import annotations

from typing import Any

from portcullis.api.config import GatewayConfig
from portcullis.api.resources import VirtualMCPServer
from portcullis.render.metadata import config_map_name, object_meta, revocations_name

CONFIG_KEY = "config.json"


def build_config_map(server: VirtualMCPServer, config: GatewayConfig) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(server, config_map_name(server)),
        "data": {CONFIG_KEY: config.model_dump_json()},
    }


def build_revocations_config_map(server: VirtualMCPServer) -> dict[str, Any]:
    """Created empty; its data belongs to the gateways, which record revocations in it."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(server, revocations_name(server)),
        "data": {},
    }
