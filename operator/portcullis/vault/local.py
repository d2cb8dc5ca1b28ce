"""The directory-backed vault that ``portcullis serve`` uses on a laptop.

Layout::

    <state_dir>/vault/<tenant>/            mode 0700
        tenant.key                         mode 0600, base64 of 32 random bytes
        <sha256(user)[:32]>.<connection>.sealed   mode 0600, one sealed value

The user id is hashed into the file name rather than encoded: user ids are emails or contain
'/', an encoding can exceed the 255-byte file-name limit, and base64 breaks on case-insensitive
file systems (macOS). Nothing needs the user back from a file name; the sealed value's
associated data binds the real user id, so even a colliding or renamed file does not open.

Writes are atomic (a private temp file in the same directory, then ``os.replace``), so a
concurrent reader sees the old value or the new one. ``exclusive`` is an ``flock`` on
``<sha256(user)[:32]>.<connection>.lock`` beside the value, so replicas sharing one state
directory take turns; the kernel drops the lock of a process that dies. The tenant key is created with a
link-based exclusive create, so two processes starting at once agree on one key. File I/O is
done inline: reads of a few hundred bytes from local disk cost less than a thread hop.

Every ``get`` stats the credential's file, so a deleted or replaced credential is seen at the
very next call, by this process and by any other sharing the directory. The file's sealed text
is re-read only when (inode, mtime_ns, size) changed, and unsealed only when that text differs
from the one opened last time (`Plaintexts`): an unchanged credential costs one ``stat``.
"""

from __future__ import annotations

import base64
import binascii
import asyncio
import contextlib
import fcntl
import hashlib
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from portcullis.vault.base import LOCK_POLL_SECONDS, LOCK_WAIT_SECONDS, KeyedLocks, LockTimeout, Plaintexts
from portcullis.vault.sealing import KEY_BYTES, new_key, seal

_SAFE_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
# Kubernetes object names (DNS-1123 subdomain), which is what connection names are.
_SAFE_CONNECTION = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_USER_HASH_CHARS = 32
_SUFFIX = ".sealed"


def _user_file_prefix(user: str) -> str:
    return hashlib.sha256(user.encode("utf-8")).hexdigest()[:_USER_HASH_CHARS] + "."


def check_tenant(tenant: str) -> None:
    if not _SAFE_TENANT.fullmatch(tenant) or tenant in {".", ".."}:
        raise ValueError(f"invalid tenant name {tenant!r}")


def _check_connection(connection: str) -> None:
    if not _SAFE_CONNECTION.fullmatch(connection):
        raise ValueError(f"invalid connection name {connection!r}")


