"""compile(server, mappings, connections): the custom resources in, a GatewayConfig out.

Pure: no I/O, no clock, no Kubernetes. The operator and `portcullis serve` both
call it, which is what makes a manifest behave the same on a laptop and in a
cluster.

A bad mapping does not take a server down. Each problem is reported against the
object and field that caused it, and the offending mapping is left out of the
config while every other mapping is still served. Callers that want all or
nothing (`portcullis compile`, `portcullis serve`) treat any problem as fatal.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from portcullis.api.config import (
    AuditConfig,
    ConnectionConfig,
    ExposedPrompt,
    ExposedResource,
    ExposedResourceTemplate,
    ExposedTool,
    GatewayConfig,
    LimitsConfig,
    OIDCConfig,
    ServerInfo,
    TokenPolicy,
)
from portcullis.api.resources import TOOL_NAME_RE, MCPConnection, ToolMapping, VirtualMCPServer
from portcullis.api.status import Reason
from portcullis.expressions import ArgumentRule, RuleError, compile_rule

MCP_PORT = 8080


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one object: `kind/name`, the field, and why."""

    kind: str
    name: str
    field: str
    reason: Reason
    message: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}: {self.field}: {self.message}"


@dataclass(frozen=True)
class Compilation:
    config: GatewayConfig
    problems: tuple[Problem, ...] = ()
    accepted_mappings: tuple[str, ...] = ()

    def problems_of(self, kind: str, name: str) -> list[Problem]:
        return [p for p in self.problems if p.kind == kind and p.name == name]


class CompileError(ValueError):
    def __init__(self, problems: Iterable[Problem]):
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def cluster_url(server: VirtualMCPServer) -> str:
    """The in-cluster MCP URL of a server's Service."""
    return f"http://{server.metadata.name}.{server.metadata.namespace}.svc:{MCP_PORT}/mcp"


@dataclass
class _Draft:
    tools: dict[str, ExposedTool] = field(default_factory=dict)
    prompts: dict[str, ExposedPrompt] = field(default_factory=dict)
    resources: dict[str, ExposedResource] = field(default_factory=dict)
    resource_templates: dict[str, ExposedResourceTemplate] = field(default_factory=dict)


def compile(  # noqa: A001 - the name DESIGN.md gives this function
    server: VirtualMCPServer,
    mappings: Iterable[ToolMapping],
    connections: Iterable[MCPConnection],
    *,
    url: str | None = None,
    callback_url: str | None = None,
) -> Compilation:
    """Build the config of `server` from the mappings that name it.

    Mappings of other servers or other namespaces are ignored. `url` overrides
    the server's public URL (the token audience); the default is its in-cluster
    Service URL. `callback_url` overrides where browsers return from the OAuth
    connect flow (`spec.connectedAccounts.callbackURL`; `serve` gives its own).
    """
    ns = server.metadata.namespace
    by_name = {c.metadata.name: c for c in connections if c.metadata.namespace == ns}
    mine = sorted(
        (m for m in mappings if m.metadata.namespace == ns and m.spec.server_ref.name == server.metadata.name),
        key=lambda m: m.metadata.name,
    )

    problems: list[Problem] = []
    draft = _Draft()
    accepted: list[str] = []
    used_connections: dict[str, MCPConnection] = {}
    for mapping in mine:
        mapping_problems = _check_mapping(mapping, by_name, draft)
        if mapping_problems:
            problems.extend(mapping_problems)
            continue
        _add_mapping(mapping, draft)
        accepted.append(mapping.metadata.name)
        conn_name = mapping.spec.connection_ref.name
        used_connections[conn_name] = by_name[conn_name]

    config = GatewayConfig(
        server=ServerInfo(
            name=server.metadata.name,
            namespace=ns,
            url=url or cluster_url(server),
            issuer=f"portcullis.dev/{ns}/{server.metadata.name}",
            callback_url=callback_url or (server.spec.connected_accounts.callback_url if server.spec.connected_accounts else None),
        ),
        tenant=ns,
        vault_namespace=server.vault_namespace,
        vault_key_secret=server.spec.vault.tenant_key_secret,
        oidc=_oidc(server, url or cluster_url(server)),
        limits=_limits(server),
        tokens=TokenPolicy(
            default_ttl_seconds=server.spec.session_tokens.default_ttl_seconds,
            max_ttl_seconds=server.spec.session_tokens.max_ttl_seconds,
        ),
        audit=AuditConfig(
            retention_days=server.spec.audit.retention_days,
            store=server.spec.audit.store,
            postgres_url=server.spec.audit.postgres.url_secret_ref if server.spec.audit.postgres else None,
            on_store_failure=server.spec.audit.on_store_failure,
            queue_size=server.spec.audit.queue_size,
        ),
        connections={
            name: ConnectionConfig(
                name=name,
                url=conn.spec.url,
                timeout_seconds=conn.spec.timeout_seconds,
                max_duration_seconds=conn.spec.max_duration_seconds,
                credential=conn.spec.credential,
                max_result_bytes=conn.spec.max_result_bytes,
                max_connections=conn.spec.max_connections,
            )
            for name, conn in sorted(used_connections.items())
        },
        tools=tuple(draft.tools[k] for k in sorted(draft.tools)),
        prompts=tuple(draft.prompts[k] for k in sorted(draft.prompts)),
        resources=tuple(draft.resources[k] for k in sorted(draft.resources)),
        resource_templates=tuple(draft.resource_templates[k] for k in sorted(draft.resource_templates)),
    )
    return Compilation(config=config, problems=tuple(problems), accepted_mappings=tuple(accepted))


