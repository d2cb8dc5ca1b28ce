"""The audit trail of one gateway process: what the call path hands every event to.

    call path ──emit──▶ JSON line on stdout, metrics          (at once, never blocks)
                   └──▶ bounded queue ──batches──▶ durable store (one background writer)

The writer links each event into this process's hash chain as it takes it off the queue,
stores batches of up to `batch_size`, and retries a failed batch with jittered backoff,
so a store outage loses nothing that fits in the queue.

**Admission.** Before a call is forwarded, the call path asks `admit()`. It reserves one
place in the queue for the call's event; the event, written when the call ends, takes
that place, so a call that was made always has room for its record. With the queue full,
`onStoreFailure: refuse` (the default) answers False and the call is not made;
`allow` serves it and counts it as unaudited. Denials and refusals need no reservation
(nothing reaches an upstream); if they find the queue full, they are counted as dropped,
and their JSON line is still written.

**What is durable when a call returns.** Its JSON line has been handed to stdout and its
event is queued; the store has it within one flush interval (50 ms by default) plus the
time of one batch write, unless the store is down, in which case it waits in the queue.
A crash loses what was queued and not yet written; nothing else.

**Retention.** Once an interval, the replica holding the server's prune lease removes
events older than `retentionDays` (anchoring every chain first) and records the pruning
as an event of its own chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

from portcullis.gateway.audit import metrics
from portcullis.gateway.audit.chain import ChainWriter, StoredEvent, VerifyReport, verify_chains
from portcullis.gateway.audit.events import AuditEvent, Reason, new_request_id
from portcullis.gateway.audit.keys import AuditKey, AuditKeys
from portcullis.gateway.audit.sinks import AuditSink
from portcullis.gateway.audit.store import AuditPage, AuditQuery, AuditStore

log = logging.getLogger("portcullis.audit")

OnStoreFailure = Literal["refuse", "allow"]
_MIN_BACKOFF, _MAX_BACKOFF = 0.05, 5.0
DAY_US = 86_400 * 1_000_000
# Jitter from a generator of our own: the module-level one belongs to the application (and to
# test tools that watch it for use from other threads).
_jitter = random.Random()


def default_writer_id() -> str:
    """Host (the pod name in a cluster), process and a random suffix: one chain per process run."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"