def write_private_file(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, mode 0600 from the first byte."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")  # mkstemp creates 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def create_private_file_once(path: Path, data: bytes) -> bytes:
    """Create ``path`` with ``data`` unless it exists; return what the file holds afterwards.

    The content is written to a temp file first and hard-linked into place: ``link`` fails if
    the name exists, so a concurrent creator's complete file wins and nobody sees a partial one.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return path.read_bytes()
        return data
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) and make sure it is 0700 whatever the umask."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


class LocalVault:
    """Sealed credentials in files under ``<state_dir>/vault``."""

    def __init__(self, state_dir: Path) -> None:
        self._root = Path(state_dir) / "vault"
        # Tenant keys are cached once read: they never change in place, and re-reading one per
        # call would double the file I/O on the hot path. Plaintexts are kept only while the
        # sealed text they were opened from is what the file holds (see the module docstring).
        self._keys: dict[str, bytes] = {}
        self._sealed: dict[Path, tuple[tuple[int, int, int], str]] = {}
        self._paths: dict[tuple[str, str, str], Path] = {}  # checked and joined once per credential
        self._plain = Plaintexts()
        self._locks = KeyedLocks()

    def _tenant_dir(self, tenant: str) -> Path:
        check_tenant(tenant)
        return self._root / tenant

    def _path(self, tenant: str, user: str, connection: str) -> Path:
        where = (tenant, user, connection)
        path = self._paths.get(where)
        if path is None:
            _check_connection(connection)
            path = self._tenant_dir(tenant) / f"{_user_file_prefix(user)}{connection}{_SUFFIX}"
            if len(self._paths) >= 65_536:
                self._paths.clear()
            self._paths[where] = path
        return path

    def _read_sealed(self, path: Path) -> str:
        """The sealed text of one credential file, re-read only when the file changed.

        Every `get` still stats the file, so a deleted or replaced credential is seen at the
        very next call; skipping the unchanged read saves an open and a read per call.
        """
        st = os.stat(path)
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._sealed.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        sealed = path.read_text("ascii").strip()
        if len(self._sealed) >= 65_536:
            self._sealed.clear()
        self._sealed[path] = (stamp, sealed)
        return sealed

    def _key(self, tenant: str, *, create: bool) -> bytes | None:
        key = self._keys.get(tenant)
        if key is not None:
            return key
        directory = self._tenant_dir(tenant)
        path = directory / "tenant.key"
        try:
            encoded = path.read_bytes()
        except FileNotFoundError:
            if not create:
                return None
            make_private_dir(self._root)
            make_private_dir(directory)
            encoded = create_private_file_once(path, base64.b64encode(new_key()) + b"\n")
        try:
            key = base64.b64decode(encoded.strip(), validate=True)
        except binascii.Error:
            raise ValueError(f"tenant key file {path} is not base64") from None
        if len(key) != KEY_BYTES:
            raise ValueError(f"tenant key file {path} does not hold {KEY_BYTES} bytes")
        self._keys[tenant] = key
        return key

    async def get(self, tenant: str, user: str, connection: str) -> str | None:
        path = self._path(tenant, user, connection)
        try:
            sealed = self._read_sealed(path)
        except FileNotFoundError:
            self._sealed.pop(path, None)
            self._plain.forget((tenant, user, connection))
            return None
        key = self._key(tenant, create=False)
        if key is None:
            # A credential without its tenant key can never open; say so rather than "absent".
            raise ValueError(f"tenant key for {tenant!r} is missing; stored credentials cannot be opened")
        return self._plain.open((tenant, user, connection), key, sealed)

    async def put(self, tenant: str, user: str, connection: str, secret: str) -> None:
        path = self._path(tenant, user, connection)
        key = self._key(tenant, create=True)
        assert key is not None  # created on demand
        sealed = seal(key, secret, tenant=tenant, user=user, connection=connection)
        write_private_file(path, sealed.encode("ascii") + b"\n")

    async def delete(self, tenant: str, user: str, connection: str) -> bool:
        self._plain.forget((tenant, user, connection))
        try:
            os.unlink(self._path(tenant, user, connection))
        except FileNotFoundError:
            return False
        return True

    async def connections_of(self, tenant: str, user: str) -> list[str]:
        prefix = _user_file_prefix(user)
        try:
            names = os.listdir(self._tenant_dir(tenant))
        except FileNotFoundError:
            return []
        return sorted(
            name[len(prefix):-len(_SUFFIX)]
            for name in names
            if name.startswith(prefix) and name.endswith(_SUFFIX)
        )

    def exclusive(self, tenant: str, user: str, connection: str) -> AbstractAsyncContextManager[None]:
        return self._exclusive(tenant, user, connection)

    @contextlib.asynccontextmanager
    async def _exclusive(self, tenant: str, user: str, connection: str) -> AsyncIterator[None]:
        path = self._path(tenant, user, connection).with_suffix(".lock")
        async with self._locks.held(tenant, user, connection):  # this process's holders queue here
            make_private_dir(self._root)
            make_private_dir(path.parent)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                deadline = time.monotonic() + LOCK_WAIT_SECONDS
                while True:  # other processes: poll, so waiting never blocks the event loop
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise LockTimeout(f"the credential for {connection!r} is being rewritten by another process; try again") from None
                        await asyncio.sleep(LOCK_POLL_SECONDS)
                yield
            finally:
                os.close(fd)  # closing drops the flock
