"""AES-256-GCM sealing of one credential, bound to where it belongs.

A sealed value is ``"v1." + urlsafe_b64(nonce(12) || ciphertext || tag(16))``. The version
prefix lets a later format coexist with this one; the 96-bit random nonce is the size GCM is
specified for (NIST SP 800-38D), and with one key per tenant and a handful of writes per user
the random-nonce collision bound is nowhere near reached.

The associated data binds the tenant, the user and the connection, so a sealed value copied to
another user's slot, another tenant's store or another connection fails authentication instead
of opening. Each part is length-prefixed (4-byte big-endian) behind a domain label, so no two
different triples encode to the same bytes: ("a|b", "c") and ("a", "b|c") differ.

Errors never carry the secret or the sealed text: callers log them.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
_NONCE_BYTES = 12
_TAG_BYTES = 16
_PREFIX = "v1."
_DOMAIN = b"portcullis.vault.v1\x00"


class SealError(ValueError):
    """A sealed value that cannot be opened here; the message names no secret."""


def new_key() -> bytes:
    """A fresh random 256-bit tenant key."""
    return os.urandom(KEY_BYTES)


def associated_data(tenant: str, user: str, connection: str) -> bytes:
    """The unambiguous encoding of where a sealed value belongs."""
    out = bytearray(_DOMAIN)
    for part in (tenant, user, connection):
        raw = part.encode("utf-8")
        out += struct.pack(">I", len(raw))
        out += raw
    return bytes(out)


def _cipher(key: bytes) -> AESGCM:
    if len(key) != KEY_BYTES:
        raise SealError(f"a tenant key must be {KEY_BYTES} bytes, got {len(key)}")
    return AESGCM(key)


def seal(key: bytes, plaintext: str, *, tenant: str, user: str, connection: str) -> str:
    """Encrypt one credential for exactly this tenant, user and connection."""
    nonce = os.urandom(_NONCE_BYTES)
    body = _cipher(key).encrypt(nonce, plaintext.encode("utf-8"), associated_data(tenant, user, connection))
    return _PREFIX + base64.urlsafe_b64encode(nonce + body).decode("ascii")


def unseal(key: bytes, sealed: str, *, tenant: str, user: str, connection: str) -> str:
    """Decrypt a sealed credential; raise SealError if it was not sealed for this place and key."""
    if not sealed.startswith(_PREFIX):
        raise SealError("unsupported sealed format (expected a 'v1.' value)")
    try:
        raw = base64.urlsafe_b64decode(sealed[len(_PREFIX):].encode("ascii"))
    except (binascii.Error, UnicodeEncodeError):
        raise SealError("malformed sealed value (not url-safe base64)") from None
    if len(raw) < _NONCE_BYTES + _TAG_BYTES:
        raise SealError("malformed sealed value (too short)")
    nonce, body = raw[:_NONCE_BYTES], raw[_NONCE_BYTES:]
    try:
        plain = _cipher(key).decrypt(nonce, body, associated_data(tenant, user, connection))
    except InvalidTag:
        # One message for every cause: a wrong key, a value moved from elsewhere, or tampering
        # are indistinguishable by design, and telling them apart would help an attacker.
        raise SealError(
            f"sealed credential for connection {connection!r} does not open: wrong tenant key, "
            "or it was sealed for another tenant, user or connection, or it was altered"
        ) from None
    try:
        return plain.decode("utf-8")
    except UnicodeDecodeError:
        raise SealError("sealed credential is not UTF-8 text") from None
