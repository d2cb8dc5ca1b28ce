"""A throwaway PostgreSQL cluster for the test session: its own data directory, a free port on
127.0.0.1, trust authentication, gone when the session ends.

The binaries come from the machine (Debian's `postgresql` package keeps them in
/usr/lib/postgresql/<version>/bin, off PATH; `.ci/run` installs it). `initdb` and `pg_ctl`
refuse to run as root, so as root every command runs as the `postgres` user the package
creates, in a temporary directory that user owns.

Without the binaries the tests that need PostgreSQL are skipped, with the reason, except under
CI (`CI` set), where that is a failure: CI must install them and a skip would hide it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

SUPERUSER = "postgres"
DATABASE = "portcullis_test"
TIMEOUT = 30  # seconds, for each start, stop and command
_DEBIAN_ROOT = Path("/usr/lib/postgresql")
_TOOLS = ("initdb", "pg_ctl", "postgres", "pg_isready", "createdb")


def find_bindir() -> Path | None:
    """The directory holding `initdb` and `pg_ctl`: $PORTCULLIS_PG_BINDIR, PATH, then Debian's (newest first)."""
    candidates: list[Path] = []
    if os.environ.get("PORTCULLIS_PG_BINDIR"):
        candidates.append(Path(os.environ["PORTCULLIS_PG_BINDIR"]))
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)  # /usr/local/bin/pg_ctl may be a symlink
    if _DEBIAN_ROOT.is_dir():
        versions = [p for p in _DEBIAN_ROOT.iterdir() if p.name.isdigit()]
        candidates.extend(p / "bin" for p in sorted(versions, key=lambda p: int(p.name), reverse=True))
    for bindir in candidates:
        if all(os.access(bindir / tool, os.X_OK) for tool in _TOOLS):
            return bindir
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class PostgresServer:
    """One running cluster. `stop()` and `start()` keep its data directory and port."""

    bindir: Path
    root: Path
    port: int
    run_as: str | None
    """The OS user that runs the server (`postgres` when the tests run as root)."""

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return self.url_for(DATABASE)

    def url_for(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.run_as is not None and shutil.which("runuser"):
            command = ["runuser", "-u", self.run_as, "--", *command]
        elif self.run_as is not None:
            command = ["su", self.run_as, "-s", "/bin/sh", "-c", shlex.join(command)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT + 10, cwd=self.root, check=False)
        if result.returncode != 0:
            output = "\n".join(part for part in (result.stdout, result.stderr, self._log_tail()) if part)
            raise RuntimeError(f"{args[0]} failed ({result.returncode}):\n{output}")
        return result

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "server log:\n" + "\n".join((self.root / "server.log").read_text().splitlines()[-20:])
        return ""

    def initdb(self) -> None:
        self._run(
            "initdb", "-D", str(self.datadir), "-A", "trust", "-U", SUPERUSER, "-E", "UTF8", "--no-locale", "--no-sync"
        )

    def start(self) -> None:
        options = " ".join([
            f"-p {self.port}", f"-k {self.root}", "-c listen_addresses=127.0.0.1",
            # A throwaway cluster: durability across a power loss is not under test.
            "-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off", "-c max_connections=100",
        ])
        log = str(self.root / "server.log")
        self._run("pg_ctl", "-D", str(self.datadir), "-l", log, "-o", options, "-w", "-t", str(TIMEOUT), "start")
        # pg_ctl -w waited until the server took connections on its socket; this asks on TCP,
        # where the tests connect (both bounded by TIMEOUT).
        self._run("pg_isready", "-h", "127.0.0.1", "-p", str(self.port), "-t", str(TIMEOUT))

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "-t", str(TIMEOUT), "stop")

    def running(self) -> bool:
        return (self.datadir / "postmaster.pid").exists()

    def create_database(self, name: str) -> str:
        """A new, empty database; its URL."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"not a plain database name: {name!r}")
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, name)
        return self.url_for(name)


def unavailable(reason: str) -> NoReturn:
    """Skip, or under CI fail: CI must have PostgreSQL (`.ci/run` installs it)."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must install PostgreSQL (.ci/run: apt-get install postgresql)", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Start a cluster with the database DATABASE; stop it and remove its files afterwards."""
    bindir = find_bindir()
    if bindir is None:
        unavailable("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    run_as: str | None = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError:
            unavailable("running as root, and there is no `postgres` user to run PostgreSQL as")
        run_as = SUPERUSER
    root = Path(tempfile.mkdtemp(prefix="portcullis-pg-"))
    try:
        if run_as is not None:
            entry = pwd.getpwnam(run_as)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        os.chmod(root, 0o700)
        server = PostgresServer(bindir, root, free_port(), run_as)
        server.initdb()
        try:
            for attempt in range(3):
                try:
                    server.start()
                    break
                except RuntimeError:
                    # Most likely the free port was taken meanwhile: another one, a bounded number of times.
                    if attempt == 2 or server.running():
                        raise
                    server.port = free_port()
            server.create_database(DATABASE)
            yield server
        finally:
            if server.running():
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
