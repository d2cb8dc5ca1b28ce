"""The durable audit store: one interface, an embedded SQLite and a PostgreSQL behind it.

A store keeps `StoredEvent`s (an event plus its place in its writer's hash chain),
answers filtered, paged queries, walks chains for verification, and prunes by time,
leaving an anchor per chain. Writers never share a store connection with the request
path: `AuditTrail` batches events and appends them from one background task.

Times are integer microseconds since the epoch everywhere (exact in both databases and
in the chain's canonical form). Query results are ordered by (time, id), oldest first;
a page's `next_cursor` continues after its last row.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from portcullis.api.durations import parse_duration
from portcullis.gateway.audit.chain import Anchor, StoredEvent

MAX_PAGE = 1000


class AuditStoreError(Exception):
    """The store could not be reached or refused a write; the writer retries."""


@dataclass(frozen=True)
class AuditQuery:
    server: str | None = None
    user: str | None = None
    tool: str | None = None
    connection: str | None = None
    outcome: str | None = None
    decision: str | None = None
    method: str | None = None
    agent_run_id: str | None = None
    since_us: int | None = None
    until_us: int | None = None
    limit: int = 100
    cursor: str | None = None


@dataclass(frozen=True)
class AuditPage:
    events: list[StoredEvent]
    next_cursor: str | None


@dataclass(frozen=True)
class PruneResult:
    removed: int
    before_us: int
    """Everything older than this is gone (a partition store may round it down to a partition edge)."""
    anchors: list[Anchor]


def parse_time(text: str, *, now: float | None = None) -> int:
    """`30d`, `12h`, `90m` (that long ago) or an RFC 3339 time, as epoch microseconds."""
    text = text.strip()
    if text and text[0].isdigit() and text[-1].isalpha() and "-" not in text and ":" not in text:
        seconds = parse_duration(text)
        return int(((time.time() if now is None else now) - seconds) * 1_000_000)
    try:
        parsed = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"invalid time {text!r}: give an age such as 30d or 12h, or a time such as 2026-11-30T12:00:00Z") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    return int(parsed.timestamp() * 1_000_000)


def encode_cursor(time_us: int, row_id: int) -> str:
    return base64.urlsafe_b64encode(f"{time_us}:{row_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, int]:
    """(time_us, id) of the last row of the previous page; ValueError for anything else."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        time_text, _, id_text = text.partition(":")
        return int(time_text), int(id_text)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError("invalid cursor (pass the next_cursor of a previous page)") from None


def page_of(rows: list[StoredEvent], limit: int) -> AuditPage:
    """Stores fetch limit + 1 rows: the extra one says whether there is a next page."""
    if len(rows) <= limit:
        return AuditPage(rows, None)
    rows = rows[:limit]
    last = rows[-1]
    assert last.id is not None
    return AuditPage(rows, encode_cursor(last.event.time_us, last.id))


class AuditStore(Protocol):
    name: str
    """`sqlite` or `postgres` (a metrics label)."""

    async def open(self) -> None:
        """Connect and apply schema migrations (idempotent; several writers may race)."""
        ...

    async def close(self) -> None: ...

    async def append(self, rows: Sequence[StoredEvent]) -> None:
        """Store a batch atomically. A row already stored (same writer and seq) is skipped, so a
        batch retried after an unclear failure is never stored twice. Raises AuditStoreError."""
        ...

    async def query(self, query: AuditQuery) -> AuditPage: ...

    def chain(self, server: str, since_us: int | None, until_us: int | None) -> AsyncIterator[StoredEvent]:
        """The server's stored events in the range, ordered by writer then seq (streamed)."""
        ...

    async def link(self, server: str, writer: str, seq: int) -> StoredEvent | None:
        """One writer's event by seq, or None."""
        ...

    async def anchors(self, server: str) -> dict[str, Anchor]:
        """Per writer, the last event pruning removed."""
        ...

    async def prune(self, server: str, before_us: int) -> PruneResult:
        """Remove the server's events older than `before_us`, anchoring each chain first (one transaction)."""
        ...

    async def acquire_lease(self, name: str, holder: str, ttl_seconds: float) -> bool:
        """Hold the named lease for ttl_seconds if it is free, expired or already ours.

        Retention uses it so that exactly one replica prunes a server at a time.
        """
        ...
