"""The three custom resources of `portcullis.dev/v1alpha1`, as pydantic models.

These models are the single source of truth for the resources: the CRDs under
`crds/` are generated from them (`portcullis crds`), the operator parses every
`spec` into them at the edge, and `portcullis serve` loads the same YAML into
them. Field names follow Kubernetes' camelCase on the wire (aliases) and
Python's snake_case in code.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from portcullis.api.durations import parse_duration
from portcullis.api.quantities import QUANTITY_PATTERN, parse_quantity

GROUP = "portcullis.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# MCP tool names: 1-128 characters of A-Z a-z 0-9 _ . -  (MCP spec, "Tool names").
TOOL_NAME_PATTERN = r"^[A-Za-z0-9_.\-]{1,128}$"
TOOL_NAME_RE = re.compile(TOOL_NAME_PATTERN)
# RFC 1123 DNS label / subdomain, as Kubernetes names objects.
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# RFC 9110 field-name token.
HEADER_NAME_PATTERN = r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$"
DURATION_PATTERN = r"^([0-9]+(ms|s|m|h|d))+$"


class Model(BaseModel):
    """Base of every API model: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid", frozen=True)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


class WireModel(Model):
    model_config = ConfigDict(
        populate_by_name=True, extra="forbid", frozen=True, alias_generator=_camel
    )


# --- shared pieces -----------------------------------------------------------------


class ObjectMeta(Model):
    """The part of Kubernetes metadata Portcullis reads."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)

    name: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]
    namespace: str = "default"
    generation: int | None = None
    uid: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class LocalObjectReference(WireModel):
    """A reference to an object in the same namespace."""

    name: Annotated[
        str,
        Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN, description="Name of the object."),
    ]


class SecretKeyReference(WireModel):
    """One key of a Secret in the resource's own namespace."""

    name: Annotated[str, Field(min_length=1, max_length=253, description="Name of the Secret.")]
    key: Annotated[str, Field(min_length=1, max_length=253, description="Key inside the Secret's data.")]


# --- MCPConnection -----------------------------------------------------------------


class OAuthSpec(WireModel):
    """How users authorize this upstream with OAuth 2.1 (authorization code + PKCE), once each.

    The authorization server is discovered the MCP way unless named: the upstream's RFC 9728
    protected-resource metadata names it, and its RFC 8414 (or OpenID Connect) metadata names
    the endpoints. `issuer` skips the first step; `authorizationEndpoint` with `tokenEndpoint`
    skip both. The client is pre-registered (`clientId`, and `clientSecretRef` for a
    confidential one) or, without `clientId`, registered dynamically (RFC 7591) once per
    connection and kept in the vault.
    """

    issuer: Annotated[
        str | None,
        Field(max_length=2048, pattern=r"^https?://", description="The authorization server's issuer URL (default: discovered from the upstream's RFC 9728 metadata)."),
    ] = None
    authorization_endpoint: Annotated[
        str | None,
        Field(max_length=2048, pattern=r"^https?://", description="Explicit authorization endpoint; needs tokenEndpoint and clientId too."),
    ] = None
    token_endpoint: Annotated[
        str | None,
        Field(max_length=2048, pattern=r"^https?://", description="Explicit token endpoint; needs authorizationEndpoint and clientId too."),
    ] = None
    client_id: Annotated[
        str | None,
        Field(min_length=1, max_length=512, description="A pre-registered client; without it the client is registered dynamically (RFC 7591)."),
    ] = None
    client_secret_ref: Annotated[
        SecretKeyReference | None,
        Field(description="The pre-registered client's secret (a confidential client); omit for a public client."),
    ] = None
    scopes: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[!#-\[\]-~]+$")]],
        Field(max_length=64, description="Scopes to ask for (RFC 6749 scope tokens)."),
    ] = Field(default_factory=list)
    resource: Annotated[
        str | None,
        Field(max_length=2048, pattern=r"^https?://", description="The RFC 8707 resource indicator (default: the connection's url)."),
    ] = None

    @model_validator(mode="after")
    def _consistent(self) -> OAuthSpec:
        if (self.authorization_endpoint is None) != (self.token_endpoint is None):
            raise ValueError("authorizationEndpoint and tokenEndpoint go together: give both or neither")
        if self.authorization_endpoint is not None and self.client_id is None:
            raise ValueError(
                "clientId is required with explicit endpoints (dynamic registration needs the server's metadata)"
            )
        if self.client_secret_ref is not None and self.client_id is None:
            raise ValueError("clientSecretRef needs clientId (a dynamically registered client gets its own secret)")
        return self