class AuditTrail:
    def __init__(
        self,
        *,
        server: str,
        tenant: str,
        keys: AuditKeys,
        sinks: Sequence[AuditSink] = (),
        store: AuditStore | None = None,
        on_store_failure: OnStoreFailure = "refuse",
        retention_days: int = 90,
        capacity: int = 10_000,
        batch_size: int = 500,
        flush_interval: float = 0.05,
        prune_interval: float = 3600.0,
        writer: str | None = None,
    ):
        self.server = server
        self.tenant = tenant
        self.store = store
        self.on_store_failure: OnStoreFailure = on_store_failure
        self.retention_days = retention_days
        self.capacity = capacity
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.prune_interval = prune_interval
        self.writer = writer or default_writer_id()
        self._keys = keys
        self.sinks = tuple(sinks)
        self._key: AuditKey | None = None
        self._chain: ChainWriter | None = None
        self._queue: deque[AuditEvent] = deque()
        self._oldest = 0.0
        """time.monotonic() when the oldest queued event was queued."""
        self._urgent = False
        """Set while someone waits in flush(): write at once, do not linger."""
        self._batch: list[StoredEvent] = []
        self._reserved = 0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._opened = False
        self._stored_head: tuple[int, str] = (0, "")
        self.failing: str | None = None
        """The last store error while the store is failing; None when writes succeed."""
        self._alarmed = False
        store_name = store.name if store is not None else "none"
        self._store_label = store_name
        metrics.AUDIT_QUEUE_CAPACITY.labels(server).set(capacity if store is not None else 0)
        metrics.AUDIT_QUEUE_DEPTH.labels(server).set_function(lambda: self.depth)

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self._key = AuditKey(await self._keys.key(self.tenant))
        self._chain = ChainWriter(self._key.chain_key, self.writer)
        if self.store is not None:
            self._tasks.append(asyncio.create_task(self._write_forever(), name="portcullis-audit-writer"))
            self._tasks.append(asyncio.create_task(self._prune_forever(), name="portcullis-audit-retention"))

    async def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued (bounded by `timeout`), then stop the background tasks."""
        if self.store is not None and self._tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flush(), timeout)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.store is not None and self._opened:
            with contextlib.suppress(Exception):
                await self.store.close()

    @property
    def key(self) -> AuditKey:
        if self._key is None:
            raise RuntimeError("AuditTrail.start() first")
        return self._key

    @property
    def depth(self) -> int:
        return len(self._queue) + len(self._batch) + self._reserved

    # --- the call path -------------------------------------------------------------------

    def digest(self, value: Any) -> str | None:
        return self._key.digest(value) if self._key is not None else None

    def admit(self) -> bool:
        """Reserve room for the event of a call about to be made. False: do not make it."""
        if self.store is None:
            return True
        if self.depth < self.capacity:
            self._reserved += 1
            return True
        self._alarm("the audit queue is full")
        if self.on_store_failure == "allow":
            metrics.AUDIT_UNAUDITED.labels(self.server).inc()
            return True
        metrics.AUDIT_REFUSED.labels(self.server).inc()
        return False

    def emit(self, event: AuditEvent, *, reserved: bool = False) -> None:
        """Record one event. Never blocks or raises."""
        for sink in self.sinks:
            try:
                sink.emit(event)
            except Exception:  # a sink's bug must not fail the call or skip the others
                log.exception("audit sink %r failed", sink)
        metrics.observe(event)
        if self.store is None:
            return
        if reserved:
            self._reserved -= 1
        elif self.depth >= self.capacity:
            metrics.AUDIT_DROPPED.labels(self.server).inc()
            self._alarm("the audit queue is full")
            return
        if not self._queue:
            self._oldest = time.monotonic()
        self._queue.append(event)
        if len(self._queue) >= self.batch_size:
            self._wake.set()

    def _alarm(self, what: str) -> None:
        if not self._alarmed:
            self._alarmed = True
            log.error(
                "%s (%d events; store %s: %s); onStoreFailure=%s",
                what, self.capacity, self._store_label, self.failing or "slow", self.on_store_failure,
            )

    # --- the writer ----------------------------------------------------------------------

    async def flush(self) -> None:
        """Wait until everything queued now is stored (tests, shutdown, reads)."""
        self._urgent = True
        try:
            while self._queue or self._batch:
                self._wake.set()
                await asyncio.sleep(0.005)
        finally:
            self._urgent = False

    async def _write_forever(self) -> None:
        delay = _MIN_BACKOFF
        while True:
            if not self._batch and not self._queue:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.flush_interval)
                continue
            # Linger: a partial batch waits until its oldest event is flush_interval old (or the
            # batch fills, or someone flushes), so a busy gateway writes few large batches rather
            # than one round trip per handful of events. This is most of the store's CPU per call.
            linger = self._oldest + self.flush_interval - time.monotonic()
            if not self._batch and len(self._queue) < self.batch_size and linger > 0 and not self._urgent:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), linger)
            try:
                await self._write_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store's or ours: retry, say so once per streak
                metrics.AUDIT_WRITE_FAILURES.labels(self.server, self._store_label).inc()
                if self.failing is None:
                    log.error("audit store %s failed, retrying (events wait in the queue): %s", self._store_label, exc)
                self.failing = str(exc) or type(exc).__name__
                await asyncio.sleep(delay * _jitter.uniform(0.5, 1.0))
                delay = min(delay * 2, _MAX_BACKOFF)
            else:
                if self.failing is not None:
                    log.warning("audit store %s recovered", self._store_label)
                self.failing = None
                self._alarmed = False
                delay = _MIN_BACKOFF

    async def _write_once(self) -> None:
        assert self.store is not None and self._chain is not None
        if not self._opened:
            await self.store.open()
            self._opened = True
        if not self._batch:
            # Linked once, when taken off the queue: a retried batch keeps its links.
            while self._queue and len(self._batch) < self.batch_size:
                self._batch.append(self._chain.link(self._queue.popleft()))
            self._oldest = time.monotonic()  # of what is still queued, at the latest
        started = time.perf_counter()
        await self.store.append(self._batch)
        metrics.AUDIT_WRITE_DURATION.labels(self.server, self._store_label).observe(time.perf_counter() - started)
        metrics.AUDIT_WRITTEN.labels(self.server, self._store_label).inc(len(self._batch))
        last = self._batch[-1]
        self._stored_head = (last.seq, last.hash)
        self._batch = []

    # --- retention -----------------------------------------------------------------------

    async def _prune_forever(self) -> None:
        # The first pass soon after start (a gateway that restarts often still prunes),
        # then once an interval; a failed pass is logged and the next one tries again.
        await asyncio.sleep(min(self.prune_interval, 30.0) * _jitter.uniform(0.5, 1.0))
        while True:
            try:
                await self.prune_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("audit retention pass failed, next in %.0fs: %s", self.prune_interval, exc)
            await asyncio.sleep(self.prune_interval * _jitter.uniform(0.9, 1.1))

    async def prune_once(self, *, now_us: int | None = None) -> int | None:
        """Prune if this replica holds the lease; the number removed, or None when another replica holds it."""
        assert self.store is not None
        if not self._opened:
            await self.store.open()
            self._opened = True
        lease = f"prune:{self.server}"
        if not await self.store.acquire_lease(lease, self.writer, self.prune_interval * 2):
            return None
        now_us = now_us if now_us is not None else int(time.time() * 1_000_000)
        before = now_us - self.retention_days * DAY_US
        result = await self.store.prune(self.server, before)
        metrics.AUDIT_PRUNED.labels(self.server).inc(result.removed)
        self.emit(
            AuditEvent(
                time_us=now_us, request_id=new_request_id(), server=self.server, tenant=self.tenant, user=None,
                method="audit/prune", tool=None, connection=None, decision="allow", reason=Reason.RETENTION, outcome="ok",
                latency_ms=0.0,
                detail=f"removed {result.removed} events older than {self.retention_days}d ({len(result.anchors)} chains anchored)",
            )
        )
        if result.removed:
            log.info("audit retention: removed %d events of %s older than %d days", result.removed, self.server, self.retention_days)
        return result.removed

    # --- reading -------------------------------------------------------------------------

    def _reader(self) -> AuditStore:
        if self.store is None:
            raise LookupError("this gateway has no durable audit store (spec.audit.store: none)")
        return self.store

    async def query(self, query: AuditQuery) -> AuditPage:
        store = self._reader()
        if not self._opened:
            await store.open()
            self._opened = True
        await self._settle()
        return await store.query(query)

    async def _settle(self, timeout: float = 2.0) -> None:
        """Let what this process has queued reach the store first (read your writes), bounded:
        a failing store must not stall an auditor's read."""
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flush(), timeout)

    async def verify(self, since_us: int | None = None, until_us: int | None = None) -> VerifyReport:
        store = self._reader()
        if not self._opened:
            await store.open()
            self._opened = True
        await self._settle()
        # This process's own head proves its chain was not cut short at the end.
        heads = {self.writer: self._stored_head} if until_us is None and self._stored_head[0] else {}
        return await verify_audit(store, self.key.chain_key, self.server, since_us, until_us, heads=heads)

    def status(self) -> dict[str, Any]:
        return {
            "store": self._store_label,
            "writer": self.writer,
            "queueDepth": self.depth,
            "queueCapacity": self.capacity if self.store is not None else 0,
            "onStoreFailure": self.on_store_failure,
            "retentionDays": self.retention_days,
            "failing": self.failing,
        }


