"""`portcullis operator`: kopf under the hood, with a health endpoint and peering.

With `peering` set, several operator replicas share the work safely: kopf's peering
objects elect one active replica (the others stand by), so run with a peering name
whenever the Deployment has more than one replica. Without it the operator is
standalone and must run as a single replica.

The liveness endpoint answers `GET /healthz` on all interfaces (kubelet probes come from
the node) with kopf's probe results, including the number of servers tracked.
"""

from __future__ import annotations

import importlib
import logging

import kopf

from portcullis.controller import options as options_module

HANDLERS_MODULE = "portcullis.controller.handlers"


def run_operator(
    *,
    namespaces: list[str] | None,
    clusterwide: bool,
    peering: str | None,
    liveness_port: int = 8080,
    options: options_module.Options | None = None,
) -> None:
    """Run the operator until interrupted (SIGINT/SIGTERM)."""
    if namespaces and clusterwide:
        raise ValueError("watch either the listed namespaces or the whole cluster, not both")
    if options is not None:
        options_module.install(options)
    importlib.import_module(HANDLERS_MODULE)  # registers the handlers with kopf
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kopf.run(
        standalone=peering is None,
        peering_name=peering,
        namespaces=namespaces or [],
        # No namespaces named means the whole cluster, as for `kubectl get -A`.
        clusterwide=clusterwide or not namespaces,
        liveness_endpoint=f"http://0.0.0.0:{liveness_port}/healthz",
    )
