"""The Secret holding a server's token signing keys (`keys.json`).

The operator makes the keys and rotates them; the gateways read them. Its content is
given to the builder rather than generated here, so rendering stays pure.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from portcullis.api.resources import VirtualMCPServer
from portcullis.render.metadata import object_meta, signing_keys_name

KEYS_KEY = "keys.json"


def build_signing_key_secret(server: VirtualMCPServer, keys_json: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": object_meta(server, signing_keys_name(server)),
        "type": "Opaque",
        "data": {KEYS_KEY: base64.b64encode(keys_json.encode()).decode()},
    }


def keys_digest(keys_json: str) -> str:
    """A short, stable fingerprint of the keys: pods roll when (and only when) it changes."""
    return hashlib.sha256(keys_json.encode()).hexdigest()[:16]
