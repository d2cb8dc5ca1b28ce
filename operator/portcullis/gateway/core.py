"""The gateway's core: the path of one call, independent of the wire it came in on.

    authenticate -> authorize -> resolve credential -> forward -> relay -> record

Both MCP eras, and the admin API, come through here, so the allowlist is
enforced in one place, on list and on call. Nothing a request depends on lives
only in this process: the config and tool lists are rebuilt by every replica,
credentials and revocations are read from shared storage at call time, and no
agent-facing session state is kept. A session-era agent's session lives in its
signed session id, which also carries, sealed, the upstream sessions opened for
it at `initialize` (sessions.py, upstream_sessions.py), so every replica sends
its requests on the same upstream sessions; the catalog's listings, and agents
without sessions of their own, use a session each replica opens for itself.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
from mcp.shared.uri_template import InvalidUriTemplate, UriTemplate

from portcullis.api.config import ExposedResourceTemplate, ExposedTool, GatewayConfig
from portcullis.gateway import http1, tracing
from portcullis.gateway.audit import Outcome, Reason
from portcullis.gateway.audit.metrics import set_exposure
from portcullis.gateway.audit.recorder import CallRecord, recording
from portcullis.gateway.audit.trail import AuditTrail
from portcullis.gateway.catalog import Catalog, Exposure
from portcullis.gateway.credentials import (
    AuthorizationUnavailable,
    CredentialError,
    Credentials,
    MissingCredential,
    Reconnect,
    SecretResolver,
    UnreadableCredential,
)
from portcullis.gateway.loops import BackgroundTasks, Loop, StreamWatch
from portcullis.gateway.policy import pipeline as policy
from portcullis.gateway.identity.oidc import JTI_PREFIX as OIDC_JTI_PREFIX
from portcullis.gateway.identity.oidc import OIDCVerifier
from portcullis.gateway.identity.revocation import RevocationStore
from portcullis.gateway.identity.tokens import SessionClaims, TokenError, TokenVerifier
from portcullis.gateway.upstream import (
    LISTENING,
    PROMPTS_LIST_CHANGED,
    RESOURCES_LIST_CHANGED,
    TOOLS_LIST_CHANGED,
    NoChangeStream,
    UpstreamClient,
    UpstreamError,
    UpstreamRPCError,
    call_events,
)
from portcullis.vault.base import Vault

R = TypeVar("R")
log = logging.getLogger("portcullis.gateway")

# Verified tokens kept to skip re-checking signatures; cleared whole when full (simple, bounded).
_VERIFIED_CACHE_SIZE = 10_000
# Reopening a dropped upstream change stream: from about a second, doubling, to at most a minute
# (jittered, from the background tasks' own generator, not the module-level `random`).
_WATCH_MIN_BACKOFF = 1.0
_WATCH_MAX_BACKOFF = 60.0
# JSON-RPC 2.0 / MCP error codes.
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Identity stamps an upstream puts in a result's _meta; the agent talks to this gateway, not to them.
_IDENTITY_META_PREFIX = "io.modelcontextprotocol/"


class Unauthenticated(Exception):
    """No usable session token. The reason is short and safe to return (it never echoes the token)."""


class RPCError(Exception):
    """A JSON-RPC error to return to the agent."""

    def __init__(self, code: int, message: str, data: Any = None):
        self.code, self.message, self.data = code, message, data
        super().__init__(message)

    def to_dict(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


def tool_error(text: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "isError": True}


def incident(what: str) -> RPCError:
    """What escaped every other handler (a bug): logged with its traceback under a new incident id,
    and answered -32603 with that id only. An exception's text may carry payload: it never reaches the wire."""
    number = secrets.token_hex(8)
    log.exception("%s failed (incident %s)", what, number)
    return RPCError(INTERNAL_ERROR, f"Internal error in the gateway (incident {number}).")


def unknown_tool(name: str) -> RPCError:
    # Same answer for "not exposed" and "does not exist": the allowlist does not leak what it hides.
    return RPCError(INVALID_PARAMS, f"Unknown tool: {name}")