def _limits(server: VirtualMCPServer) -> LimitsConfig:
    spec = server.spec.limits
    if spec is None:
        return LimitsConfig()
    return LimitsConfig(
        per_user=tuple(spec.per_user),
        store=spec.store,
        postgres_url=spec.postgres.url_secret_ref if spec.postgres else None,
    )


def _oidc(server: VirtualMCPServer, url: str) -> OIDCConfig | None:
    spec = server.spec.auth.oidc
    if spec is None:
        return None
    return OIDCConfig(
        issuer=spec.issuer,
        audience=spec.audience or url,
        user_claim=spec.user_claim,
        required_scopes=tuple(spec.required_scopes),
        required_group=spec.required_group,
        groups_claim=spec.groups_claim,
        clock_skew_seconds=spec.clock_skew_seconds,
        introspection_client_id=spec.introspection.client_id if spec.introspection else None,
        introspection_secret=spec.introspection.client_secret_ref if spec.introspection else None,
    )


def compile_strict(
    server: VirtualMCPServer,
    mappings: Iterable[ToolMapping],
    connections: Iterable[MCPConnection],
    *,
    url: str | None = None,
    callback_url: str | None = None,
) -> GatewayConfig:
    """Like `compile`, but any problem (including a mapping naming no known server) is an error."""
    mappings = list(mappings)
    result = compile(server, mappings, connections, url=url, callback_url=callback_url)
    if result.problems:
        raise CompileError(result.problems)
    return result.config


def orphan_mappings(servers: Iterable[VirtualMCPServer], mappings: Iterable[ToolMapping]) -> list[Problem]:
    """Mappings whose `serverRef` names no server in their namespace."""
    known = {(s.metadata.namespace, s.metadata.name) for s in servers}
    return [
        Problem(
            "ToolMapping",
            m.metadata.name,
            "spec.serverRef.name",
            Reason.SERVER_NOT_FOUND,
            f"no VirtualMCPServer {m.spec.server_ref.name!r} in namespace {m.metadata.namespace!r}",
        )
        for m in mappings
        if (m.metadata.namespace, m.spec.server_ref.name) not in known
    ]


def _check_mapping(mapping: ToolMapping, connections: dict[str, MCPConnection], draft: _Draft) -> list[Problem]:
    name = mapping.metadata.name
    spec = mapping.spec
    out: list[Problem] = []
    if spec.connection_ref.name not in connections:
        out.append(
            Problem(
                "ToolMapping",
                name,
                "spec.connectionRef.name",
                Reason.CONNECTION_NOT_FOUND,
                f"no MCPConnection {spec.connection_ref.name!r} in namespace {mapping.metadata.namespace!r}",
            )
        )
    seen_here: dict[str, int] = {}
    for index, tool in enumerate(spec.tools):
        exposed = tool.exposed_name
        where = f"spec.tools[{index}].{'as' if tool.as_ else 'name'}"
        if not TOOL_NAME_RE.match(exposed):
            out.append(
                Problem(
                    "ToolMapping",
                    name,
                    where,
                    Reason.INVALID_TOOL_NAME,
                    f"{exposed!r} is not a valid MCP tool name (1-128 of A-Z a-z 0-9 _ . -)",
                )
            )
        if exposed in seen_here:
            out.append(
                Problem(
                    "ToolMapping",
                    name,
                    where,
                    Reason.DUPLICATE_TOOL_NAME,
                    f"{exposed!r} is already exposed by spec.tools[{seen_here[exposed]}] of this mapping",
                )
            )
        elif exposed in draft.tools:
            other = draft.tools[exposed].mapping
            out.append(
                Problem(
                    "ToolMapping",
                    name,
                    where,
                    Reason.DUPLICATE_TOOL_NAME,
                    f"{exposed!r} is already exposed by ToolMapping {other!r}; give one of them another name with `as`",
                )
            )
        seen_here.setdefault(exposed, index)
        for number, rule in enumerate(tool.rules):
            try:
                compile_rule(ArgumentRule(rule.name, rule.expression, rule.message))
            except RuleError as exc:
                out.append(Problem("ToolMapping", name, f"spec.tools[{index}].rules[{number}].expression", Reason.INVALID_RULE, str(exc)))
    prompts_here: set[str] = set()
    for index, prompt in enumerate(spec.prompts):
        exposed = prompt.exposed_name
        if exposed in draft.prompts or exposed in prompts_here:
            out.append(
                Problem(
                    "ToolMapping",
                    name,
                    f"spec.prompts[{index}]",
                    Reason.DUPLICATE_TOOL_NAME,
                    f"prompt {exposed!r} is exposed twice",
                )
            )
        prompts_here.add(exposed)
    return out


def _add_mapping(mapping: ToolMapping, draft: _Draft) -> None:
    conn = mapping.spec.connection_ref.name
    mname = mapping.metadata.name
    for tool in mapping.spec.tools:
        draft.tools[tool.exposed_name] = ExposedTool(
            name=tool.exposed_name,
            connection=conn,
            upstream_name=tool.name,
            description=tool.description,
            mapping=mname,
            read_only=tool.read_only,
            rules=tuple(tool.rules),
            limits=tuple(tool.limits),
            approval=tool.approval,
        )
    for prompt in mapping.spec.prompts:
        draft.prompts[prompt.exposed_name] = ExposedPrompt(
            name=prompt.exposed_name, connection=conn, upstream_name=prompt.name, mapping=mname
        )
    for resource in mapping.spec.resources:
        draft.resources.setdefault(resource.uri, ExposedResource(uri=resource.uri, connection=conn, mapping=mname))
    for template in mapping.spec.resource_templates:
        # Like a resource exposed twice: the first mapping (by name) serves it.
        draft.resource_templates.setdefault(
            template.uri_template, ExposedResourceTemplate(uri_template=template.uri_template, connection=conn, mapping=mname)
        )
