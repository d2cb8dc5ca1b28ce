"""The Service in front of the gateways: MCP for agents, admin for minting, metrics for scraping."""

from __future__ import annotations

from typing import Any

from portcullis.api.resources import VirtualMCPServer
from portcullis.render.metadata import ADMIN_PORT, CONNECT_PORT, MCP_PORT, METRICS_PORT, object_meta, selector_labels


def build_service(server: VirtualMCPServer) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(server, server.metadata.name),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(server),
            "ports": [
                {"name": "mcp", "port": MCP_PORT, "targetPort": "mcp", "protocol": "TCP"},
                {"name": "admin", "port": ADMIN_PORT, "targetPort": "admin", "protocol": "TCP"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
                # OAuth callbacks from users' browsers: route an Ingress here, never to admin.
                {"name": "connect", "port": CONNECT_PORT, "targetPort": "connect", "protocol": "TCP"},
            ],
        },
    }