class CredentialSpec(WireModel):
    """How a credential reaches the upstream on each call.

    `user`: the calling user's own credential from the tenant vault, stored by an administrator.
    `oauth`: the calling user's own OAuth grant, from the connect flow, refreshed when due.
    `shared`: one credential for everybody, from `secretRef`.
    `none`: the upstream needs no credential.
    """

    source: Annotated[
        Literal["user", "oauth", "shared", "none"],
        Field(
            description=(
                "Where the credential comes from: user (a per-user secret in the vault), oauth (a per-user OAuth "
                "grant from the connect flow), shared (secretRef) or none."
            )
        ),
    ] = "none"
    header: Annotated[
        str,
        Field(min_length=1, max_length=256, pattern=HEADER_NAME_PATTERN, description="HTTP header that carries the credential upstream."),
    ] = "Authorization"
    scheme: Annotated[
        str,
        Field(max_length=64, description='Prefix of the header value ("Bearer" gives "Bearer <secret>"); empty sends the secret alone.'),
    ] = "Bearer"
    secret_ref: Annotated[
        SecretKeyReference | None,
        Field(description="The shared credential; required when source is shared, forbidden otherwise."),
    ] = None
    oauth: Annotated[
        OAuthSpec | None,
        Field(description="The OAuth settings; required when source is oauth, forbidden otherwise."),
    ] = None

    @model_validator(mode="after")
    def _fields_match_source(self) -> CredentialSpec:
        if self.source == "shared" and self.secret_ref is None:
            raise ValueError("secretRef is required when source is shared")
        if self.source != "shared" and self.secret_ref is not None:
            raise ValueError("secretRef is only allowed when source is shared")
        if self.source == "oauth" and self.oauth is None:
            raise ValueError("oauth is required when source is oauth")
        if self.source != "oauth" and self.oauth is not None:
            raise ValueError("oauth is only allowed when source is oauth")
        return self

    @property
    def per_user(self) -> bool:
        """Does each calling user bring their own credential (a vault entry)?"""
        return self.source in ("user", "oauth")

    def header_value(self, secret: str) -> str:
        return f"{self.scheme} {secret}" if self.scheme else secret


class MCPConnectionSpec(WireModel):
    """One upstream MCP server, configured once and reused by many virtual servers."""

    url: Annotated[
        str,
        Field(min_length=1, max_length=2048, pattern=r"^https?://", description="Streamable HTTP endpoint of the upstream MCP server."),
    ]
    timeout_seconds: Annotated[
        int,
        Field(
            ge=1,
            le=600,
            description=(
                "Idle timeout towards the upstream, in seconds: how long a request may go with nothing from the "
                "upstream (no answer, and on a response stream no message such as progress or a log line). Each "
                "message restarts it, so a long call that reports progress runs on, up to maxDurationSeconds."
            ),
        ),
    ] = 30
    max_duration_seconds: Annotated[
        int,
        Field(
            ge=1,
            le=86400,
            description=(
                "Longest one request to the upstream may take, in seconds, however much progress it reports. "
                "A call still running then is cancelled and fails with a tool error naming this limit. Default 1 hour."
            ),
        ),
    ] = 3600
    credential: Annotated[
        CredentialSpec, Field(description="How the calling user's credential reaches the upstream.")
    ] = Field(default_factory=CredentialSpec)
    max_result_bytes: Annotated[
        int,
        Field(
            ge=1024,
            le=1073741824,
            description=(
                "Largest answer the gateway reads from this upstream for one request, in bytes (the whole HTTP "
                "body, or every event of one response stream). A larger answer is cut off while it is read and the "
                "call fails with a tool error naming this limit. 1 KiB to 1 GiB; default 16 MiB."
            ),
        ),
    ] = 16 * 1024 * 1024
    max_connections: Annotated[
        int,
        Field(
            ge=1,
            le=10000,
            description=(
                "Most requests each gateway replica has in flight to this upstream at once (one HTTP connection "
                "each; the change-notification stream is not counted). A call that finds them all busy waits up "
                "to timeoutSeconds for one, and a wait past a second is logged as a warning."
            ),
        ),
    ] = 100


