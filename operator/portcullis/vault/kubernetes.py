"""The cluster vault: one Secret per user in the tenant's vault namespace.

Names (shared with the operator's RBAC): the tenant key is the Secret ``portcullis-tenant-key``
unless ``spec.vault.tenantKeySecret`` names another (data key ``key``: 32 random bytes), created
here on the first ``put`` if missing; each user's
credentials are the Secret ``portcullis-cred-<sha256(user)[:16]>``, labelled
``portcullis.dev/credential=true``, annotated ``portcullis.dev/user=<user>``, with one data key
per connection holding the sealed value. The hash keeps the name a valid object name whatever
the user id; the annotation is checked on read, so a hash collision reads as "absent", and the
sealing's associated data would refuse a foreign value anyway.

Reads are served from a watch-fed copy of the namespace's credential Secrets (`SecretMirror`,
one label-selected watch per vault namespace, run by ``watch()`` as one of the gateway's
background loops): a call costs no API request, and deleting a credential cuts access as soon
as the watch delivers the deletion (milliseconds; benchmarks/api_load.py measures it). Until
the first list has completed, when no watch stream has been open for ``STALE_AFTER`` seconds,
and for a Secret this process has just written until the watch has delivered that write, a
read GETs the Secret directly, as every read did before; so does every read while this process
holds a lease on the user (an OAuth refresh must see the newest grant, not a copy). A vault
whose ``watch()`` is not running reads directly every time. The plaintext of a credential is
kept while the sealed value it came from is unchanged (`Plaintexts`, see vault/base.py).

The tenant key is cached once read (it is never rewritten in place). Adding and removing one
connection are merge patches, so concurrent writers touching different connections do not
overwrite each other; the Secret is deleted with its last key, guarded by its resourceVersion
so a concurrent put is not lost.

``exclusive`` is a lease in the same Secret: the annotation ``portcullis.dev/locks`` maps a
connection to its holder and an expiry, written by a merge patch that carries the Secret's
resourceVersion. Two replicas that read the same version cannot both write it (the second
gets 409 and reads again), so exactly one holds the lease; a replica that dies holding it
blocks the others for at most ``LOCK_HOLD_SECONDS``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from portcullis.kube import KubeClient, KubeError
from portcullis.vault.base import LOCK_HOLD_SECONDS, LOCK_POLL_SECONDS, LOCK_WAIT_SECONDS, KeyedLocks, LockTimeout, Plaintexts
from portcullis.vault.mirror import MISS, STALE_AFTER, SecretMirror, StreamObserver, WatchLoop
from portcullis.vault.sealing import KEY_BYTES, SealError, new_key, seal, unseal

TENANT_KEY_SECRET = "portcullis-tenant-key"
TENANT_KEY_FIELD = "key"
CREDENTIAL_PREFIX = "portcullis-cred-"
CREDENTIAL_LABEL = "portcullis.dev/credential"
USER_ANNOTATION = "portcullis.dev/user"
LOCKS_ANNOTATION = "portcullis.dev/locks"
_LABELS = {"app.kubernetes.io/part-of": "portcullis", "app.kubernetes.io/managed-by": "portcullis-gateway"}


def credential_secret_name(user: str) -> str:
    return CREDENTIAL_PREFIX + hashlib.sha256(user.encode("utf-8")).hexdigest()[:16]


async def create_key_secret(client: KubeClient, namespace: str, name: str, field: str, key: bytes) -> dict[str, Any]:
    """Create the Secret holding a key, or read the one a concurrent creator made first, so every
    replica ends up with the same key (a tenant's sealing key, its audit key)."""
    collection = f"/api/v1/namespaces/{namespace}/secrets"
    body = {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(_LABELS)},
        "data": {field: base64.b64encode(key).decode("ascii")},
    }
    try:
        return await client.create(collection, body)
    except KubeError as e:
        if e.status != 409:
            raise
        secret = await client.get(f"{collection}/{name}")  # another replica won: use theirs
        if secret is None:
            raise
        return secret


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


