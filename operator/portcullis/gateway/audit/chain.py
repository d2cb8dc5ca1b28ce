"""Tamper evidence: every writer's events form a keyed hash chain, and `verify` walks it.

Each gateway process is one *writer* with its own chain (replicas never coordinate a
shared sequence, so writing stays off every hot path). Its n-th stored event carries

    seq  = n
    prev = the hash of event n-1 (GENESIS for n = 1)
    hash = HMAC-SHA-256(chain key, canonical JSON of {writer, seq, prev, event})

Pruning removes the oldest events of a chain; before it does, it stores an *anchor* per
writer: the seq and hash of the last event it removes. The first event left must then
link to that anchor, so what remains still verifies, and a deletion that was not a
pruning does not.

What `verify` proves, for the range it checks: no stored event was altered, no event was
removed from the middle or the start of a chain except by a recorded pruning, and no event
was inserted, unless whoever did it holds the tenant's audit key (the chain key is derived
from it and never stored with the events). It detects a chain cut short at its end only
against a live writer's head (the admin API passes each running replica's head), because a
tail that is gone leaves nothing behind. A database administrator who also holds the audit
key can rewrite a whole chain consistently; periodic heads signed and exported elsewhere
(a SIEM, object storage with retention lock) would close that, and are not built yet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from portcullis.gateway.audit.encoding import canonical_scalar
from portcullis.gateway.audit.events import AuditEvent
from portcullis.gateway.audit.keys import KeyedHash

GENESIS: Final = "0" * 64


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as a store holds it: with its place in its writer's chain."""

    event: AuditEvent
    writer: str
    seq: int
    prev_hash: str
    hash: str
    id: int | None = None
    """The store's row id (paging cursors); not part of the chain."""


@dataclass(frozen=True, slots=True)
class Anchor:
    """The last event a pruning removed from one writer's chain."""

    writer: str
    seq: int
    hash: str
    time_us: int


def link_hash(chain_key: bytes, writer: str, seq: int, prev_hash: str, event: AuditEvent) -> str:
    """The hash of one link, keyed for this one call (the writer and the verifier key theirs once)."""
    return _link_hash(KeyedHash(chain_key), writer, seq, prev_hash, event)


def _link_hash(chain_key: KeyedHash, writer: str, seq: int, prev_hash: str, event: AuditEvent) -> str:
    # canonical_json({"writer": writer, "seq": seq, "prev": prev_hash, "event": event.to_dict()}), the bytes
    # every stored chain was hashed over, written around the event's own canonical form (keys sorted).
    material = "".join((
        '{"event":', event.to_canonical_json(), ',"prev":', canonical_scalar(prev_hash),
        ',"seq":', canonical_scalar(seq), ',"writer":', canonical_scalar(writer), "}",
    ))
    return chain_key.hexdigest(material.encode())


class ChainWriter:
    """Links one writer's events in the order it stores them. Not shared between processes."""

    def __init__(self, chain_key: bytes, writer: str):
        self._key = KeyedHash(chain_key)
        self.writer = writer
        self.seq = 0
        self.head = GENESIS
        self._last_time_us = 0

    def link(self, event: AuditEvent) -> StoredEvent:
        # A chain's times never go backwards, so a time range always holds a contiguous run
        # of each chain (a clock stepped back would otherwise let pruning cut a hole in it).
        if event.time_us < self._last_time_us:
            event = dataclasses.replace(event, time_us=self._last_time_us)
        self._last_time_us = event.time_us
        self.seq += 1
        digest = _link_hash(self._key, self.writer, self.seq, self.head, event)
        stored = StoredEvent(event, self.writer, self.seq, self.head, digest)
        self.head = digest
        return stored


Problem = Literal["altered", "deleted", "inserted", "truncated"]


@dataclass(frozen=True)
class Break:
    """The first broken link found in one writer's chain."""

    writer: str
    seq: int
    problem: Problem
    message: str
    request_id: str | None = None
    time_us: int | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "writer": self.writer, "seq": self.seq, "problem": self.problem, "message": self.message,
            "request_id": self.request_id, "time_us": self.time_us,
        }


@dataclass
class VerifyReport:
    events: int = 0
    writers: int = 0
    anchored: int = 0
    """Chains whose first remaining event was checked against a pruning anchor."""
    breaks: list[Break] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.breaks

    @property
    def first(self) -> Break | None:
        """The earliest break by time (breaks without a time, such as a truncation, last)."""
        if not self.breaks:
            return None
        return min(self.breaks, key=lambda b: (b.time_us is None, b.time_us or 0, b.writer))

    def to_dict(self) -> dict[str, object]:
        first = self.first
        return {
            "ok": self.ok, "events": self.events, "writers": self.writers, "anchored": self.anchored,
            "first": first.to_dict() if first else None, "breaks": [b.to_dict() for b in self.breaks],
        }