async def verify_audit(
    store: AuditStore,
    chain_key: bytes,
    server: str,
    since_us: int | None,
    until_us: int | None,
    *,
    heads: dict[str, tuple[int, str]] | None = None,
) -> VerifyReport:
    """Walk every chain of `server` in the range (the CLI calls this against the store directly)."""

    async def rows() -> AsyncIterator[StoredEvent]:
        async for row in store.chain(server, since_us, until_us):
            yield row

    async def predecessor(writer: str, seq: int) -> StoredEvent | None:
        return await store.link(server, writer, seq)

    return await verify_chains(chain_key, rows(), anchors=await store.anchors(server), predecessor=predecessor, heads=heads)


def store_for(kind: str, *, sqlite_path: Any, postgres_url: str | None) -> AuditStore | None:
    """The durable store `spec.audit.store` names (None for `none`)."""
    if kind == "none":
        return None
    if kind == "postgres":
        if not postgres_url:
            raise ValueError("spec.audit.store is postgres but its urlSecretRef names no value")
        from portcullis.gateway.audit.postgres import PostgresAuditStore  # asyncpg only when used

        return PostgresAuditStore(postgres_url)
    from portcullis.gateway.audit.sqlite import SqliteAuditStore

    return SqliteAuditStore(sqlite_path)
