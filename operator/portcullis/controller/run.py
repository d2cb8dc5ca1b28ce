"""`portcullis operator`: kopf under the hood, with a health endpoint and peering.

With `peering` set, several operator replicas share the work safely: each replica
announces itself in kopf's peering object with a priority; the replica with the highest
priority acts and every other one pauses. kopf pauses *all* replicas that share the top
priority (none can tell which of them should act), so each process needs a priority of
its own: `--priority` sets it, and with peering and no `--priority` each process draws a
random one (31 bits, so a tie between a handful of replicas is practically impossible).
When the active replica goes away, its peering entry expires and the next-highest
resumes. Run with a peering name whenever the Deployment has more than one replica;
without it the operator is standalone and must run as a single replica.

The liveness endpoint answers `GET /healthz` on all interfaces (kubelet probes come from
the node) with kopf's probe results, including the number of servers tracked. Prometheus
metrics (`controller/metrics.py`) are served on a port of their own, 9090 by default, also on
all interfaces: Prometheus scrapes from other nodes.

The operator runs with the garbage collector tuned (`tuned_garbage_collection`). With
CPython's defaults (a young collection every 700 net allocations) a burst of reconciles,
each holding parsed JSON bodies across its API round trips, has most of its short-lived
objects survive two young collections; they are promoted and then trigger full
collections, each of which walks the whole heap, which grows with the number of servers.
Measured with 500 servers applied at once (benchmarks/operator_scale.py): 22 full
collections, about 9 of the operator's 25 CPU-seconds. A young generation of 10,000 lets
those objects die young, and freezing what exists at start-up (modules, classes, kopf's
registry: about 100,000 objects) keeps it out of every full collection; GC then took about
1 second there, and the operator's CPU per server stayed flat from 20 to 500 servers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import logging
import os
import secrets
from collections.abc import Iterator

import kopf

from portcullis.controller import options as options_module

HANDLERS_MODULE = "portcullis.controller.handlers"
# Objects allocated (net) between young collections; CPython's default is 700.
YOUNG_GENERATION = 10_000


@contextlib.contextmanager
def tuned_garbage_collection() -> Iterator[None]:
    """Run the block with a larger young generation and the start-up heap frozen; then restore both.

    Restoring matters where the block returns while the process goes on (tests stub kopf.run).
    """
    thresholds = gc.get_threshold()
    gc.collect()  # what is garbage now is collected, not frozen
    gc.freeze()
    gc.set_threshold(YOUNG_GENERATION, *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def peering_priority(peering: str | None, priority: int | None) -> int | None:
    """The priority to peer with: the one given, else a random one when peering (None when standalone)."""
    if priority is not None and peering is None:
        raise ValueError("a peering priority needs a peering name (--peering)")
    if peering is None:
        return None
    return priority if priority is not None else secrets.randbelow(2**31)


def run_operator(
    *,
    namespaces: list[str] | None,
    clusterwide: bool,
    peering: str | None,
    priority: int | None = None,
    liveness_port: int = 8080,
    metrics_port: int | None = 9090,
    options: options_module.Options | None = None,
) -> None:
    """Run the operator until interrupted (SIGINT/SIGTERM); `metrics_port=None` serves no metrics.

    Without `options`, the current ones with what the environment sets (the chart's gateway
    defaults); a malformed variable raises `ConfigurationError` here, before kopf starts.
    """
    if namespaces and clusterwide:
        raise ValueError("watch either the listed namespaces or the whole cluster, not both")
    chosen = peering_priority(peering, priority)
    # The metrics server is started by a kopf startup handler (`handlers.serve_metrics`) and
    # closed by a cleanup handler, not here around kopf.run: so its life is kopf's, and what
    # stubs or embeds kopf.run (the CLI tests, KopfRunner in the suite) binds no fixed port
    # unless it asks for one. The port reaches the handler the way all configuration does.
    chosen_options = options if options is not None else options_module.from_environment(os.environ)
    options_module.install(dataclasses.replace(chosen_options, metrics_port=metrics_port))
    importlib.import_module(HANDLERS_MODULE)  # registers the handlers with kopf
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tuned_garbage_collection():
        kopf.run(
            standalone=peering is None,
            peering_name=peering,
            priority=chosen,
            namespaces=namespaces or [],
            # No namespaces named means the whole cluster, as for `kubectl get -A`.
            clusterwide=clusterwide or not namespaces,
            liveness_endpoint=f"http://0.0.0.0:{liveness_port}/healthz",
        )