Predecessor = Callable[[str, int], Awaitable[StoredEvent | None]]
"""(writer, seq) -> the stored event, for the link just before a checked range."""


async def verify_chains(
    chain_key: bytes,
    rows: AsyncIterable[StoredEvent],
    *,
    anchors: Mapping[str, Anchor],
    predecessor: Predecessor,
    heads: Mapping[str, tuple[int, str]] | None = None,
) -> VerifyReport:
    """Check `rows` (ordered by writer, then seq) link by link; report one break per writer.

    `heads` are live writers' last stored (seq, hash): a chain that ends before its head
    lost its tail.
    """
    report = VerifyReport()
    keyed = KeyedHash(chain_key)
    current: _ChainCheck | None = None
    seen: set[str] = set()
    async for row in rows:
        report.events += 1
        if current is None or row.writer != current.writer:
            if current is not None:
                current.finish(report, heads)
            current = _ChainCheck(row.writer)
            seen.add(row.writer)
            report.writers += 1
            await current.start(row, anchors, predecessor, report)
        current.feed(keyed, row, report)
    if current is not None:
        current.finish(report, heads)
    for writer, (seq, _) in sorted((heads or {}).items()):
        if writer not in seen and seq > 0:
            report.breaks.append(Break(writer, 1, "truncated", f"the writer is at seq {seq} and none of its events are stored"))
    return report


class _ChainCheck:
    """One writer's walk. After a break it resynchronizes on the stored links and stops reporting."""

    def __init__(self, writer: str):
        self.writer = writer
        self.expected_seq = 0
        self.expected_prev = GENESIS
        self.broken = False
        self.last: StoredEvent | None = None
        self.pending: StoredEvent | None = None
        """A row whose hash did not check out: inserted if the next row links past it, else altered."""

    async def start(
        self, row: StoredEvent, anchors: Mapping[str, Anchor], predecessor: Predecessor, report: VerifyReport
    ) -> None:
        self.expected_seq = row.seq
        if row.seq == 1:
            return
        before = await predecessor(self.writer, row.seq - 1)
        if before is not None:
            self.expected_prev = before.hash
            return
        anchor = anchors.get(self.writer)
        if anchor is not None and anchor.seq == row.seq - 1:
            report.anchored += 1
            self.expected_prev = anchor.hash
            return
        self.expected_seq = anchor.seq + 1 if anchor is not None and anchor.seq < row.seq else 1
        self.expected_prev = anchor.hash if anchor is not None and anchor.seq < row.seq else GENESIS
        self._break(report, row, "deleted", f"events {self.expected_seq}..{row.seq - 1} of this chain are missing and no pruning removed them")

    def feed(self, chain_key: KeyedHash, row: StoredEvent, report: VerifyReport) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            if row.prev_hash == self.expected_prev:
                self._break(report, pending, "inserted", "this event is not part of the chain (the next one links past it)")
                # The chain goes on from the link before the inserted row.
            else:
                self._break(report, pending, "altered", "this event's content does not match its hash")
                self.expected_prev, self.expected_seq = pending.hash, pending.seq + 1
        if row.seq < self.expected_seq:
            self._break(report, row, "inserted", f"a second event claims seq {row.seq}")
            return
        if row.seq > self.expected_seq:
            self._break(report, row, "deleted", f"events {self.expected_seq}..{row.seq - 1} are missing")
        elif row.prev_hash != self.expected_prev:
            self._break(report, row, "deleted", "this event does not link to the one stored before it")
        if _link_hash(chain_key, row.writer, row.seq, row.prev_hash, row.event) != row.hash:
            self.pending = row  # decided by the next row
            return
        self.expected_prev, self.expected_seq = row.hash, row.seq + 1
        self.last = row

    def finish(self, report: VerifyReport, heads: Mapping[str, tuple[int, str]] | None) -> None:
        if self.pending is not None:
            self._break(report, self.pending, "altered", "this event's content does not match its hash")
            self.pending = None
        head = (heads or {}).get(self.writer)
        if head is not None and not self.broken:
            seq, digest = head
            last_seq = self.last.seq if self.last else 0
            if last_seq < seq:
                self._break_at(report, last_seq + 1, "truncated", f"the writer is at seq {seq}; events {last_seq + 1}..{seq} are gone")
            elif last_seq == seq and self.last is not None and self.last.hash != digest:
                self._break_at(report, seq, "altered", "the last event differs from what its writer stored")

    def _break(self, report: VerifyReport, row: StoredEvent, problem: Problem, message: str) -> None:
        if not self.broken:
            self.broken = True
            report.breaks.append(Break(self.writer, row.seq, problem, message, row.event.request_id, row.event.time_us))

    def _break_at(self, report: VerifyReport, seq: int, problem: Problem, message: str) -> None:
        if not self.broken:
            self.broken = True
            report.breaks.append(Break(self.writer, seq, problem, message))
