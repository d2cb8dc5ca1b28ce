"""A gateway on a laptop: everything a cluster would hold, kept under one state directory.

    <state>/admin-secret                       the admin API's client secret (0600)
    <state>/keys/<namespace>/<server>.json     session-token signing keys (0600)
    <state>/vault/<tenant>/...                 sealed user credentials (see vault.local)
    <state>/revocations/<namespace>/<server>.json
    <state>/servers/<namespace>/<server>.json  what each server served here needs (for `credentials set`)
    <state>/audit/audit.db                     the embedded audit store (SQLite, 0600)
    <state>/audit/keys/<tenant>.key            the tenant's audit key (digests, hash chain; 0600)

Several processes share it safely (the CLI minting or revoking while `serve`
runs), which is also what makes two local replicas behave like two pods.
"""

from __future__ import annotations

import json
import os
import secrets as _secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portcullis.api.config import GatewayConfig
from portcullis.api.resources import SecretKeyReference
from portcullis.gateway import tracing
from portcullis.gateway.identity.admission import SecretAdminAuth
from portcullis.gateway.audit import AuditSink
from portcullis.gateway.audit.keys import LocalAuditKeys
from portcullis.gateway.audit.trail import AuditTrail, store_for
from portcullis.gateway.core import Gateway
from portcullis.gateway.identity.revocation import FileRevocations
from portcullis.gateway.identity.tokens import LocalKeyStore, SigningKeys, TokenVerifier
from portcullis.vault.local import LocalVault, make_private_dir, write_private_file

ADMIN_SECRET_ENV = "PORTCULLIS_ADMIN_SECRET"
STATE_DIR_ENV = "PORTCULLIS_STATE_DIR"


def default_state_dir() -> Path:
    env = os.environ.get(STATE_DIR_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "portcullis"


def existing_admin_secret(state_dir: Path) -> str | None:
    """The admin secret a client should present, without making one (a client never creates it)."""
    env = os.environ.get(ADMIN_SECRET_ENV)
    if env:
        return env
    try:
        return (state_dir / "admin-secret").read_text().strip() or None
    except FileNotFoundError:
        return None


def admin_secret(state_dir: Path) -> str:
    """The local admin client secret: $PORTCULLIS_ADMIN_SECRET, else a file made on first use."""
    env = os.environ.get(ADMIN_SECRET_ENV)
    if env:
        return env
    path = state_dir / "admin-secret"
    if path.exists():
        return path.read_text().strip()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = _secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race; use its secret
        return path.read_text().strip()
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    return value


@dataclass
class LocalState:
    state_dir: Path

    @property
    def vault(self) -> LocalVault:
        return LocalVault(self.state_dir)

    def keys(self, config: GatewayConfig) -> SigningKeys:
        return LocalKeyStore(self.state_dir).load_or_create(config.server.namespace, config.server.name)

    def revocations(self, config: GatewayConfig) -> FileRevocations:
        return FileRevocations(
            self.state_dir / "revocations" / config.server.namespace / f"{config.server.name}.json"
        )

    @property
    def audit_db(self) -> Path:
        return self.state_dir / "audit" / "audit.db"

    @property
    def audit_keys(self) -> LocalAuditKeys:
        return LocalAuditKeys(self.state_dir)

    def record_server(self, config: GatewayConfig) -> None:
        """Note which per-user connections this server takes, so `credentials set` can refuse others."""
        path = self.state_dir / "servers" / config.server.namespace / f"{config.server.name}.json"
        make_private_dir(path.parent.parent)
        make_private_dir(path.parent)
        document = {
            "tenant": config.tenant,
            "userConnections": config.user_connections(),
            # Connected with the OAuth connect flow, never with `credentials set`.
            "oauthConnections": [c for c in config.user_connections() if config.connections[c].credential.source == "oauth"],
        }
        write_private_file(path, (json.dumps(document, indent=2) + "\n").encode())

    def _servers_of(self, tenant: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """("namespace/name", what was recorded) of each server of `tenant` that ran here."""
        for path in sorted((self.state_dir / "servers").glob("*/*.json")):
            try:
                document = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(document, dict) and document.get("tenant") == tenant:
                yield f"{path.parent.name}/{path.stem}", document

    def user_connections(self, tenant: str) -> dict[str, list[str]] | None:
        """Per server of `tenant` served here: its per-user connections (None: no server of it ever ran here)."""
        found = {name: [str(c) for c in doc.get("userConnections") or []] for name, doc in self._servers_of(tenant)}
        return found or None

    def oauth_connections(self, tenant: str) -> set[str]:
        """Connections of `tenant`'s servers served here whose users connect with OAuth."""
        return {str(c) for _, doc in self._servers_of(tenant) for c in doc.get("oauthConnections") or []}

    def admin_auth(self) -> SecretAdminAuth:
        return SecretAdminAuth(admin_secret(self.state_dir))


def build_local_gateway(
    config: GatewayConfig,
    state: LocalState,
    *,
    audit: Sequence[AuditSink],
    secrets: dict[tuple[str, str], dict[str, str]] | None = None,
) -> tuple[Gateway, SigningKeys]:
    tracing.configure_from_env()
    keys = state.keys(config)
    state.record_server(config)
    shared = secrets or {}
    ref = config.audit.postgres_url
    trail = AuditTrail(
        server=f"{config.server.namespace}/{config.server.name}",
        tenant=config.tenant,
        keys=state.audit_keys,
        sinks=audit,
        store=store_for(
            config.audit.store,
            sqlite_path=state.audit_db,
            postgres_url=shared.get((config.server.namespace, ref.name), {}).get(ref.key) if ref else None,
        ),
        on_store_failure=config.audit.on_store_failure,
        retention_days=config.audit.retention_days,
        capacity=config.audit.queue_size,
    )

    async def resolve(namespace: str, ref: SecretKeyReference) -> str | None:
        return shared.get((namespace, ref.name), {}).get(ref.key)

    gateway = Gateway(
        config,
        verifier=TokenVerifier(lambda: keys, issuer=config.server.issuer, audience=config.server.url),
        vault=state.vault,
        revocations=state.revocations(config),
        audit=trail,
        secrets=resolve,
    )
    return gateway, keys