class Gateway:
    """One virtual MCP server's data plane."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        verifier: TokenVerifier,
        vault: Vault,
        revocations: RevocationStore,
        audit: AuditTrail,
        secrets: SecretResolver | None = None,
        refresh_seconds: float = 300.0,
        background: BackgroundTasks | None = None,
    ):
        self.verifier = verifier
        self.vault = vault
        self.revocations = revocations
        self.audit = audit
        self.credentials = Credentials(lambda: self._config, vault, secrets)
        self.oidc = OIDCVerifier(lambda: self._config, secrets)
        self.policy = policy.Policy(lambda: self._config, secrets)
        self.refresh_seconds = refresh_seconds
        self.catalog = Catalog()
        self._http: aiohttp.ClientSession | None = None
        self._upstreams: dict[str, UpstreamClient] = {}
        self._config = config
        self._exposure = self.catalog.expose(config)
        self._said_unknown: set[ExposedTool] = set()
        # Every background task (refresher, change streams, the cluster's watches, publishes)
        # is kept, paced and reported here; `stop()` ends them all.
        self.background = background or BackgroundTasks()
        self._listeners: list[Callable[[], None]] = []
        self._list_listeners: list[Callable[[str], None]] = []
        self._watchers: dict[str, tuple[UpstreamClient, asyncio.Task[None]]] = {}
        self._verified: dict[str, SessionClaims] = {}
        self._matchers: tuple[GatewayConfig, list[tuple[ExposedResourceTemplate, UriTemplate | None]]] | None = None

    # --- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        await self.audit.start()
        # No connection cap here: one slow upstream holding its connections open must
        # not starve calls to the others. Each upstream client bounds its own requests
        # (its connection's maxConnections), and says so when a call has to wait.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=60)
        self._http = aiohttp.ClientSession(connector=connector, auto_decompress=True)
        self._sync_upstreams()
        # A failed refresh is retried sooner than the period, never later.
        every = self.refresh_seconds
        self.background.run("catalog-refresh", self._refresh_forever, minimum=min(1.0, every), maximum=min(60.0, every))

    async def stop(self) -> None:
        # Cancelled and awaited, never re-raised: a loop's failures were logged and reported.
        await self.background.stop()
        self._watchers.clear()
        if self._http is not None:
            await http1.Client.of(self._http).close()  # the upstream pools found from this session
            await self._http.close()
        await self.credentials.oauth.close()
        await self.oidc.close()
        await self.policy.close()
        await self.audit.stop()

    @property
    def http(self) -> aiohttp.ClientSession:
        """The pooled HTTP client of this gateway (upstreams, and answers passed on to other replicas)."""
        assert self._http is not None, "start() first"
        return self._http

    @property
    def config(self) -> GatewayConfig:
        return self._config

    @property
    def exposure(self) -> Exposure:
        return self._exposure

    def exposure_input_schema(self, name: str) -> dict[str, Any] | None:
        return self._exposure.input_schemas.get(name)

    def on_tools_changed(self, listener: Callable[[], None]) -> None:
        """Called after the exposed tool list changed (config swap or upstream refresh)."""
        self._listeners.append(listener)

    def swap_config(self, config: GatewayConfig) -> None:
        """Serve a new compiled config from the next request on (atomic: one reference)."""
        self._config = config
        self._verified.clear()  # the audience or tenant may have changed
        self._sync_upstreams()
        self._rebuild_exposure()
        self.background.spawn(self.refresh_all(), name="refresh-after-config-change")

    def _sync_upstreams(self) -> None:
        assert self._http is not None, "start() first"
        for name, conn in self._config.connections.items():
            current = self._upstreams.get(name)
            if current is None or current.config != conn:
                self._upstreams[name] = UpstreamClient(conn, self._http, on_change=functools.partial(self._changed_in_call, name))
        for name in list(self._upstreams):
            if name not in self._config.connections:
                del self._upstreams[name]
        self._sync_watchers()

    def _rebuild_exposure(self) -> None:
        before = self._exposure.tools
        self._exposure = exposure = self.catalog.expose(self._config)
        unknown = {t for t in exposure.missing if self.catalog.listing(t.connection).tools is not None}
        for tool in unknown - self._said_unknown:
            # Said once, when the upstream's list first lacks it: the operator reports it as UnknownUpstreamTool.
            log.warning(
                "ToolMapping %s allowlists tool %r, which connection %s does not list (UnknownUpstreamTool): "
                "check the name against the upstream's tools/list",
                tool.mapping, tool.upstream_name, tool.connection,
            )
        self._said_unknown = unknown
        set_exposure(
            self.audit.server, exposed=len(exposure.tools), upstream=exposure.upstream_tool_count,
            exposed_tokens=exposure.exposed_tokens, upstream_tokens=exposure.upstream_tokens,
        )
        # Whole definitions: a changed schema is a change agents must refetch too.
        if before != self._exposure.tools:
            self._tools_changed()

    def _tools_changed(self) -> None:
        for listener in self._listeners:
            listener()

    def on_list_changed(self, listener: Callable[[str], None]) -> None:
        """Called with "prompts" or "resources" when an upstream serving exposed ones says its list changed."""
        self._list_listeners.append(listener)

    # --- catalog -----------------------------------------------------------------

    @property
    def ready(self) -> bool:
        # A failing background loop does not make a replica unready (it still serves what it
        # has, and an API outage must not empty every Service at once); one that gates
        # readiness and has never done its work once does (see cluster.py).
        return self.catalog.settled(self._config) and not self.background.unsynced() and not self.nothing_to_serve()

    def unreachable(self) -> list[str]:
        """Connections whose tools could never be listed."""
        return [n for n in self._config.connections if self.catalog.listing(n).state == "unreachable"]

    def nothing_to_serve(self) -> bool:
        """No tool is exposed because every connection that should offer one is unreachable."""
        return bool(self._config.tools) and not self._exposure.tools and bool(self.unreachable())

    async def refresh_all(self) -> None:
        await asyncio.gather(*(self.refresh(name) for name in list(self._config.connections)))

    async def refresh(self, connection: str, credential: Mapping[str, str] | None = None, *, user: str | None = None) -> None:
        """List `connection`'s tools again; with `user`, a 401 to that user's credential renews it once (`_renewing`)."""
        upstream = self._upstreams.get(connection)
        if upstream is None:
            return
        if credential is None:
            credential = await self._listing_credential(connection)

        def list_tools(c: Mapping[str, str] | None) -> Awaitable[list[dict[str, Any]]]:
            return upstream.list_all("tools/list", "tools", credential=c)

        try:
            tools = await (self._renewing(user, connection, credential, list_tools) if user else list_tools(credential))
        except (UpstreamError, UpstreamRPCError) as exc:
            if credential is None and isinstance(exc, UpstreamError) and self._refuses_anonymous(connection, exc):
                log.info("connection %s lists its tools only to its users (%s): listed with the first caller's credential", connection, exc.kind)
            else:
                log.warning(
                    "listing the tools of connection %s at %s failed: %s. Check that the upstream runs and that this "
                    "gateway can reach that URL (MCPConnection %s, spec.url), and its credential if it needs one",
                    connection, upstream.config.url, exc, connection,
                )
            self.catalog.record_failure(connection, str(exc))
        else:
            upstream.remember_tool_schemas(tools)
            self.catalog.record_tools(connection, tools)
        self._rebuild_exposure()

    def _refuses_anonymous(self, connection: str, exc: UpstreamError) -> bool:
        """A per-user upstream that answers 401/403 without a credential: expected, not a failure."""
        return exc.status in (401, 403) and self._config.connections[connection].credential.per_user

    async def _listing_credential(self, connection: str) -> Mapping[str, str] | None:
        # Tool lists are the same for every user; a per-user upstream is listed without a
        # credential first, and with the first caller's credential if that was refused.
        conn = self._config.connections[connection]
        if conn.credential.source == "shared":
            return await self.credentials.shared(connection)
        return None

    # --- upstream change streams -----------------------------------------------------

    def _sync_watchers(self) -> None:
        # One change stream per upstream client: a replaced client (changed URL,
        # timeout or credential source) gets a fresh stream, a removed one none.
        for name, upstream in self._upstreams.items():
            current = self._watchers.get(name)
            if current is None or current[0] is not upstream:
                if current is not None:
                    current[1].cancel()
                task = self.background.run(
                    f"change-stream/{name}",
                    functools.partial(self._watch, name, upstream),
                    minimum=_WATCH_MIN_BACKOFF,
                    maximum=_WATCH_MAX_BACKOFF,
                )
                self._watchers[name] = (upstream, task)
        for name in [n for n in self._watchers if n not in self._upstreams]:
            self._watchers.pop(name)[1].cancel()

    async def _watch(self, connection: str, upstream: UpstreamClient, loop: Loop) -> None:
        """Hold `connection`'s change stream for as long as it is configured.

        Each (re)opened stream starts with a refresh: nothing is replayed, so a change
        made while no stream was open (before the first, or during a reconnect) is
        picked up then. A dropped stream is reopened after a jittered, doubling delay
        capped at _WATCH_MAX_BACKOFF, back to the minimum once a stream has served
        STABLE_AFTER seconds (an upstream that closes every stream at once is not
        hammered, and is reported failing: see `StreamWatch`); an upstream with no
        stream at all is left to the timer. Each replica holds its own streams and
        refreshes its own catalog.
        """
        stream = StreamWatch(loop)
        try:
            while True:
                failure: Exception | None = None
                try:
                    credential = await self._listing_credential(connection)
                    async for event in upstream.changes(credential):
                        if event == LISTENING:
                            stream.opened()
                            await self.refresh(connection)
                        else:
                            await self._upstream_changed(connection, event)
                except NoChangeStream as exc:
                    log.info("%s; its lists are refreshed every %ss", exc, self.refresh_seconds)
                    return
                except UpstreamError as exc:
                    if self._refuses_anonymous(connection, exc):
                        # Each user's own credential opens it, and no stream is held with one
                        # (docs/fidelity.md): the lists follow users' calls and the timer.
                        log.info("connection %s wants each user's credential for its change stream too (%s); "
                                 "its lists are refreshed every %ss and on users' calls", connection, exc.kind, self.refresh_seconds)
                        return
                    failure = exc
                except Exception as exc:  # a bug here must not end the watch for good either
                    failure = exc
                stream.ended(failure)
                await stream.pause()
        finally:
            stream.abandon()

    def _changed_in_call(self, connection: str, method: str) -> None:
        # Announced on a call's response stream rather than the change stream: handled the
        # same way, beside the call (its refresh must not hold up the call's answer), and
        # as the catalog's own work, not the calling agent's (`detached`).
        self.background.spawn(detached(self._upstream_changed(connection, method)), name=f"changed-in-call/{connection}")

    async def _upstream_changed(self, connection: str, method: str) -> None:
        config = self._config
        if method == TOOLS_LIST_CHANGED:
            before = self._exposure.tools
            await self.refresh(connection)
            if self._exposure.tools == before and any(t.connection == connection for t in config.tools):
                # The exposed slice looks the same, yet the upstream says its list changed: pass
                # the signal on. It is a level trigger ("refetch if you care"), so a spurious one
                # costs an agent one tools/list, while a swallowed one leaves it stale.
                self._tools_changed()
        elif method == PROMPTS_LIST_CHANGED:
            # Prompt, resource and template lists are fetched per request, so there is no
            # cache to refresh: only agents are told, and only when this upstream serves them any.
            if any(p.connection == connection for p in config.prompts):
                self._notify_list_changed("prompts")
        elif method == RESOURCES_LIST_CHANGED:
            served = {r.connection for r in config.resources} | {t.connection for t in config.resource_templates}
            if connection in served:
                self._notify_list_changed("resources")

    def _notify_list_changed(self, kind: str) -> None:
        for listener in self._list_listeners:
            listener(kind)

    async def _refresh_forever(self, loop: Loop) -> None:
        """Every upstream's lists, now and every refresh_seconds, whatever one refresh raised.

        An unreachable upstream is no failure here (its listing records that); a refresh
        that raises (the shared-credential Secret unreadable, a bug) is retried with backoff
        and reported, and the refresher goes on.
        """
        await loop.repeat(self.refresh_all, self.refresh_seconds)

    # --- authentication ------------------------------------------------------------

    async def authenticate_any(self, token: str | None) -> SessionClaims:
        """A session token, or (with `spec.auth.oidc`) an OpenID Connect access token.

        Raises `Unauthenticated` (401) or `Forbidden` (403: authentic, but lacking a required
        scope or group); a provider that cannot be read raises `ProviderUnavailable` (503)."""
        # A session token this replica verified before skips the OIDC look at its payload.
        if token and token not in self._verified and self.oidc.accepts(token):
            try:
                claims = await self.oidc.verify(token)
            except TokenError as exc:
                raise Unauthenticated(exc.reason) from None
            if self.revocations.is_revoked(claims):
                raise Unauthenticated("revoked")
            return claims
        return self.authenticate(token)

    def authenticate(self, token: str | None) -> SessionClaims:
        if not token:
            raise Unauthenticated("missing bearer token")
        claims = self._verified.get(token)
        if claims is None or claims.exp <= time.time():
            # A token is immutable: once its signature, audience and issuer checked out,
            # only the clock and revocation can change the answer, and both are checked
            # on every request below. The signature check is most of the cost of a call.
            try:
                claims = self.verifier.verify(token)
            except TokenError as exc:
                raise Unauthenticated(exc.reason) from None
            if claims.tenant != self._config.tenant:
                raise Unauthenticated("wrong tenant")
            if len(self._verified) >= _VERIFIED_CACHE_SIZE:
                self._verified.clear()
            self._verified[token] = claims
        if self.revocations.is_revoked(claims):
            raise Unauthenticated("revoked")
        return claims

    # --- tools ---------------------------------------------------------------------

    async def list_tools(self, claims: SessionClaims) -> tuple[dict[str, Any], ...]:
        exposure = self._exposure
        if exposure.missing:
            await self._fill_missing(claims, exposure)
            exposure = self._exposure
        return policy.visible(claims, exposure)

    async def _fill_missing(self, claims: SessionClaims, exposure: Exposure, *, only: str | None = None) -> None:
        """List an upstream that refused an anonymous listing with this caller's credential.

        `only`: the connection of the one tool being called, whose credential failure (not
        connected, a lost grant) is then raised, so the call can say what to do about it."""
        for connection in {t.connection for t in exposure.missing}:
            if self.catalog.listing(connection).tools is None:
                if connection == only:
                    credential = await self.credentials.headers(claims.sub, connection)
                    await self.refresh(connection, credential, user=claims.sub)
                    continue
                credential = await self.credentials.headers_or_none(claims.sub, connection)
                if credential:
                    await self.refresh(connection, credential)

    async def call_tool(
        self, claims: SessionClaims, name: str, arguments: dict[str, Any] | None, relay: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Run one allowed call and return the result to relay; raise RPCError otherwise.

        `relay` is the rest of the agent's request params (`_meta`, and the
        multi-round-trip `inputResponses`/`requestState` of SEP-2322), forwarded as they came.
        """
        with self._request(claims, "tools/call", name) as record:
            tracing.audit(record)
            record.arguments(arguments)
            with tracing.span("authorize"):
                exposed = self._exposure.by_name.get(name)
                allowlisted = None if exposed is not None else next((t for t in self._config.tools if t.name == name), None)
                if allowlisted is not None:
                    # Allowlisted but not listed yet (upstream down at start, or refused anonymous listing).
                    in_scope = claims.tools is None or name in claims.tools
                    try:
                        await self._fill_missing(claims, self._exposure, only=allowlisted.connection if in_scope else None)
                    except CredentialError as exc:
                        return tool_error(await self._credential_refusal(record, exc, claims))
                    exposed = self._exposure.by_name.get(name)
                decision = policy.hidden_by(claims, name, self._exposure) or policy.ALLOWED
                if decision.allowed and exposed is not None and policy.has_terms(exposed, self._config):
                    decision = await self.policy.decide(claims, exposed, arguments)  # rules, limits, approval
                if not decision.allowed or exposed is None:
                    record.deny(decision.reason, detail=decision.rule)
                    if decision.hidden:
                        raise unknown_tool(name)
                    return tool_error(decision.message or f"The call to {name!r} was refused ({decision.rule}).")
                connection = exposed.connection
                record.allow(connection)
                if decision.rule is not None:
                    record.detail = decision.rule  # e.g. who approved the call, and when
            try:
                with tracing.span("credential"):
                    credential = await self.credentials.headers(claims.sub, connection)
            except CredentialError as exc:
                return tool_error(await self._credential_refusal(record, exc, claims))
            if not record.admit():
                return tool_error(_AUDIT_REFUSAL)
            params: dict[str, Any] = {**relay, "name": exposed.upstream_name} if relay else {"name": exposed.upstream_name}
            if arguments is not None:
                params["arguments"] = arguments
            try:
                with record.upstream(), tracing.span("upstream", client=True):
                    result = await self._send(claims.sub, connection, "tools/call", params, credential)
            except UpstreamRPCError as exc:
                record.failed(Reason.UPSTREAM_RPC_ERROR)
                raise _relayed_rpc_error(exc) from None
            except UpstreamError as exc:
                record.failed(Reason.UPSTREAM_FAILED, detail=exc.kind)
                return tool_error(f"The tool {name!r} is unavailable: {exc}. Try again later.")
            except CredentialError as exc:
                return tool_error(await self._credential_refusal(record, exc, claims))
            relayed = relay_result(result)
            record.result(relayed, "tool_error" if relayed.get("isError") else "ok")
            return relayed

    async def task_request(
        self, claims: SessionClaims, method: str, tool: str | None, connection: str | None, params: dict[str, Any]
    ) -> dict[str, Any]:
        """Relay one `tasks/*` request for a task made by exposed `tool` on `connection` (tasks.py).

        `connection` None is a task this caller may not know of (a foreign or forged id, another
        user's task): refused before any upstream traffic, with the upstream's own answer for a
        task that does not exist, as is a task whose tool is no longer exposed to this token.
        """
        with self._request(claims, method, tool) as record:
            exposed = self._exposure.by_name.get(tool) if tool is not None else None
            hidden = policy.hidden_by(claims, tool, self._exposure) if tool is not None else None
            if connection is None:
                record.deny(Reason.UNKNOWN_TASK)
            elif exposed is None or exposed.connection != connection:
                record.deny(Reason.NOT_EXPOSED)
            elif hidden is not None:
                record.deny(hidden.reason, detail=hidden.rule)
            else:
                return await self._forward(record, claims, connection, params)
            raise RPCError(INVALID_PARAMS, "Failed to retrieve task: Task not found")

    def _request(self, claims: SessionClaims, method: str, name: str | None) -> _Request:
        """One request on the call path: audited once on the way out, and no internals on the wire."""
        return _Request(recording(self.audit, claims, method, name))

    async def _send(
        self, user: str, connection: str, method: str, params: dict[str, Any], credential: Mapping[str, str] | None
    ) -> dict[str, Any]:
        upstream = self._upstreams[connection]
        try:  # the hot path: one request, nothing wrapped around it
            return await upstream.request(method, params, credential=credential)
        except UpstreamError as exc:
            if exc.status != 401:
                raise
            return await self._renewed(user, connection, credential, exc, lambda c: upstream.request(method, params, credential=c))

    async def _renewing(
        self, user: str, connection: str, credential: Mapping[str, str] | None, send: Callable[[Mapping[str, str] | None], Awaitable[R]]
    ) -> R:
        """`send` with `credential`, renewed once on an upstream 401 (`_renewed`)."""
        try:
            return await send(credential)
        except UpstreamError as exc:
            if exc.status != 401:
                raise
            return await self._renewed(user, connection, credential, exc, send)

    async def _renewed(
        self, user: str, connection: str, credential: Mapping[str, str] | None, refused: UpstreamError,
        send: Callable[[Mapping[str, str] | None], Awaitable[R]],
    ) -> R:
        """The upstream answered 401: a renewable credential (OAuth) gets one refresh and one retry,
        and a second 401 drops the grant (`Reconnect`); any other credential's 401 stands."""
        retry = await self.credentials.rejected(user, connection, credential)
        if retry is None:
            raise refused
        try:
            return await send(retry)
        except UpstreamError as exc:
            if exc.status == 401:
                raise await self.credentials.refused_after_refresh(user, connection) from None
            raise

    async def _credential_refusal(self, record: CallRecord, exc: CredentialError, claims: SessionClaims) -> str:
        """Audit a call stopped at the resolve step, and say what the user can do about it."""
        connection, user = exc.connection, claims.sub
        if isinstance(exc, MissingCredential) and claims.jti.startswith(OIDC_JTI_PREFIX):
            # A person signed in at an interactive client, with no application to connect for
            # them: the answer carries their own connect link (single use, ten minutes).
            link = await self._connect_link(user, connection)
            if link is not None:
                lost = isinstance(exc, Reconnect)
                record.deny(Reason.GRANT_LOST if lost else Reason.NO_CREDENTIAL)
                return f"{'Reconnect' if lost else 'Connect'} {connection!r} first: open {link} in your browser, then call again."
        if isinstance(exc, Reconnect):
            record.deny(Reason.GRANT_LOST, outcome="error", detail=exc.reason)
            return (
                f"Your {connection!r} connection can no longer be used ({exc.reason}): reconnect {connection} "
                "(your application asks Portcullis for a new connect link)."
            )
        if isinstance(exc, AuthorizationUnavailable):
            record.deny(Reason.AUTHORIZATION_UNAVAILABLE, outcome="error", detail=str(exc))
            return f"The {connection!r} authorization server cannot renew your access right now, so {connection!r} cannot be called. Try again later."
        if isinstance(exc, MissingCredential):
            record.deny(Reason.NO_CREDENTIAL)
            if self._config.connections[connection].credential.source == "oauth":
                how = f"your application asks Portcullis for a connect link, or run `portcullis credentials connect --user {user} --connection {connection}`"
            else:
                how = f"an administrator can run `portcullis credentials set --user {user} --connection {connection}`"
            return f"You have not connected {connection!r} yet: connect {connection} first ({how})."
        if isinstance(exc, UnreadableCredential):
            record.deny(Reason.CREDENTIAL_UNREADABLE, outcome="error")
            return f"Your stored credential for {connection!r} cannot be used any more: reconnect {connection} (store it again)."
        record.deny(Reason.VAULT_UNAVAILABLE, outcome="error", detail=str(exc))
        return f"The credential store is unavailable right now, so {connection!r} cannot be called. Try again later."

    async def _connect_link(self, user: str, connection: str) -> str | None:
        """A connect link for an OAuth connection, or None (not OAuth, or no link can be made now)."""
        if self._config.connections[connection].credential.source != "oauth":
            return None
        try:
            return (await self.credentials.oauth.authorize(user, connection)).authorization_url
        except Exception as exc:  # no callback URL, the authorization server down: the plain answer then
            log.info("no connect link for connection %s: %s", connection, exc)
            return None

    # --- prompts and resources (deny by default) --------------------------------------

    async def list_prompts(self, claims: SessionClaims) -> list[dict[str, Any]]:
        prompts = self._config.prompts
        found = await self._listed(claims, [(p.connection, p.upstream_name) for p in prompts], "prompts/list", "prompts", "name")
        return [{**definition, "name": prompts[index].name} for index, definition in found]

    async def get_prompt(
        self, claims: SessionClaims, name: str, arguments: dict[str, str] | None, relay: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        with self._request(claims, "prompts/get", name) as record:
            record.arguments(arguments)
            prompt = next((p for p in self._config.prompts if p.name == name), None)
            if prompt is None:
                record.deny(Reason.NOT_EXPOSED)
                raise RPCError(INVALID_PARAMS, f"Unknown prompt: {name}")
            params: dict[str, Any] = {**relay, "name": prompt.upstream_name} if relay else {"name": prompt.upstream_name}
            if arguments:
                params["arguments"] = arguments
            return await self._forward(record, claims, prompt.connection, params)

    async def list_resources(self, claims: SessionClaims) -> list[dict[str, Any]]:
        wanted = [(r.connection, r.uri) for r in self._config.resources]
        return [d for _, d in await self._listed(claims, wanted, "resources/list", "resources", "uri")]

    async def read_resource(self, claims: SessionClaims, uri: str) -> dict[str, Any]:
        with self._request(claims, "resources/read", uri) as record:
            connection = self._resource_connection(uri)
            if connection is None:
                record.deny(Reason.NOT_EXPOSED)
                # The upstream's own answer for an unknown URI (SEP-2164), so a hidden resource
                # looks exactly like a missing one.
                raise RPCError(INVALID_PARAMS, f"Resource not found: {uri}", {"uri": uri})
            return await self._forward(record, claims, connection, {"uri": uri})

    async def resource_subscription(self, claims: SessionClaims, method: str, uri: str) -> dict[str, Any]:
        """`resources/subscribe` or `resources/unsubscribe` of a session-era agent (upstream_sessions.py):
        for an exposed resource only, refused like `resources/read` otherwise."""
        with self._request(claims, method, uri) as record:
            connection = self._resource_connection(uri)
            if connection is None:
                record.deny(Reason.NOT_EXPOSED)
                raise RPCError(INVALID_PARAMS, f"Resource not found: {uri}", {"uri": uri})
            return await self._forward(record, claims, connection, {"uri": uri})

    def resource_connection(self, uri: str) -> str | None:
        """The connection serving exposed `uri`, or None (what an upstream's resource notice may name)."""
        return self._resource_connection(uri)

    def upstream(self, connection: str) -> UpstreamClient | None:
        """The pooled client of `connection`, where agents' own upstream sessions are opened (upstream_sessions.py)."""
        return self._upstreams.get(connection)

    async def complete(
        self,
        claims: SessionClaims,
        ref: Mapping[str, Any],
        argument: Mapping[str, Any],
        context: Mapping[str, Any] | None = None,
        relay: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Relay `completion/complete` for an exposed prompt or resource, under its upstream name.

        Any other reference gets the error an unknown prompt or resource gets, and no
        upstream request is made: completions must not reveal what the allowlist hides.
        """
        method = "completion/complete"
        params: dict[str, Any] = {**relay} if relay else {}
        params["argument"] = dict(argument)
        if context is not None:
            params["context"] = dict(context)
        label = str(ref.get("name")) if ref.get("type") == "ref/prompt" else str(ref.get("uri"))
        with self._request(claims, method, label) as record:
            record.arguments(params)
            if ref.get("type") == "ref/prompt":
                prompt = next((p for p in self._config.prompts if p.name == label), None)
                if prompt is None:
                    record.deny(Reason.NOT_EXPOSED)
                    raise RPCError(INVALID_PARAMS, f"Unknown prompt: {label}")
                params["ref"] = {**ref, "name": prompt.upstream_name}
                connection = prompt.connection
            else:
                found = self._resource_connection(label) if ref.get("type") == "ref/resource" else None
                if found is None:
                    record.deny(Reason.NOT_EXPOSED)
                    raise RPCError(INVALID_PARAMS, f"Resource not found: {label}", {"uri": label})
                params["ref"] = dict(ref)
                connection = found
            return await self._forward(record, claims, connection, params)

    def _resource_connection(self, uri: str) -> str | None:
        """The connection serving `uri`, or None when it is not exposed.

        Exposed are: an exposed resource's exact URI, an exposed template's exact
        string (what `completion/complete` names), and any URI an exposed template
        matches. Matching is the SDK's RFC 6570 matcher (levels 1-3): a level-1
        `{var}` matches one percent-encoded value, never a `/`, so
        `inbox://mails/{id}` admits `inbox://mails/m-1` and not `inbox://mails/a/b`.
        """
        resource = next((r for r in self._config.resources if r.uri == uri), None)
        if resource is not None:
            return resource.connection
        for template, matcher in self._template_matchers():
            if template.uri_template == uri or (matcher is not None and matcher.match(uri) is not None):
                return template.connection
        return None

    def _template_matchers(self) -> list[tuple[ExposedResourceTemplate, UriTemplate | None]]:
        # Parsed once per config; a template the SDK cannot parse only ever matches itself.
        config = self._config
        if self._matchers is None or self._matchers[0] is not config:
            matchers: list[tuple[ExposedResourceTemplate, UriTemplate | None]] = []
            for template in config.resource_templates:
                try:
                    matchers.append((template, UriTemplate.parse(template.uri_template)))
                except InvalidUriTemplate as exc:
                    log.warning("resource template %r of %s cannot be matched: %s", template.uri_template, template.mapping, exc)
                    matchers.append((template, None))
            self._matchers = (config, matchers)
        return self._matchers[1]

    async def list_resource_templates(self, claims: SessionClaims) -> list[dict[str, Any]]:
        """The exposed templates, as their upstreams list them (a template no upstream lists is left out)."""
        wanted = [(t.connection, t.uri_template) for t in self._config.resource_templates]
        found = await self._listed(claims, wanted, "resources/templates/list", "resourceTemplates", "uriTemplate")
        return [d for _, d in found]

    async def _listed(
        self, claims: SessionClaims, wanted: list[tuple[str, str]], method: str, key: str, id_key: str
    ) -> list[tuple[int, dict[str, Any]]]:
        """(index in `wanted`, the upstream's definition) of each wanted item an upstream lists, in the
        upstreams' own order (connections by name, as for tools); each connection listed once."""
        listings = {
            connection: await self._upstream_items(claims, connection, method, key, id_key)
            for connection in sorted({connection for connection, _ in wanted})
        }
        where: dict[tuple[str, str], list[int]] = {}
        for index, pair in enumerate(wanted):
            where.setdefault(pair, []).append(index)  # one upstream item may be exposed under several names
        return [
            (index, definition)
            for connection, items in listings.items()
            for item, definition in items.items()
            for index in where.get((connection, item), ())
        ]

    async def _upstream_items(
        self, claims: SessionClaims, connection: str, method: str, key: str, id_key: str
    ) -> dict[str, dict[str, Any]]:
        upstream = self._upstreams[connection]

        def listed(c: Mapping[str, str] | None) -> Awaitable[list[dict[str, Any]]]:
            return upstream.list_all(method, key, credential=c)

        try:
            credential = await self.credentials.headers_or_none(claims.sub, connection)
            # A 401 to this user's OAuth token renews it once, as for calls and tool listings.
            items = await self._renewing(claims.sub, connection, credential, listed)
        except (UpstreamError, UpstreamRPCError, CredentialError) as exc:
            log.warning("%s on %s failed: %s", method, connection, exc)
            return {}
        return {str(i.get(id_key)): i for i in items if isinstance(i, dict)}

    async def _forward(self, record: CallRecord, claims: SessionClaims, connection: str, params: dict[str, Any]) -> dict[str, Any]:
        """Resolve, forward and relay one allowed prompt, resource or completion request."""
        tracing.audit(record)
        record.allow(connection)
        try:
            with tracing.span("credential"):
                credential = await self.credentials.headers(claims.sub, connection)
        except CredentialError as exc:
            raise RPCError(INVALID_PARAMS, await self._credential_refusal(record, exc, claims)) from None
        if not record.admit():
            raise RPCError(INTERNAL_ERROR, _AUDIT_REFUSAL)
        try:
            with record.upstream(), tracing.span("upstream", client=True):
                result = await self._send(claims.sub, connection, record.method, params, credential)
        except UpstreamRPCError as exc:
            record.failed(Reason.UPSTREAM_RPC_ERROR)
            raise _relayed_rpc_error(exc) from None
        except UpstreamError as exc:
            record.failed(Reason.UPSTREAM_FAILED, detail=exc.kind)
            raise RPCError(INTERNAL_ERROR, str(exc)) from None
        except CredentialError as exc:
            raise RPCError(INVALID_PARAMS, await self._credential_refusal(record, exc, claims)) from None
        relayed = relay_result(result)
        record.result(relayed, "ok")
        return relayed

    def asks_mid_call(self, tool: str) -> bool:
        """May a call of `tool` ask its agent something before it ends? Its upstream asks the session
        protocol's way, or the call needs a person's approval (policy/approvals.py)."""
        exposed = self._exposure.by_name.get(tool)
        return self.speaks_session_protocol(tool) or (exposed is not None and exposed.approval is not None)

    def speaks_session_protocol(self, tool: str) -> bool:
        """Is the exposed `tool`'s upstream known to ask mid-call the session protocol's way? (bridge.py)"""
        exposed = self._exposure.by_name.get(tool)
        upstream = self._upstreams.get(exposed.connection) if exposed is not None else None
        return upstream is not None and upstream.era == "legacy"

    def record_answer(self, claims: SessionClaims, name: str, *, accepted: bool) -> None:
        """Audit a 2026-07-28 retry that answers a question of a call still running (bridge.py)."""
        with self._request(claims, "tools/call", name) as record:
            exposed = self._exposure.by_name.get(name)
            if accepted and exposed is not None:
                record.allow(exposed.connection)
                record.outcome, record.detail = "ok", "answers the upstream's question to the call it continues"
            else:
                record.deny(Reason.STALE_ANSWER)

    async def missing_connections(self, user: str) -> tuple[list[str], list[str]]:
        """(not connected, stored but unreadable) connections this server needs of `user`."""
        return await self.credentials.missing(user)

    # --- audit -----------------------------------------------------------------------------

    def record_unauthenticated(self, reason: str, method: str | None, *, outcome: Outcome = "unauthenticated") -> None:
        """Audit a request refused before any identity was established."""
        with recording(self.audit, None, method or "?", None) as record:
            record.deny(reason, outcome=outcome)


async def detached(work: Awaitable[None]) -> None:
    """Run `work` outside the request that started it: no call's events, and so no agent's session."""
    call_events.set(None)  # in this task's own copy of the context
    await work


_AUDIT_REFUSAL = (
    "This call was not made: the gateway cannot record it in the audit log right now "
    "(the audit store is unavailable and its queue is full). Try again shortly."
)


def _relayed_rpc_error(exc: UpstreamRPCError) -> RPCError:
    code = exc.error.get("code", INTERNAL_ERROR)
    return RPCError(code if isinstance(code, int) and not isinstance(code, bool) else INTERNAL_ERROR,
                    str(exc.error.get("message", "")), exc.error.get("data"))


def complete_tool_result(result: dict[str, Any]) -> dict[str, Any]:
    """A legacy upstream's result has no resultType; the 2026-07-28 surface requires one."""
    result.setdefault("resultType", "complete")
    return result


def relay_result(result: dict[str, Any]) -> dict[str, Any]:
    """The upstream's result minus its identity stamps in `_meta` (everything else verbatim)."""
    meta = result.get("_meta")
    if not isinstance(meta, dict):
        return result
    kept = {k: v for k, v in meta.items() if not k.startswith(_IDENTITY_META_PREFIX)}
    relayed = {k: v for k, v in result.items() if k != "_meta"}
    if kept:
        relayed["_meta"] = kept
    return relayed


class _Request:
    """`with gateway._request(...) as record:`, a class rather than a generator: it wraps every call.

    The record's event is written on the way out, however the block ends. An RPCError (an answer
    the gateway chose) and cancellation pass through; any other exception nobody anticipated is
    logged with its details, recorded as an internal error, and reaches the agent only as an
    RPCError naming the request id.
    """

    __slots__ = ("_record",)

    def __init__(self, record: CallRecord):
        self._record = record

    def __enter__(self) -> CallRecord:
        return self._record

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        record = self._record
        if kind is None or issubclass(kind, RPCError) or not issubclass(kind, Exception):
            record.__exit__(kind, exc, tb)
            return
        record.failed(Reason.INTERNAL_ERROR, "error", kind.__name__)
        log.error("request %s (%s %s) failed", record.request_id, record.method, record.name, exc_info=exc)
        refusal = RPCError(INTERNAL_ERROR, f"Internal error in the gateway (request {record.request_id}).")
        record.__exit__(RPCError, refusal, None)
        raise refusal from None
