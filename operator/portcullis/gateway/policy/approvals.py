"""Approvals: a person approves one exact call before the upstream sees it.

A tool whose ToolMapping says `approval: {}` needs one. The approval is bound to the user, the
tool and a digest of the arguments (SHA-256 of their canonical JSON). It is single use, and it
expires. Approving one mail therefore never approves another, nor the same mail twice.

    call needs approval -> an approved, unused, unexpired approval for (user, tool, digest)?
        yes: consumed, the call goes ahead; the audit event says who approved and when
        no:  the pending one for that digest (or a new one) -> wait up to `waitSeconds` for a
             decision, else answer "pending approval <id>": the agent retries the same call

People decide through the admin API (`GET /v1/approvals`, `POST /v1/approvals/{id}`, RBAC verb
`approve`). The approver sees the tool and the arguments: the store keeps them until the
approval is decided and used, or expires. They are never written to the audit log.

The store follows `spec.limits.store`. `replica` keeps approvals in this gateway's memory, so
the admin call must reach the replica that holds the approval (`portcullis serve`, one
replica). `postgres` shares them across replicas, in the table `portcullis_approvals`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

import asyncpg

State = Literal["pending", "approved", "denied", "used"]
MAX_PENDING = 10_000
OPEN: tuple[State, ...] = ("pending", "approved", "denied")
"""States that answer a repeated call: still waiting, granted once, or refused (until it expires)."""


def digest(tool: str, arguments: Mapping[str, Any] | None) -> str:
    canonical = json.dumps({"tool": tool, "arguments": arguments or {}}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Approval:
    id: str
    user: str
    tool: str
    digest: str
    arguments: dict[str, Any]
    created_at: float
    expires_at: float
    state: State = "pending"
    decided_by: str | None = None
    decided_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "user": self.user, "tool": self.tool, "arguments": self.arguments, "state": self.state,
            "createdAt": int(self.created_at), "expiresAt": int(self.expires_at),
            "decidedBy": self.decided_by, "decidedAt": int(self.decided_at) if self.decided_at else None,
        }


class ApprovalStore(Protocol):
    async def open_for(self, user: str, tool: str, digest: str, arguments: dict[str, Any], ttl: float) -> Approval:
        """The latest unexpired pending, approved or denied approval for this exact call, or a new pending one."""
        ...

    async def consume(self, approval_id: str) -> Approval | None:
        """Mark an approved, unexpired approval used (once): it then lets exactly one call through."""
        ...

    async def get(self, approval_id: str) -> Approval | None: ...

    async def pending(self) -> list[Approval]: ...

    async def decide(self, approval_id: str, approve: bool, by: str) -> Approval | None:
        """Approve or deny a pending, unexpired approval; None when there is none to decide."""
        ...

    async def close(self) -> None: ...


class MemoryApprovals:
    """This replica's approvals (`spec.limits.store: replica`)."""

    def __init__(self) -> None:
        self._by_id: dict[str, Approval] = {}

    def _sweep(self, now: float) -> None:
        if len(self._by_id) >= MAX_PENDING:
            self._by_id = {k: a for k, a in self._by_id.items() if a.expires_at > now and a.state in OPEN}

    async def open_for(self, user: str, tool: str, digest: str, arguments: dict[str, Any], ttl: float) -> Approval:
        now = time.time()
        for approval in reversed(self._by_id.values()):  # the latest first
            if (approval.user, approval.tool, approval.digest) == (user, tool, digest) and approval.state in OPEN \
                    and approval.expires_at > now:
                return approval
        self._sweep(now)
        approval = Approval(secrets.token_hex(8), user, tool, digest, dict(arguments), now, now + ttl)
        self._by_id[approval.id] = approval
        return approval

    async def consume(self, approval_id: str) -> Approval | None:
        approval = self._by_id.get(approval_id)
        if approval is None or approval.state != "approved" or approval.expires_at <= time.time():
            return None
        used = self._by_id[approval_id] = replace(approval, state="used", arguments={})
        return used

    async def get(self, approval_id: str) -> Approval | None:
        return self._by_id.get(approval_id)

    async def pending(self) -> list[Approval]:
        now = time.time()
        return sorted((a for a in self._by_id.values() if a.state == "pending" and a.expires_at > now), key=lambda a: a.created_at)

    async def decide(self, approval_id: str, approve: bool, by: str) -> Approval | None:
        approval = self._by_id.get(approval_id)
        if approval is None or approval.state != "pending" or approval.expires_at <= time.time():
            return None
        decided = replace(approval, state="approved" if approve else "denied", decided_by=by, decided_at=time.time())
        if not approve:
            decided = replace(decided, arguments={})
        self._by_id[approval_id] = decided
        return decided

    async def close(self) -> None:
        return None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS portcullis_approvals (
    id text PRIMARY KEY, server text NOT NULL, "user" text NOT NULL, tool text NOT NULL, digest text NOT NULL,
    arguments jsonb NOT NULL, created_at float8 NOT NULL, expires_at float8 NOT NULL, state text NOT NULL,
    decided_by text, decided_at float8
)"""
_COLUMNS = 'id, "user", tool, digest, arguments, created_at, expires_at, state, decided_by, decided_at'


class PostgresApprovals:
    """Approvals shared by every replica (`spec.limits.store: postgres`); state changes are single
    guarded UPDATEs, so two replicas cannot both consume one approval."""

    def __init__(self, dsn: str, server: str) -> None:
        self._dsn, self._server = dsn, server
        self._pool: Any = None
        self._lock = asyncio.Lock()

    async def _db(self) -> Any:
        async with self._lock:
            if self._pool is None:
                pool = await asyncpg.create_pool(self._dsn, min_size=0, max_size=2)
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('portcullis_approvals'))")
                    await conn.execute(_SCHEMA)
                self._pool = pool
        return self._pool

    async def open_for(self, user: str, tool: str, digest: str, arguments: dict[str, Any], ttl: float) -> Approval:
        db, now = await self._db(), time.time()
        row = await db.fetchrow(
            f"SELECT {_COLUMNS} FROM portcullis_approvals WHERE server = $1 AND \"user\" = $2 AND tool = $3 AND digest = $4 "
            "AND state IN ('pending', 'approved', 'denied') AND expires_at > $5 ORDER BY created_at DESC LIMIT 1",
            self._server, user, tool, digest, now,
        )
        if row is not None:
            return _approval(row)
        approval = Approval(secrets.token_hex(8), user, tool, digest, dict(arguments), now, now + ttl)
        await db.execute(
            "INSERT INTO portcullis_approvals (id, server, \"user\", tool, digest, arguments, created_at, expires_at, state) "
            "VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, 'pending')",
            approval.id, self._server, user, tool, digest, json.dumps(arguments), now, approval.expires_at,
        )
        return approval

    async def consume(self, approval_id: str) -> Approval | None:
        row = await (await self._db()).fetchrow(
            f"UPDATE portcullis_approvals SET state = 'used', arguments = '{{}}'::jsonb WHERE id = $1 AND server = $2 "
            f"AND state = 'approved' AND expires_at > $3 RETURNING {_COLUMNS}",
            approval_id, self._server, time.time(),
        )
        return None if row is None else _approval(row)

    async def get(self, approval_id: str) -> Approval | None:
        row = await (await self._db()).fetchrow(
            f"SELECT {_COLUMNS} FROM portcullis_approvals WHERE id = $1 AND server = $2", approval_id, self._server
        )
        return None if row is None else _approval(row)

    async def pending(self) -> list[Approval]:
        rows = await (await self._db()).fetch(
            f"SELECT {_COLUMNS} FROM portcullis_approvals WHERE server = $1 AND state = 'pending' AND expires_at > $2 "
            "ORDER BY created_at LIMIT 1000",
            self._server, time.time(),
        )
        return [_approval(r) for r in rows]

    async def decide(self, approval_id: str, approve: bool, by: str) -> Approval | None:
        row = await (await self._db()).fetchrow(
            f"UPDATE portcullis_approvals SET state = $3, decided_by = $4, decided_at = $5, "
            f"arguments = CASE WHEN $3 = 'denied' THEN '{{}}'::jsonb ELSE arguments END "
            f"WHERE id = $1 AND server = $2 AND state = 'pending' AND expires_at > $5 RETURNING {_COLUMNS}",
            approval_id, self._server, "approved" if approve else "denied", by, time.time(),
        )
        return None if row is None else _approval(row)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()


def _approval(row: Any) -> Approval:
    arguments = row["arguments"]
    return Approval(
        id=row["id"], user=row["user"], tool=row["tool"], digest=row["digest"],
        arguments=json.loads(arguments) if isinstance(arguments, str) else dict(arguments),
        created_at=row["created_at"], expires_at=row["expires_at"], state=row["state"],
        decided_by=row["decided_by"], decided_at=row["decided_at"],
    )
