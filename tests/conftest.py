"""Suite-wide settings and fixtures: async tests run on anyio's asyncio backend, and tests that
need a real PostgreSQL (the audit store, rate limits) share one cluster per session with one
database per test."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator

import pytest

from tests.support.postgres import PostgresServer, postgres_server


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """The session's cluster (skipped without PostgreSQL binaries, a failure under CI)."""
    with postgres_server() as server:
        yield server


@pytest.fixture
def database(postgres: PostgresServer, request: pytest.FixtureRequest) -> str:
    """The URL of a new, empty database, so that no test sees another's rows or schema."""
    stem = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40]
    return postgres.create_database(f"t_{stem}_{secrets.token_hex(3)}")
