"""Revoked session tokens, checked on every request.

Two kinds of entry: a token by ``jti`` (kept until the token's own expiry, then pruned) and a
user with a time ``at`` (every token of that user issued at or before ``at`` is rejected, so
re-minting afterwards works). Both times are kept to the millisecond, and minting issues a token
strictly after the user's last revocation it knows of (``revoked_at``), so a token minted in the
same second as a revocation, on either side of it, is judged by which came first. ``is_revoked`` is synchronous and reads an in-memory view; each
store keeps that view current its own way:

- ``MemoryRevocations``: the view is the store (tests, single process).
- ``FileRevocations``: a JSON file shared by the CLI and a running gateway. ``is_revoked`` does
  one ``os.stat`` and re-reads only when (mtime_ns, size, inode) changed; writers take an
  advisory lock, prune expired tokens and replace the file atomically.
- ``KubernetesRevocations``: the ConfigMap ``<server>-revocations`` (data ``jti.<jti>`` = exp,
  ``user.<sha256(user)[:32]>`` = at; user ids are hashed because ConfigMap keys allow only
  ``[-._a-zA-Z0-9]``). Writes are merge patches; ``run()`` watches the ConfigMap so every
  replica applies a revocation within the watch's latency (well under a second normally).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final, Protocol

import anyio

from portcullis.gateway.loops import Loop, StreamWatch
from portcullis.gateway.identity.tokens import SessionClaims
from portcullis.kube import KubeClient, KubeError
from portcullis.vault.local import make_private_dir, write_private_file

_JTI = re.compile(r"[A-Za-z0-9_-]{1,200}")


class RevocationStore(Protocol):
    def is_revoked(self, claims: SessionClaims) -> bool:
        """True if this token, or every token of its user up to its issue time, was revoked."""
        ...

    async def revoke_token(self, jti: str, expires_at: int) -> None:
        """Revoke one token until ``expires_at`` (its ``exp``; afterwards it is dead anyway)."""
        ...

    async def revoke_user(self, user: str, at: float) -> None:
        """Revoke every token of ``user`` issued at or before ``at`` (epoch seconds, to the millisecond)."""
        ...

    def revoked_at(self, user: str) -> float | None:
        """When every token of ``user`` was last revoked, if ever."""
        ...


@dataclasses.dataclass(frozen=True)
class Revocations:
    """An immutable snapshot: jti -> expiry, user key -> revoked-at. Replaced, never mutated."""

    tokens: Mapping[str, int] = dataclasses.field(default_factory=dict)
    users: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def revokes(self, claims: SessionClaims, user_key: str) -> bool:
        if claims.jti in self.tokens:
            return True
        at = self.users.get(user_key)
        return at is not None and claims.iat <= at

    def with_token(self, jti: str, expires_at: int, now: int) -> Revocations:
        tokens = {j: exp for j, exp in self.tokens.items() if exp >= now}
        tokens[jti] = max(expires_at, tokens.get(jti, expires_at))
        return Revocations(tokens, self.users)

    def with_user(self, user_key: str, at: float, now: int) -> Revocations:
        users = dict(self.users)
        users[user_key] = max(at, users.get(user_key, at))
        tokens = {j: exp for j, exp in self.tokens.items() if exp >= now}
        return Revocations(tokens, users)


def check_jti(jti: str) -> None:
    if not _JTI.fullmatch(jti):
        raise ValueError("a jti is 1-200 url-safe base64 characters")


class MemoryRevocations:
    """Revocations of this process only."""

    def __init__(self) -> None:
        self._view = Revocations()

    def is_revoked(self, claims: SessionClaims) -> bool:
        return self._view.revokes(claims, claims.sub)

    async def revoke_token(self, jti: str, expires_at: int) -> None:
        check_jti(jti)
        self._view = self._view.with_token(jti, expires_at, int(time.time()))

    async def revoke_user(self, user: str, at: float) -> None:
        self._view = self._view.with_user(user, at, int(time.time()))

    def revoked_at(self, user: str) -> float | None:
        return self._view.users.get(user)


FILE_RECHECK_SECONDS: Final = 0.05
"""How often the revocation file is looked at again: a revocation written by another local process
(the CLI, another `serve`) applies within this; this process's own revocations apply at once."""


