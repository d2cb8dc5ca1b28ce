"""What an operator process is configured with, and the plug point for gateway status.

kopf calls handlers by decorator, so there is no constructor to pass configuration
through; `run_operator` (and the tests) install one `Options` before kopf starts, and
handlers read it with `current()`. One process runs one operator, so one slot suffices.

The gateway pods' defaults (image, pull policy, pull secrets, resources) and the key rotation
schedule come from the environment, which the Helm chart sets from its values; they are read
once, when the operator starts (`from_environment`), and a malformed one stops it there with
the variable and the chart value named, before kopf runs a single handler.

Tool counts come from the gateways themselves, the only ones that know the upstream
tool lists: `GET /v1/status` on the admin port (the contract, and how it is read, is in
`gateway_report.py`). The fetch returns that body as is and is a one-method plug point,
so tests and the emulator benchmark can answer without a running gateway.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from pydantic import ValidationError

from portcullis import __version__
from portcullis.api.resources import DNS_SUBDOMAIN_PATTERN, ResourceRequirementsSpec, VirtualMCPServer
from portcullis.render.deployment import PULL_POLICIES, GatewayPod
from portcullis.render.metadata import ADMIN_PORT

# Where the release workflow publishes (ghcr.io/<owner>/portcullis) and the chart's default
# image.repository; used when the environment names no image (outside the chart).
DEFAULT_IMAGE = f"ghcr.io/portcullis/portcullis:{__version__}"
DEFAULT_KEY_ROTATION_SECONDS = 24 * 3600.0

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
    # What every gateway pod gets unless its server says otherwise (spec.image, spec.resources).
    gateway: GatewayPod = field(default_factory=lambda: GatewayPod(image=DEFAULT_IMAGE))
    # How often each server is re-read from the world: gateway tool counts, key rotation
    # schedule, and drift in children that no watch covers (cluster-scoped binding, vault Role).
    resync_seconds: float = 60.0
    key_rotation_seconds: float = DEFAULT_KEY_ROTATION_SECONDS
    fetch_status: StatusFetcher = field(default=fetch_gateway_status)
    # Where Prometheus metrics are served (all interfaces), None for nowhere. Off here,
    # so tests that run operators in one process bind no port; `run_operator` turns it on.
    metrics_port: int | None = None


_current: list[Options] = [Options()]


# --- the environment ------------------------------------------------------------------------


class ConfigurationError(ValueError):
    """A setting in the operator's environment that cannot be used; the message names it."""


# Each variable the operator reads, and the chart value that sets it (templates/deployment.yaml).
ENVIRONMENT: dict[str, str] = {
    "PORTCULLIS_IMAGE": "gatewayImage (empty: image.repository and image.tag)",
    "PORTCULLIS_GATEWAY_PULL_POLICY": "gateway.imagePullPolicy (empty: image.pullPolicy)",
    "PORTCULLIS_GATEWAY_PULL_SECRETS": "imagePullSecrets",
    "PORTCULLIS_GATEWAY_RESOURCES": "gateway.resources",
    "PORTCULLIS_KEY_ROTATION_SECONDS": "gatewayKeyRotationSeconds",
}
_SECRET_NAME = re.compile(DNS_SUBDOMAIN_PATTERN)


def _refuse(variable: str, value: str, why: str) -> ConfigurationError:
    return ConfigurationError(
        f"environment variable {variable}={value!r} is malformed: {why} (the Helm chart sets it from {ENVIRONMENT[variable]})"
    )


def _image(value: str) -> str:
    if len(value) > 512 or any(c.isspace() for c in value):
        raise _refuse("PORTCULLIS_IMAGE", value, "an image reference has no spaces and at most 512 characters")
    return value


def _pull_policy(value: str) -> str:
    if value not in PULL_POLICIES:
        raise _refuse("PORTCULLIS_GATEWAY_PULL_POLICY", value, f"use one of {', '.join(PULL_POLICIES)}")
    return value


def _pull_secrets(value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    for name in names:
        if len(name) > 253 or not _SECRET_NAME.match(name):
            raise _refuse("PORTCULLIS_GATEWAY_PULL_SECRETS", value, f"{name!r} is not a Secret name (comma-separated names)")
    return names


def _resources(value: str) -> dict[str, dict[str, str]]:
    variable = "PORTCULLIS_GATEWAY_RESOURCES"
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise _refuse(variable, value, f"not JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise _refuse(variable, value, 'want a JSON object like {"requests": {"cpu": "100m"}, "limits": {"memory": "512Mi"}}')
    # Helm's toJson writes `cpu: 1` or `cpu: 0.5` from the values as numbers: read them as quantities.
    for amounts in parsed.values():
        if isinstance(amounts, dict):
            for name, amount in amounts.items():
                if isinstance(amount, int | float) and not isinstance(amount, bool):
                    amounts[name] = str(amount)
    try:
        return ResourceRequirementsSpec.model_validate(parsed).as_container_resources()
    except ValidationError as exc:
        raise _refuse(variable, value, "; ".join(_problem(error) for error in exc.errors())) from None


def _problem(error: Any) -> str:
    """One pydantic error as a line a platform engineer reads: where, and what is wrong."""
    where = ".".join(str(part) for part in error["loc"])
    if error["type"] == "string_pattern_mismatch":
        what = f"{error['input']!r} is not a quantity (e.g. 500m, 1, 128Mi)"
    else:
        what = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {what}" if where else what


def _rotation(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise _refuse("PORTCULLIS_KEY_ROTATION_SECONDS", value, "want a positive number of seconds")
    return seconds


def from_environment(environ: Mapping[str, str], base: Options | None = None) -> Options:
    """`base` (default: the current options) with every setting the environment holds.

    An unset or empty variable keeps `base`'s value; a malformed one raises ConfigurationError.
    """
    base = base if base is not None else current()
    gateway = base.gateway
    changes: dict[str, Any] = {}

    def given(variable: str) -> str | None:
        value = environ.get(variable, "").strip()
        return value or None

    if (value := given("PORTCULLIS_IMAGE")) is not None:
        gateway = dataclasses.replace(gateway, image=_image(value))
    if (value := given("PORTCULLIS_GATEWAY_PULL_POLICY")) is not None:
        gateway = dataclasses.replace(gateway, pull_policy=_pull_policy(value))
    if (value := given("PORTCULLIS_GATEWAY_PULL_SECRETS")) is not None:
        gateway = dataclasses.replace(gateway, pull_secrets=_pull_secrets(value))
    if (value := given("PORTCULLIS_GATEWAY_RESOURCES")) is not None:
        gateway = dataclasses.replace(gateway, resources=_resources(value))
    if (value := given("PORTCULLIS_KEY_ROTATION_SECONDS")) is not None:
        changes["key_rotation_seconds"] = _rotation(value)
    return dataclasses.replace(base, gateway=gateway, **changes)


def current() -> Options:
    return _current[0]


def install(options: Options) -> None:
    _current[0] = options
