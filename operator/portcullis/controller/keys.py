"""The signing-key Secret's lifecycle: made once, rotated on a schedule or on request.

Rotation adds a new active key and keeps the retired ones until every token they
signed has expired (`maxTTL` after retirement), then prunes them; gateways verify with
any key in the set, so no valid token stops working because of a rotation.

When it last rotated is recorded on the Secret itself (`portcullis.dev/rotated-at`), and
so is the last `portcullis.dev/rotate-keys` request honoured, so an operator restart
neither forgets the schedule nor rotates twice for one request.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from portcullis.gateway.identity.tokens import SigningKeys
from portcullis.render.secret import KEYS_KEY

ROTATE_REQUEST_ANNOTATION = "portcullis.dev/rotate-keys"
ROTATED_AT_ANNOTATION = "portcullis.dev/rotated-at"
HONOURED_REQUEST_ANNOTATION = "portcullis.dev/rotate-keys-honoured"


@dataclass(frozen=True)
class KeyDecision:
    keys_json: str
    annotations: dict[str, str]
    changed: bool
    reason: str = ""


def read_keys(secret: dict[str, Any] | None) -> str | None:
    if secret is None:
        return None
    encoded = (secret.get("data") or {}).get(KEYS_KEY)
    if not encoded:
        return None
    return base64.b64decode(encoded).decode()


def decide_keys(
    secret: dict[str, Any] | None,
    *,
    server_annotations: dict[str, str],
    now: datetime,
    rotation_seconds: float,
    keep_seconds: int,
) -> KeyDecision:
    """What the Secret's keys should be now, and whether that is a change."""
    stamp = now.astimezone(UTC).isoformat()
    existing = read_keys(secret)
    request = server_annotations.get(ROTATE_REQUEST_ANNOTATION)
    if existing is None:
        annotations = {ROTATED_AT_ANNOTATION: stamp}
        if request is not None:
            annotations[HONOURED_REQUEST_ANNOTATION] = request
        return KeyDecision(SigningKeys.generate(int(now.timestamp())).to_json(), annotations, True, "created")

    assert secret is not None
    current = dict((secret.get("metadata") or {}).get("annotations") or {})
    rotated_at = _parse_time(current.get(ROTATED_AT_ANNOTATION))
    requested = request is not None and request != current.get(HONOURED_REQUEST_ANNOTATION)
    due = rotated_at is None or (now - rotated_at).total_seconds() >= rotation_seconds
    if not (requested or due):
        return KeyDecision(existing, {}, False)

    epoch = int(now.timestamp())
    keys = SigningKeys.from_json(existing).rotate(epoch).prune(epoch, keep_seconds)
    annotations = {ROTATED_AT_ANNOTATION: stamp}
    if request is not None:
        annotations[HONOURED_REQUEST_ANNOTATION] = request
    return KeyDecision(keys.to_json(), annotations, True, "requested" if requested else "scheduled")


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