class KubernetesVault:
    """Sealed credentials in Secrets of one vault namespace."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        *,
        key_secret: str = TENANT_KEY_SECRET,
        stale_after: float = STALE_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._namespace = namespace
        self._key_secret = key_secret
        """The tenant key's Secret: `spec.vault.tenantKeySecret`, so RBAC can grant it apart from the credentials."""
        self._secrets = f"/api/v1/namespaces/{namespace}/secrets"
        self._key: bytes | None = None
        self._locks = KeyedLocks()
        self.mirror = SecretMirror(client, namespace, label=f"{CREDENTIAL_LABEL}=true", stale_after=stale_after, clock=clock)
        self._plain = Plaintexts()
        self._leased: dict[str, int] = {}
        """Users this process holds a lease on (and how many): their reads go to the API server."""

    async def watch(self, loop: WatchLoop, observer: StreamObserver | None = None) -> None:
        """Keep the copy of the credential Secrets current, for ever (the gateway runs it as a background loop)."""
        await self.mirror.run(loop, observer)

    def _path(self, name: str) -> str:
        return f"{self._secrets}/{name}"

    async def _tenant_key(self, *, create: bool) -> bytes | None:
        if self._key is not None:
            return self._key
        secret = await self._client.get(self._path(self._key_secret))
        if secret is None:
            if not create:
                return None
            secret = await create_key_secret(self._client, self._namespace, self._key_secret, TENANT_KEY_FIELD, new_key())
        try:
            key = base64.b64decode((secret.get("data") or {}).get(TENANT_KEY_FIELD, ""), validate=True)
        except binascii.Error:
            key = b""
        if len(key) != KEY_BYTES:
            raise SealError(f"Secret {self._namespace}/{self._key_secret} does not hold a {KEY_BYTES}-byte key")
        self._key = key
        return key

    async def _user_secret(self, user: str, *, fresh: bool = False) -> dict[str, Any] | None:
        """The user's Secret, from the copy when it may be used; `fresh`: from the API server."""
        name = credential_secret_name(user)
        secret = MISS if fresh or user in self._leased else self.mirror.lookup(name)
        if secret is MISS:
            secret = await self._client.get(self._path(name))
        if secret is None:
            return None
        if ((secret.get("metadata") or {}).get("annotations") or {}).get(USER_ANNOTATION) != user:
            return None  # a different user whose id hashes to the same name
        return secret

    async def get(self, tenant: str, user: str, connection: str) -> str | None:
        secret = await self._user_secret(user)
        encoded = ((secret or {}).get("data") or {}).get(connection)
        where = (tenant, user, connection)
        if not isinstance(encoded, str):
            self._plain.forget(where)
            return None
        key = await self._tenant_key(create=False)
        if key is None:
            raise SealError(f"Secret {self._namespace}/{self._key_secret} is missing; credentials cannot be opened")
        # The stored (base64) text is the version: unchanged, the plaintext opened from it is reused.
        plaintext = self._plain.opened(where, key, encoded)
        if plaintext is not None:
            return plaintext
        try:
            sealed = base64.b64decode(encoded, validate=True).decode("ascii")
        except (binascii.Error, UnicodeDecodeError):
            raise SealError(f"stored credential for connection {connection!r} is not a sealed value") from None
        plaintext = unseal(key, sealed, tenant=tenant, user=user, connection=connection)
        self._plain.keep(where, key, encoded, plaintext)
        return plaintext

    async def put(self, tenant: str, user: str, connection: str, secret: str) -> None:
        key = await self._tenant_key(create=True)
        assert key is not None  # created on demand
        value = _b64(seal(key, secret, tenant=tenant, user=user, connection=connection))
        name = credential_secret_name(user)
        existing = await self._user_secret(user)
        for _ in range(3):
            if existing is None:
                body = {
                    "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": {
                        "name": name, "namespace": self._namespace,
                        "labels": {**_LABELS, CREDENTIAL_LABEL: "true"},
                        "annotations": {USER_ANNOTATION: user},
                    },
                    "data": {connection: value},
                }
                try:
                    self.mirror.wrote(name, await self._client.create(self._secrets, body))
                    return
                except KubeError as e:
                    if e.status != 409:
                        raise
                    # Created concurrently (e.g. another connection of the same user): add our key.
            try:
                self.mirror.wrote(name, await self._client.merge_patch(self._path(name), {"data": {connection: value}}))
                return
            except KubeError as e:
                if e.status != 404:
                    raise
                existing = None  # deleted since it was read (the copy lags by the watch's latency): create it
        raise KubeError(409, "Conflict", f"credential Secret {self._path(name)} keeps changing; try again")

    async def delete(self, tenant: str, user: str, connection: str) -> bool:
        self._plain.forget((tenant, user, connection))
        name = credential_secret_name(user)
        path = self._path(name)
        for _ in range(3):
            secret = await self._user_secret(user, fresh=True)  # the delete is guarded by the version read
            data = (secret or {}).get("data") or {}
            if secret is None or connection not in data:
                return False
            if set(data) != {connection}:
                self.mirror.wrote(name, await self._client.merge_patch(path, {"data": {connection: None}}))
                return True
            try:
                deleted = await self._client.delete(path, resource_version=secret["metadata"].get("resourceVersion"))
                self.mirror.wrote(name, None)
                return deleted
            except KubeError as e:
                if e.status != 409:
                    raise
                # A connection was added since we read: read again and remove only ours.
        raise KubeError(409, "Conflict", f"credential Secret {path} keeps changing; try again")

    async def connections_of(self, tenant: str, user: str) -> list[str]:
        secret = await self._user_secret(user)
        return sorted(((secret or {}).get("data") or {}))

    def exclusive(self, tenant: str, user: str, connection: str) -> AbstractAsyncContextManager[None]:
        return self._exclusive(user, connection)

    @contextlib.asynccontextmanager
    async def _exclusive(self, user: str, connection: str) -> AsyncIterator[None]:
        holder = secrets.token_hex(8)
        async with self._locks.held(user, connection):  # this replica's holders queue here first
            self._leased[user] = self._leased.get(user, 0) + 1
            try:
                await self._take_lease(user, connection, holder)
                try:
                    yield
                finally:
                    await self._end_lease(user, connection, holder)
            finally:
                self._leased[user] -= 1
                if not self._leased[user]:
                    del self._leased[user]

    async def _take_lease(self, user: str, connection: str, holder: str) -> None:
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            secret = await self._user_secret(user, fresh=True)
            leases = _leases(secret)
            held = leases.get(connection)
            now = time.time()
            if held is None or float(held.get("until", 0)) <= now:
                leases[connection] = {"holder": holder, "until": round(now + LOCK_HOLD_SECONDS, 3)}
                try:
                    await self._write_leases(user, secret, leases)
                    return
                except _Stale:
                    pass  # someone wrote in between (409): read again
            if time.monotonic() >= deadline:
                raise LockTimeout(f"the credential for {connection!r} is being rewritten by another replica; try again")
            await asyncio.sleep(LOCK_POLL_SECONDS)

    async def _end_lease(self, user: str, connection: str, holder: str) -> None:
        for _ in range(5):
            secret = await self._user_secret(user, fresh=True)
            leases = _leases(secret)
            if secret is None or (leases.get(connection) or {}).get("holder") != holder:
                return  # deleted meanwhile, or expired and taken over
            del leases[connection]
            try:
                await self._write_leases(user, secret, leases)
                return
            except _Stale:
                continue
        # Still contended: the lease expires by itself within LOCK_HOLD_SECONDS.

    async def _write_leases(self, user: str, secret: dict[str, Any] | None, leases: dict[str, Any]) -> None:
        """Write the lease map, guarded by the version read; `_Stale` when that version is no longer current."""
        encoded = json.dumps(leases, sort_keys=True) if leases else None
        name = credential_secret_name(user)
        try:
            if secret is None:
                written = await self._client.create(self._secrets, {
                    "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": {
                        "name": name, "namespace": self._namespace,
                        "labels": {**_LABELS, CREDENTIAL_LABEL: "true"},
                        "annotations": {USER_ANNOTATION: user, LOCKS_ANNOTATION: encoded or "{}"},
                    },
                })
            else:
                version = secret["metadata"].get("resourceVersion")
                written = await self._client.merge_patch(
                    self._path(name), {"metadata": {"resourceVersion": version, "annotations": {LOCKS_ANNOTATION: encoded}}}
                )
        except KubeError as e:
            if e.status == 409:
                raise _Stale(name) from None
            raise
        self.mirror.wrote(name, written)


class _Stale(Exception):
    """The Secret changed since it was read (409 on a guarded write)."""


def _leases(secret: dict[str, Any] | None) -> dict[str, Any]:
    text = (((secret or {}).get("metadata") or {}).get("annotations") or {}).get(LOCKS_ANNOTATION)
    try:
        leases = json.loads(text) if text else {}
    except ValueError:
        return {}  # unreadable: treat as free (the next write replaces it)
    return leases if isinstance(leases, dict) else {}