class FileRevocations:
    """Revocations in a JSON file that several local processes share."""

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._view = Revocations()
        self._checked = float("-inf")  # monotonic time of the last stat

    def _refresh(self) -> Revocations:
        now = time.monotonic()
        if now - self._checked < FILE_RECHECK_SECONDS:
            return self._view  # a stat per call cost more than the check it guards
        self._checked = now
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            self._stamp, self._view = None, Revocations()
            return self._view
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            self._view = self._read()
            self._stamp = stamp
        return self._view

    def _read(self) -> Revocations:
        try:
            doc = json.loads(self._path.read_text("utf-8"))
        except FileNotFoundError:
            return Revocations()
        return Revocations(
            {str(k): int(v) for k, v in (doc.get("tokens") or {}).items()},
            {str(k): float(v) for k, v in (doc.get("users") or {}).items()},
        )

    def is_revoked(self, claims: SessionClaims) -> bool:
        return self._refresh().revokes(claims, claims.sub)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # <state>/revocations/<namespace>/: private like the rest of the state directory.
        make_private_dir(self._path.parent.parent)
        make_private_dir(self._path.parent)
        fd = os.open(f"{self._path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # read-modify-write by the CLI and the gateway at once
            yield
        finally:
            os.close(fd)

    def _write(self, view: Revocations) -> None:
        doc = {"tokens": dict(sorted(view.tokens.items())), "users": dict(sorted(view.users.items()))}
        write_private_file(self._path, (json.dumps(doc, indent=2) + "\n").encode("utf-8"))
        self._stamp = None  # re-read at the next look; the view below is already current
        self._view = view

    async def revoke_token(self, jti: str, expires_at: int) -> None:
        check_jti(jti)
        with self._locked():
            self._write(self._read().with_token(jti, expires_at, int(time.time())))

    async def revoke_user(self, user: str, at: float) -> None:
        with self._locked():
            self._write(self._read().with_user(user, at, int(time.time())))

    def revoked_at(self, user: str) -> float | None:
        return self._refresh().users.get(user)


def user_key(user: str) -> str:
    return hashlib.sha256(user.encode("utf-8")).hexdigest()[:32]


class KubernetesRevocations:
    """Revocations in a ConfigMap, mirrored in memory by a watch (``run``)."""

    def __init__(self, client: KubeClient, namespace: str, configmap_name: str) -> None:
        self._client = client
        self._namespace = namespace
        self._name = configmap_name
        self._collection = f"/api/v1/namespaces/{namespace}/configmaps"
        self._path = f"{self._collection}/{configmap_name}"
        self._view = Revocations()
        # Events are made on first use: anyio needs a running event loop to make one, and the
        # store may be constructed before the loop starts.
        self._synced = False
        self._synced_event: anyio.Event | None = None
        self._changed: anyio.Event | None = None
        # The hot path hashes the same few users over and over.
        self._user_keys: dict[str, str] = {}

    # -- reading ------------------------------------------------------------------------------

    def is_revoked(self, claims: SessionClaims) -> bool:
        key = self._user_keys.get(claims.sub)
        if key is None:
            if len(self._user_keys) > 10_000:
                self._user_keys.clear()
            key = self._user_keys[claims.sub] = user_key(claims.sub)
        return self._view.revokes(claims, key)

    @property
    def synced(self) -> bool:
        """True once the ConfigMap has been read at least once (gate readiness on it)."""
        return self._synced

    async def wait_synced(self) -> None:
        if not self._synced:
            if self._synced_event is None:
                self._synced_event = anyio.Event()
            await self._synced_event.wait()

    def next_change(self) -> anyio.Event:
        """An event set at the next update of the view (take it before checking the view)."""
        if self._changed is None:
            self._changed = anyio.Event()
        return self._changed

    def _apply(self, obj: Mapping[str, Any] | None) -> None:
        data = (obj or {}).get("data") or {}
        tokens: dict[str, int] = {}
        users: dict[str, float] = {}
        for key, value in data.items():
            kind, _, ident = str(key).partition(".")
            with contextlib.suppress(ValueError):
                if kind == "jti":
                    tokens[ident] = int(value)
                elif kind == "user":
                    users[ident] = float(value)
        self._view = Revocations(tokens, users)
        self._synced = True
        if self._synced_event is not None:
            self._synced_event.set()
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    async def run(self, loop: Loop | None = None) -> None:
        """Read the ConfigMap, then follow it for ever (cancel to stop).

        A failure (the API unreachable, the watch refused) is retried with `loop`'s backoff,
        from a fresh read, and reported on `loop`; it does not end the watch. The loop is
        synced at the first read, and recovers when a watch stream opens again.
        """
        loop = loop or Loop("revocations-watch")
        stream = StreamWatch(loop)
        # Selectors narrow the stream on a real API server; the name check keeps us correct without.
        path = f"{self._collection}?fieldSelector=metadata.name%3D{self._name}"
        try:
            while True:
                try:
                    obj = await self._client.get(self._path)
                    self._apply(obj)
                    loop.mark_synced()
                    rv = ((obj or {}).get("metadata") or {}).get("resourceVersion")
                    async for kind, event_obj in self._client.watch(path, rv, observer=stream, sleep=loop.sleep, clock=loop.clock):
                        if (event_obj.get("metadata") or {}).get("name") != self._name:
                            continue
                        self._apply(None if kind == "DELETED" else event_obj)
                except Exception as exc:
                    stream.abandon()
                    loop.failed(exc)
                await loop.pause()
        finally:
            stream.abandon()

    # -- writing ------------------------------------------------------------------------------

    async def _patch(self, data: dict[str, str | None]) -> None:
        try:
            obj = await self._client.merge_patch(self._path, {"data": data})
        except KubeError as e:
            if e.status != 404:
                raise
            # The operator creates it; outside the operator (e2e, manual runs) create it here.
            body = {
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": self._name, "namespace": self._namespace},
                "data": {k: v for k, v in data.items() if v is not None},
            }
            try:
                obj = await self._client.create(self._collection, body)
            except KubeError as e2:
                if e2.status != 409:
                    raise
                obj = await self._client.merge_patch(self._path, {"data": data})
        self._apply(obj)

    def _expired(self, now: int) -> dict[str, str | None]:
        return {f"jti.{jti}": None for jti, exp in self._view.tokens.items() if exp < now}

    async def revoke_token(self, jti: str, expires_at: int) -> None:
        check_jti(jti)
        data = self._expired(int(time.time()))
        data[f"jti.{jti}"] = str(max(expires_at, self._view.tokens.get(jti, expires_at)))
        await self._patch(data)

    async def revoke_user(self, user: str, at: float) -> None:
        key = user_key(user)
        data = self._expired(int(time.time()))
        data[f"user.{key}"] = repr(max(at, self._view.users.get(key, at)))
        await self._patch(data)

    def revoked_at(self, user: str) -> float | None:
        return self._view.users.get(user_key(user))
