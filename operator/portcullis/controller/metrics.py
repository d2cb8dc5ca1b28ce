"""Prometheus metrics of the operator: how many reconciles, how long they take, why they fail.

One reconcile here is one hand-off from a kopf handler to the reconcile functions, counted
under the kind of the Portcullis object the handler fired for. A labelled child's drift
repair, the periodic resync and a server's deletion count as `VirtualMCPServer`: each of
them is work on one server. Keeping `kind` to the three custom kinds (and `reason` to
exception class names, which only the code can add) keeps every label set bounded. A trigger
that coalesces into a reconcile already waiting returns at once and still counts: these are
hand-offs, and such ones land in the histogram's first bucket.

The series live in prometheus_client's default registry, which `serve` exposes, so the
process and platform collectors (CPU, memory, open files) come along for free. The names
are what the Helm chart's Grafana dashboard queries (tests/chart checks the two agree).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final, Literal, get_args
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Histogram, start_http_server

Kind = Literal["VirtualMCPServer", "ToolMapping", "MCPConnection"]
Result = Literal["success", "error"]
KINDS: Final[tuple[Kind, ...]] = get_args(Kind)
RESULTS: Final[tuple[Result, ...]] = get_args(Result)

RECONCILES = Counter(
    "portcullis_operator_reconciles_total",
    "Reconciles handed off by the operator's handlers, by the kind they fired for and how they ended.",
    ["kind", "result"],
)
RECONCILE_DURATION = Histogram(
    "portcullis_operator_reconcile_duration_seconds",
    "Time one reconcile took, successful or not.",
    ["kind"],
    # A reconcile is a handful of API round trips: tens of milliseconds on a healthy API
    # server, up to a minute on a throttled one.
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
RECONCILE_ERRORS = Counter(
    "portcullis_operator_reconcile_errors_total",
    "Reconciles that raised, by kind and exception class (kopf's TemporaryError and PermanentError included).",
    ["kind", "reason"],
)
OPERATOR_METRICS: Final = (RECONCILES, RECONCILE_DURATION, RECONCILE_ERRORS)

# Series that were never touched are absent, not zero, and `rate()` of an absent series is
# "no data": create every (kind, result) up front so an error ratio reads 0 before the
# first error. Error reasons are not known in advance; those appear with their first error.
for _kind in KINDS:
    RECONCILE_DURATION.labels(_kind)
    for _result in RESULTS:
        RECONCILES.labels(_kind, _result)


@contextmanager
def observe_reconcile(kind: Kind) -> Iterator[None]:
    """Time the block as one reconcile of `kind` and count it a success or, re-raising, an error.

    A context manager and not a decorator: contextlib's decorator form, put on an async
    handler, would time the creation of the coroutine and not its run.
    """
    started = time.perf_counter()
    try:
        yield
    except Exception as exc:
        _finish(kind, "error", started)
        RECONCILE_ERRORS.labels(kind, type(exc).__name__).inc()
        raise
    # A cancellation (a BaseException: the operator stopping, a daemon being stopped) falls
    # through uncounted: the reconcile neither succeeded nor failed, it was cut short.
    _finish(kind, "success", started)


def _finish(kind: Kind, result: Result, started: float) -> None:
    RECONCILE_DURATION.labels(kind).observe(time.perf_counter() - started)
    RECONCILES.labels(kind, result).inc()


@dataclass(frozen=True)
class MetricsServer:
    """prometheus_client's exposition server: a WSGI server in a daemon thread of its own."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()  # returns once serve_forever has left its loop
        self.server.server_close()  # and frees the port
        self.thread.join(timeout=5)


def serve(port: int, addr: str = "0.0.0.0") -> MetricsServer:
    """Serve the default registry at `http://<addr>:<port>/metrics` until `stop()`.

    All interfaces by default: Prometheus scrapes the pod from another node. The server
    answers from its own thread, so a scrape is not queued behind a burst of reconciles
    on kopf's event loop. Port 0 picks a free one (see `port`).
    """
    server, thread = start_http_server(port, addr)
    return MetricsServer(server, thread)
