"""The compiled gateway configuration: what one gateway process needs, and no secrets.

`compile()` produces it from the custom resources; the operator stores it in a
ConfigMap and `portcullis serve` builds it in memory. The gateway reads nothing
else about the world, so a manifest behaves the same on a laptop and in a cluster.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from portcullis.api.resources import ApprovalSpec, ArgumentRuleSpec, CredentialSpec, Model, RateLimitSpec, SecretKeyReference

CONFIG_VERSION: Literal[1] = 1


class ServerInfo(Model):
    name: str
    namespace: str
    url: str = Field(description="The public MCP URL; session tokens carry it as their audience.")
    issuer: str = Field(description="`iss` of the session tokens this server mints.")
    callback_url: str | None = Field(
        default=None, description="Where browsers return from an OAuth connect flow (the redirect_uri); None: not set."
    )


class OIDCConfig(Model):
    """`spec.auth.oidc`, with the audience resolved (default: the server's public URL)."""

    issuer: str
    audience: str
    user_claim: str = "sub"
    required_scopes: tuple[str, ...] = ()
    required_group: str | None = None
    groups_claim: str = "groups"
    clock_skew_seconds: int = 60
    introspection_client_id: str | None = None
    introspection_secret: SecretKeyReference | None = Field(default=None, description="The Secret holding the introspecting client's secret.")


class TokenPolicy(Model):
    default_ttl_seconds: int = 900
    max_ttl_seconds: int = 3600


class AuditConfig(Model):
    retention_days: int = 90
    store: Literal["sqlite", "postgres", "none"] = "sqlite"
    postgres_url: SecretKeyReference | None = Field(
        default=None, description="Secret (in the server's namespace) holding the PostgreSQL URL; never the URL itself."
    )
    on_store_failure: Literal["refuse", "allow"] = "refuse"
    queue_size: int = 10_000


class ConnectionConfig(Model):
    name: str
    url: str
    timeout_seconds: int = 30
    max_duration_seconds: int = Field(default=3600, description="Longest one request may take, progress or not (maxDurationSeconds).")
    credential: CredentialSpec = Field(default_factory=CredentialSpec)
    max_result_bytes: int = Field(default=16 * 1024 * 1024, description="Largest answer read for one request (maxResultBytes).")
    max_connections: int = Field(default=100, description="Most requests in flight to the upstream at once (maxConnections).")


class ExposedTool(Model):
    """One allowlisted tool: `name` is what agents see, `upstream_name` what the upstream calls it."""

    name: str
    connection: str
    upstream_name: str
    description: str | None = None
    mapping: str
    read_only: bool | None = Field(default=None, description="The mapping's readOnly; None: the upstream's readOnlyHint decides.")
    rules: tuple[ArgumentRuleSpec, ...] = ()
    limits: tuple[RateLimitSpec, ...] = ()
    approval: ApprovalSpec | None = None


class LimitsConfig(Model):
    per_user: tuple[RateLimitSpec, ...] = ()
    store: Literal["replica", "postgres"] = "replica"
    postgres_url: SecretKeyReference | None = None


class ExposedPrompt(Model):
    name: str
    connection: str
    upstream_name: str
    mapping: str


class ExposedResource(Model):
    uri: str
    connection: str
    mapping: str


class ExposedResourceTemplate(Model):
    """An upstream resource template: listed as is, and the URIs it matches may be read."""

    uri_template: str
    connection: str
    mapping: str


class GatewayConfig(Model):
    """Everything a gateway serves. Lists are sorted so equal inputs give equal bytes."""

    version: Literal[1] = 1
    server: ServerInfo
    tenant: str = Field(description="The tenant is the server's namespace.")
    vault_namespace: str
    vault_key_secret: str = "portcullis-tenant-key"
    tokens: TokenPolicy = Field(default_factory=TokenPolicy)
    oidc: OIDCConfig | None = Field(default=None, description="Accept OpenID Connect access tokens (spec.auth.oidc).")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    connections: dict[str, ConnectionConfig] = Field(default_factory=dict)
    tools: tuple[ExposedTool, ...] = ()
    prompts: tuple[ExposedPrompt, ...] = ()
    resources: tuple[ExposedResource, ...] = ()
    resource_templates: tuple[ExposedResourceTemplate, ...] = ()

    def user_connections(self) -> list[str]:
        """Connections whose tools are exposed and that need the calling user's own credential."""
        used = (
            {t.connection for t in self.tools}
            | {p.connection for p in self.prompts}
            | {r.connection for r in self.resources}
            | {r.connection for r in self.resource_templates}
        )
        return sorted(c for c in used if self.connections[c].credential.per_user)
