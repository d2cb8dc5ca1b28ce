"""The tenant's audit key, and the two keyed functions made from it.

One 32-byte key per tenant, kept apart from the vault's sealing key: an auditor who
verifies the log needs this key and nothing that opens a credential. Two subkeys are
derived from it (HMAC-SHA-256 with a fixed label, so neither use can stand in for the
other):

- the **digest** key: `args_digest` and `result_digest` of an event are HMACs of the
  canonical JSON of what was sent and returned. The same payload always gives the same
  digest within a tenant, so a payload kept elsewhere can be matched to its call; without
  the key a digest tells nothing, not even whether two tenants sent the same thing.
- the **chain** key: every stored event carries HMAC(chain key, previous hash | event),
  so rewriting history needs the key, not only write access to the database.

Where the key lives: `<state>/audit/keys/<tenant>.key` (0600) on a laptop; the Secret
`portcullis-audit-key` in the tenant's vault namespace in a cluster. Both are created on
first use, and concurrent creators agree on one key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from pathlib import Path
from typing import Any, Final, Protocol

from portcullis.gateway.audit.encoding import canonical_json as canonical_json  # where it was, for its importers
from portcullis.kube import KubeClient
from portcullis.vault.kubernetes import create_key_secret
from portcullis.vault.local import check_tenant, create_private_file_once, make_private_dir

KEY_BYTES: Final = 32
AUDIT_KEY_SECRET: Final = "portcullis-audit-key"
AUDIT_KEY_FIELD: Final = "key"
_DIGEST_LABEL: Final = b"portcullis/audit/digest/v1"
_CHAIN_LABEL: Final = b"portcullis/audit/chain/v1"
_SHA256_BLOCK: Final = 64  # bytes: HMAC pads or hashes its key to this (RFC 2104)


class AuditKeyError(Exception):
    """The audit key exists but is unusable (wrong length, not base64)."""


class AuditKeys(Protocol):
    async def key(self, tenant: str) -> bytes:
        """The tenant's audit key, created if there is none yet."""
        ...


class KeyedHash:
    """HMAC-SHA-256 under one key (RFC 2104), keyed once: each message then costs two copies of
    hash states made from the key, not a new key schedule as `hmac.digest` does per call, and
    no Python frames (`hmac.HMAC.copy` and `.hexdigest` are Python methods around the C state)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes):
        if len(key) > _SHA256_BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_SHA256_BLOCK, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def hexdigest(self, data: bytes) -> str:
        inner = self._inner.copy()
        inner.update(data)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()


class AuditKey:
    """The functions of one tenant's audit key."""

    def __init__(self, key: bytes):
        if len(key) != KEY_BYTES:
            raise AuditKeyError(f"an audit key must be {KEY_BYTES} bytes, got {len(key)}")
        self._digest = KeyedHash(hmac.new(key, _DIGEST_LABEL, hashlib.sha256).digest())
        self.chain_key = hmac.new(key, _CHAIN_LABEL, hashlib.sha256).digest()

    def digest(self, value: Any) -> str | None:
        """The keyed digest of a JSON value (None for an absent value)."""
        if value is None:
            return None
        try:
            data = canonical_json(value)
        except (TypeError, ValueError):  # not JSON (a NaN, say): digest its repr rather than fail the call
            data = repr(value).encode()
        return "hmac-sha256:" + self._digest.hexdigest(data)


class LocalAuditKeys:
    """`<state>/audit/keys/<tenant>.key`, base64 of 32 random bytes, mode 0600."""

    def __init__(self, state_dir: Path):
        self._root = Path(state_dir) / "audit" / "keys"

    async def key(self, tenant: str) -> bytes:
        check_tenant(tenant)
        path = self._root / f"{tenant}.key"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            make_private_dir(self._root.parent)
            make_private_dir(self._root)
            raw = create_private_file_once(path, base64.b64encode(os.urandom(KEY_BYTES)) + b"\n")
        return _decode(raw.strip(), str(path))  # the file holds base64 text


class KubernetesAuditKeys:
    """The Secret `portcullis-audit-key` in the vault namespace (data key `key`)."""

    def __init__(self, client: KubeClient, namespace: str):
        self._client = client
        self._namespace = namespace
        self._cached: bytes | None = None

    async def key(self, tenant: str) -> bytes:
        if self._cached is not None:
            return self._cached
        secret = await self._client.get(f"/api/v1/namespaces/{self._namespace}/secrets/{AUDIT_KEY_SECRET}")
        if secret is None:
            secret = await create_key_secret(self._client, self._namespace, AUDIT_KEY_SECRET, AUDIT_KEY_FIELD, os.urandom(KEY_BYTES))
        # Secret data is base64 of the value, and the value is the raw key.
        encoded = str((secret.get("data") or {}).get(AUDIT_KEY_FIELD, ""))
        self._cached = _decode(encoded.encode("ascii"), f"Secret {self._namespace}/{AUDIT_KEY_SECRET}")
        return self._cached


class MemoryAuditKeys:
    def __init__(self) -> None:
        self._keys: dict[str, bytes] = {}

    async def key(self, tenant: str) -> bytes:
        return self._keys.setdefault(tenant, os.urandom(KEY_BYTES))


def _decode(encoded: bytes, where: str) -> bytes:
    try:
        key = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise AuditKeyError(f"{where} is not base64") from None
    if len(key) != KEY_BYTES:
        raise AuditKeyError(f"{where} does not hold a {KEY_BYTES}-byte key")
    return key
