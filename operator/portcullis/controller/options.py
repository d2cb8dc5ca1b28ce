"""What an operator process is configured with, and the plug point for gateway status.

kopf calls handlers by decorator, so there is no constructor to pass configuration
through; `run_operator` (and the tests) install one `Options` before kopf starts, and
handlers read it with `current()`. One process runs one operator, so one slot suffices.

Tool counts come from the gateways themselves, the only ones that know the upstream
tool lists: `GET /v1/status` on the admin port (the contract, and how it is read, is in
`gateway_report.py`). The fetch returns that body as is and is a one-method plug point,
so tests and the emulator benchmark can answer without a running gateway.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from portcullis.api.resources import VirtualMCPServer
from portcullis.render.metadata import ADMIN_PORT

# Gateway defaults a deployment sets through the environment (the Helm chart does, from its values).
DEFAULT_IMAGE = os.environ.get("PORTCULLIS_IMAGE", "ghcr.io/portcullis-dev/portcullis:0.1.0")
DEFAULT_KEY_ROTATION_SECONDS = float(os.environ.get("PORTCULLIS_KEY_ROTATION_SECONDS", 24 * 3600))

StatusFetcher = Callable[[VirtualMCPServer], Awaitable[dict[str, Any] | None]]


async def fetch_gateway_status(server: VirtualMCPServer) -> dict[str, Any] | None:
    """Ask the server's gateways (through its Service) for their status body; None if unreachable."""
    url = f"http://{server.metadata.name}.{server.metadata.namespace}.svc:{ADMIN_PORT}/v1/status"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
            async with session.get(url) as response:
                if response.status != 200:
                    return None
                body = await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    return body if isinstance(body, dict) else None


@dataclass(frozen=True)
class Options:
    image: str = DEFAULT_IMAGE
    # How often each server is re-read from the world: gateway tool counts, key rotation
    # schedule, and drift in children that no watch covers (cluster-scoped binding, vault Role).
    resync_seconds: float = 60.0
    key_rotation_seconds: float = DEFAULT_KEY_ROTATION_SECONDS
    fetch_status: StatusFetcher = field(default=fetch_gateway_status)
    # Where Prometheus metrics are served (all interfaces), None for nowhere. Off here,
    # so tests that run operators in one process bind no port; `run_operator` turns it on.
    metrics_port: int | None = None


_current: list[Options] = [Options()]


def current() -> Options:
    return _current[0]


def install(options: Options) -> None:
    _current[0] = options