class MCPConnection(Model):
    api_version: Literal["portcullis.dev/v1alpha1"] = Field("portcullis.dev/v1alpha1", alias="apiVersion")
    kind: Literal["MCPConnection"] = "MCPConnection"
    metadata: ObjectMeta
    spec: MCPConnectionSpec


# --- VirtualMCPServer -------------------------------------------------------------


class AutoscalingSpec(WireModel):
    """Horizontal autoscaling of the gateway Deployment (an HPA on CPU)."""

    min_replicas: Annotated[int, Field(ge=1, le=100, description="Lower bound of replicas.")] = 1
    max_replicas: Annotated[int, Field(ge=1, le=100, description="Upper bound of replicas.")]
    target_cpu_utilization_percentage: Annotated[
        int, Field(ge=1, le=100, alias="targetCPUUtilizationPercentage", description="Average CPU utilization to aim for.")
    ] = 80

    @model_validator(mode="after")
    def _bounds_ordered(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas must not exceed maxReplicas")
        return self


class SessionTokenSpec(WireModel):
    """Lifetime of the session tokens minted for this server."""

    default_ttl: Annotated[
        str, Field(alias="defaultTTL", pattern=DURATION_PATTERN, description="TTL when the minting call names none, e.g. 15m.")
    ] = "15m"
    max_ttl: Annotated[
        str, Field(alias="maxTTL", pattern=DURATION_PATTERN, description="Longest TTL a minting call may ask for, e.g. 1h.")
    ] = "1h"

    @model_validator(mode="after")
    def _default_within_max(self) -> SessionTokenSpec:
        if parse_duration(self.default_ttl) > parse_duration(self.max_ttl):
            raise ValueError("defaultTTL must not exceed maxTTL")
        return self

    @property
    def default_ttl_seconds(self) -> int:
        return parse_duration(self.default_ttl)

    @property
    def max_ttl_seconds(self) -> int:
        return parse_duration(self.max_ttl)


class VaultSpec(WireModel):
    """Where this tenant's credential Secrets live."""

    namespace: Annotated[
        str | None,
        Field(max_length=63, pattern=DNS_LABEL_PATTERN, description="Vault namespace; defaults to the server's own namespace."),
    ] = None
    tenant_key_secret: Annotated[
        str,
        Field(
            min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN,
            description=(
                "Name of the Secret (in the vault namespace) holding the tenant's sealing key, so RBAC can grant "
                "the credential Secrets and the key apart (resourceNames). Created on the first stored credential."
            ),
        ),
    ] = "portcullis-tenant-key"

    @model_validator(mode="after")
    def _key_apart_from_credentials(self) -> VaultSpec:
        if self.tenant_key_secret.startswith("portcullis-cred-"):
            raise ValueError("tenantKeySecret must not start with portcullis-cred- (the users' credential Secrets)")
        return self


class PostgresAuditSpec(WireModel):
    """A PostgreSQL database for the audit events of this server (many servers may share one)."""

    url_secret_ref: Annotated[
        SecretKeyReference,
        Field(
            alias="urlSecretRef",
            description="Secret key holding the connection URL, e.g. postgresql://user:password@host:5432/audit.",
        ),
    ]


class AuditSpec(WireModel):
    """Where this server's audit events are kept, for how long, and what happens when they cannot be."""

    retention_days: Annotated[
        int, Field(ge=1, le=3650, description="How long audit events are kept, in days.")
    ] = 90
    store: Annotated[
        Literal["sqlite", "postgres", "none"],
        Field(
            description=(
                "Durable store besides the JSON lines on stdout: sqlite (a file per gateway process; in a cluster "
                "it lives only as long as the pod, so use it for evaluation), postgres (urlSecretRef; for production), "
                "or none (stdout only)."
            )
        ),
    ] = "sqlite"
    postgres: Annotated[
        PostgresAuditSpec | None, Field(description="The PostgreSQL store; required when store is postgres, forbidden otherwise.")
    ] = None
    on_store_failure: Annotated[
        Literal["refuse", "allow"],
        Field(
            description=(
                "When the store is unreachable and the audit queue is full: refuse (the call is not made and the "
                "agent is told why) or allow (the call is served and counted as unaudited)."
            )
        ),
    ] = "refuse"
    queue_size: Annotated[
        int, Field(ge=100, le=1_000_000, description="Events held in memory while the store is slow or down.")
    ] = 10_000

    @model_validator(mode="after")
    def _postgres_matches_store(self) -> AuditSpec:
        if self.store == "postgres" and self.postgres is None:
            raise ValueError("postgres.urlSecretRef is required when store is postgres")
        if self.store != "postgres" and self.postgres is not None:
            raise ValueError("postgres is only allowed when store is postgres")
        return self


Quantity = Annotated[str, Field(max_length=64, pattern=QUANTITY_PATTERN)]


class ResourceRequirementsSpec(WireModel):
    """Requests and limits of the gateway container, as in a Pod's `resources`: resource name
    (cpu, memory, ephemeral-storage, ...) to a quantity string (cpu: "500m", memory: 256Mi)."""

    requests: Annotated[
        dict[str, Quantity] | None,
        Field(description="What the scheduler reserves for each gateway pod, e.g. {cpu: 100m, memory: 128Mi}."),
    ] = None
    limits: Annotated[
        dict[str, Quantity] | None,
        Field(description='The most each gateway pod may use, e.g. {cpu: "1", memory: 512Mi}; no request may exceed its limit.'),
    ] = None

    @model_validator(mode="after")
    def _requests_within_limits(self) -> ResourceRequirementsSpec:
        # The API server refuses such a pod template; say so at the spec instead of at the Deployment.
        requests = self.requests or {}
        for name, limit in sorted((self.limits or {}).items()):
            request = requests.get(name)
            if request is not None and parse_quantity(request) > parse_quantity(limit):
                raise ValueError(f"requests.{name} ({request}) must not exceed limits.{name} ({limit})")
        return self

    def as_container_resources(self) -> dict[str, dict[str, str]]:
        """The `resources` of a container: only the maps that are set."""
        return {key: dict(value) for key, value in (("requests", self.requests), ("limits", self.limits)) if value is not None}


class ConnectedAccountsSpec(WireModel):
    """Where users' browsers come back to after they authorize an OAuth connection."""

    callback_url: Annotated[
        str,
        Field(
            alias="callbackURL",
            min_length=1,
            max_length=2048,
            pattern=r"^https?://[^/?#]+/[^?#]*$",
            description=(
                "The public URL of the gateway's connect port (8083, path /oauth/callback), as users' browsers "
                "reach it through an Ingress or load balancer, e.g. https://agents.acme.example/oauth/callback. "
                "It is the OAuth redirect_uri, so register it with pre-registered clients."
            ),
        ),
    ]


class IntrospectionSpec(WireModel):
    """The client the gateway authenticates as at the provider's introspection endpoint (RFC 7662)."""

    client_id: Annotated[str, Field(min_length=1, max_length=512, description="The introspecting client's id.")]
    client_secret_ref: Annotated[SecretKeyReference, Field(description="Its secret (sent with client_secret_basic).")]


class OIDCAuthSpec(WireModel):
    """People sign in with the company's OpenID Connect provider; their access tokens are accepted
    beside minted session tokens (the MCP authorization spec's resource server role)."""

    issuer: Annotated[
        str,
        Field(min_length=1, max_length=2048, pattern=r"^https?://[^?#]+$", description="The provider's issuer URL, exactly as in its tokens' iss."),
    ]
    audience: Annotated[
        str | None,
        Field(max_length=2048, description="The aud tokens must carry (default: this server's MCP URL, per RFC 8707)."),
    ] = None
    user_claim: Annotated[
        str,
        Field(min_length=1, max_length=128, description="The claim naming the user: the vault's user id (e.g. sub, email, preferred_username)."),
    ] = "sub"
    required_scopes: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[!#-\[\]-~]+$")]],
        Field(max_length=32, description="Scopes every token must carry; listed in the RFC 9728 metadata."),
    ] = Field(default_factory=list)
    required_group: Annotated[
        str | None,
        Field(min_length=1, max_length=256, description="A group the user must be in (a value of groupsClaim)."),
    ] = None
    groups_claim: Annotated[
        str, Field(min_length=1, max_length=128, description="The claim listing the user's groups.")
    ] = "groups"
    clock_skew_seconds: Annotated[
        int, Field(ge=0, le=300, description="Leeway for exp, nbf and iat.")
    ] = 60
    introspection: Annotated[
        IntrospectionSpec | None,
        Field(description="Validate opaque (non-JWT) access tokens at the provider's RFC 7662 introspection endpoint."),
    ] = None


class ServerAuthSpec(WireModel):
    """How people and agents authenticate to this server, besides minted session tokens."""

    oidc: Annotated[OIDCAuthSpec | None, Field(description="Accept the company OpenID Connect provider's access tokens.")] = None


class LimitsSpec(WireModel):
    """Per-user limits on all of this server's tool calls together, and where counts are kept."""

    per_user: Annotated[
        list[RateLimitSpec], Field(max_length=4, description="Limits on each user's calls of any tool of this server.")
    ] = Field(default_factory=list)
    store: Annotated[
        Literal["replica", "postgres"],
        Field(description="replica: each gateway counts alone (N replicas allow up to N times a limit); postgres: shared, exact."),
    ] = "replica"
    postgres: Annotated[
        PostgresAuditSpec | None, Field(description="The database for store: postgres (may be the audit one).")
    ] = None

    @model_validator(mode="after")
    def _postgres_matches_store(self) -> LimitsSpec:
        if (self.store == "postgres") != (self.postgres is not None):
            raise ValueError("postgres is required when store is postgres, and only allowed then")
        return self


class VirtualMCPServerSpec(WireModel):
    """One agent role: a scoped MCP endpoint."""

    replicas: Annotated[
        int, Field(ge=0, le=100, description="Gateway replicas when autoscaling is not set.")
    ] = 1
    autoscaling: Annotated[
        AutoscalingSpec | None, Field(description="Run an HPA instead of a fixed replica count.")
    ] = None
    session_tokens: Annotated[SessionTokenSpec, Field(description="Session token lifetimes.")] = Field(
        default_factory=SessionTokenSpec
    )
    vault: Annotated[VaultSpec, Field(description="Where user credentials live.")] = Field(
        default_factory=VaultSpec
    )
    audit: Annotated[AuditSpec, Field(description="Audit store, retention and failure policy.")] = Field(default_factory=AuditSpec)
    limits: Annotated[
        LimitsSpec | None, Field(description="Rate limits and quotas per user; ToolMappings add per-tool ones.")
    ] = None
    auth: Annotated[
        ServerAuthSpec,
        Field(description="Interactive clients: people sign in with OpenID Connect (session tokens keep working)."),
    ] = Field(default_factory=ServerAuthSpec)
    connected_accounts: Annotated[
        ConnectedAccountsSpec | None,
        Field(description="The OAuth connect flow (connections with credential.source oauth): where browsers return."),
    ] = None
    image: Annotated[
        str | None, Field(max_length=512, description="Gateway image; defaults to the operator's own.")
    ] = None
    resources: Annotated[
        ResourceRequirementsSpec | None,
        Field(
            description=(
                "Requests and limits of each gateway pod: resource name (cpu, memory, ...) to a quantity, written "
                'as a string (quote whole numbers: cpu: "1"). When set, they replace the operator\'s default (the '
                "chart's gateway.resources) as a whole; absent, the default applies."
            )
        ),
    ] = None


class VirtualMCPServer(Model):
    api_version: Literal["portcullis.dev/v1alpha1"] = Field("portcullis.dev/v1alpha1", alias="apiVersion")
    kind: Literal["VirtualMCPServer"] = "VirtualMCPServer"
    metadata: ObjectMeta
    spec: VirtualMCPServerSpec = Field(default_factory=VirtualMCPServerSpec)

    @property
    def vault_namespace(self) -> str:
        return self.spec.vault.namespace or self.metadata.namespace


# --- ToolMapping ------------------------------------------------------------------


RULE_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class ArgumentRuleSpec(WireModel):
    """A CEL expression over the call's `args` and the caller's `token` that must be true."""

    name: Annotated[str, Field(min_length=1, max_length=63, pattern=RULE_NAME_PATTERN, description="Named in denials and in the audit log.")]
    expression: Annotated[
        str, Field(min_length=1, max_length=4096, description='CEL, e.g. args.to.all(a, a.endsWith("@acme.example")).')
    ]
    message: Annotated[
        str | None, Field(max_length=512, description="What a denied agent is told (never the argument values).")
    ] = None


class RateLimitSpec(WireModel):
    """At most `calls` per `per`, counted per user (fixed windows aligned to the clock)."""

    calls: Annotated[int, Field(ge=1, le=10_000_000, description="Calls allowed in each window.")]
    per: Annotated[Literal["minute", "hour", "day"], Field(description="The window.")]


class ApprovalSpec(WireModel):
    """Each call needs a person's approval of its exact arguments (admin API: /v1/approvals)."""

    expires_seconds: Annotated[
        int, Field(ge=60, le=7 * 86_400, description="How long a request for approval, and an approval, stay valid.")
    ] = 3600
    wait_seconds: Annotated[
        int,
        Field(ge=0, le=600, description="How long a call waits for the decision before answering 'pending approval' (0: at once)."),
    ] = 0
    webhook: Annotated[
        str | None,
        Field(
            max_length=2048,
            pattern=r"^https?://",
            description="Told of each new request for approval (a JSON POST: id, server, user, tool, expiresAt; no arguments).",
        ),
    ] = None


class ToolSelector(WireModel):
    """One upstream tool to expose."""

    name: Annotated[str, Field(min_length=1, max_length=128, description="The tool's name on the upstream.")]
    as_: Annotated[
        str | None,
        Field(alias="as", min_length=1, max_length=128, description="Name to expose it under; defaults to name."),
    ] = None
    description: Annotated[
        str | None, Field(max_length=8192, description="Replaces the upstream's description.")
    ] = None
    read_only: Annotated[
        bool | None,
        Field(description="Whether read-only session tokens may see and call it (default: the upstream's readOnlyHint)."),
    ] = None
    rules: Annotated[
        list[ArgumentRuleSpec],
        Field(max_length=16, description="Argument rules, all of which must hold before the call is forwarded."),
    ] = Field(default_factory=list)
    limits: Annotated[
        list[RateLimitSpec], Field(max_length=4, description="Per-user limits on calls of this tool.")
    ] = Field(default_factory=list)
    approval: Annotated[
        ApprovalSpec | None, Field(description="Require a person's approval of each call's exact arguments.")
    ] = None

    @model_validator(mode="after")
    def _unique_rule_names(self) -> ToolSelector:
        names = [r.name for r in self.rules]
        if len(names) != len(set(names)):
            raise ValueError("rule names must be unique within a tool")
        return self

    @property
    def exposed_name(self) -> str:
        return self.as_ or self.name


class PromptSelector(WireModel):
    name: Annotated[str, Field(min_length=1, max_length=128, description="The prompt's name on the upstream.")]
    as_: Annotated[
        str | None, Field(alias="as", min_length=1, max_length=128, description="Name to expose it under.")
    ] = None

    @property
    def exposed_name(self) -> str:
        return self.as_ or self.name


class ResourceSelector(WireModel):
    uri: Annotated[str, Field(min_length=1, max_length=2048, description="Exact URI of an upstream resource to expose.")]


# Balanced, unnested `{...}` expressions: what an RFC 6570 template looks like, checked by the API server too.
URI_TEMPLATE_PATTERN = r"^[^{}]*(\{[^{}]+\}[^{}]*)*$"


class ResourceTemplateSelector(WireModel):
    uri_template: Annotated[
        str,
        Field(
            min_length=1,
            max_length=2048,
            pattern=URI_TEMPLATE_PATTERN,
            description="An upstream resource template, exactly as the upstream lists it; resources/read of a URI it matches is allowed.",
        ),
    ]


class ToolMappingSpec(WireModel):
    """Which tools (and prompts, resources) of one connection one server may expose."""

    server_ref: Annotated[LocalObjectReference, Field(description="The VirtualMCPServer this mapping feeds.")]
    connection_ref: Annotated[LocalObjectReference, Field(description="The MCPConnection whose tools are mapped.")]
    tools: Annotated[
        list[ToolSelector], Field(max_length=1024, description="Tools to expose; anything not listed is denied.")
    ] = Field(default_factory=list)
    prompts: Annotated[
        list[PromptSelector], Field(max_length=1024, description="Prompts to expose; deny by default.")
    ] = Field(default_factory=list)
    resources: Annotated[
        list[ResourceSelector], Field(max_length=1024, description="Resources to expose; deny by default.")
    ] = Field(default_factory=list)
    resource_templates: Annotated[
        list[ResourceTemplateSelector],
        Field(max_length=1024, description="Resource templates to expose; deny by default."),
    ] = Field(default_factory=list)

    @field_validator("tools")
    @classmethod
    def _no_duplicate_upstream_names(cls, tools: list[ToolSelector]) -> list[ToolSelector]:
        # Exposed-name collisions are reported by compile(), which sees every mapping;
        # here we only keep a mapping from listing the same upstream tool twice.
        seen: set[tuple[str, str]] = set()
        for tool in tools:
            key = (tool.name, tool.exposed_name)
            if key in seen:
                raise ValueError(f"tool {tool.name!r} is listed twice")
            seen.add(key)
        return tools


class ToolMapping(Model):
    api_version: Literal["portcullis.dev/v1alpha1"] = Field("portcullis.dev/v1alpha1", alias="apiVersion")
    kind: Literal["ToolMapping"] = "ToolMapping"
    metadata: ObjectMeta
    spec: ToolMappingSpec


Resource = MCPConnection | VirtualMCPServer | ToolMapping

KINDS: dict[str, type[MCPConnection] | type[VirtualMCPServer] | type[ToolMapping]] = {
    "MCPConnection": MCPConnection,
    "VirtualMCPServer": VirtualMCPServer,
    "ToolMapping": ToolMapping,
}


def parse_resource(doc: dict[str, Any]) -> Resource:
    """Parse one Kubernetes-style document into its model (raises pydantic.ValidationError)."""
    kind = doc.get("kind")
    model = KINDS.get(str(kind))
    if model is None:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    return model.model_validate(doc)
