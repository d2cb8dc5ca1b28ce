"""The authorize step: every decision about whether a call may go ahead, in one place.

    allowlist -> token scope -> access level -> argument rules -> rate limits -> approval

Each step answers allow, or deny with a reason (an audit `Reason`), the rule that decided and
what the agent is told. The first three decide what a token may *see* as well: a tool they
hide is missing from its list and answers "Unknown tool" when called, so a narrower token
cannot even learn which tools it lacks. Argument rules and limits apply to calls only, and
answer a tool error that names the rule (never the argument values) or when to retry.

The hot path of a call with no rules and no limits is three dictionary and set lookups.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from portcullis.api.config import ExposedTool, GatewayConfig
from portcullis.api.resources import ArgumentRuleSpec, RateLimitSpec, SecretKeyReference
from portcullis.gateway.audit.events import Reason
from portcullis.gateway.catalog import Exposure
from portcullis.gateway.identity.tokens import READ_ONLY, SessionClaims
from portcullis.expressions import ArgumentRule, CompiledRule, RuleEvaluationError, compile_rule
from portcullis.gateway.policy import approvals
from portcullis.gateway.upstream import AgentError, NotRelayable, call_events, may_ask
from portcullis.gateway.policy.limits import Limit, Limiter, LimitsUnavailable, MemoryLimiter, PostgresLimiter, key_for

log = logging.getLogger("portcullis.policy")

WINDOWS = {"minute": 60, "hour": 3600, "day": 86_400}
APPROVAL_POLL_SECONDS = 0.25
WEBHOOK_SECONDS = 5.0
SecretResolver = Callable[[str, SecretKeyReference], Awaitable[str | None]]


@dataclass(frozen=True, slots=True)
class Decision:
    reason: str
    """Reason.ALLOWLISTED when allowed; otherwise why not (stable audit values)."""
    rule: str | None = None
    """Which rule decided (the audit event's detail), e.g. "rule own-domain-only"."""
    message: str | None = None
    """What a denied agent is told, for denials it may see (rules, limits)."""
    hidden: bool = False
    """Denied by a step that also hides the tool: answered as an unknown tool."""

    @property
    def allowed(self) -> bool:
        return self.reason == Reason.ALLOWLISTED


ALLOWED = Decision(Reason.ALLOWLISTED)


def hidden_by(claims: SessionClaims, name: str, exposure: Exposure) -> Decision | None:
    """The visibility steps (allowlist, token scope, access level): the denial, or None."""
    if name not in exposure.by_name:
        return Decision(Reason.NOT_EXPOSED, "allowlist", hidden=True)
    if claims.tools is not None and name not in claims.tools:
        return Decision(Reason.OUTSIDE_TOKEN_SCOPE, "token scope", hidden=True)
    if claims.access == READ_ONLY and name not in exposure.read_only:
        return Decision(Reason.READ_ONLY_TOKEN, "access level read-only", hidden=True)
    return None


def has_terms(exposed: ExposedTool, config: GatewayConfig) -> bool:
    """Does a call of `exposed` have steps past visibility (rules, limits, approval)? When not,
    `hidden_by` alone decides it, and the call path skips `Policy.decide` (the hot path)."""
    return bool(exposed.rules or exposed.limits or exposed.approval is not None or config.limits.per_user)


def visible(claims: SessionClaims, exposure: Exposure) -> tuple[dict[str, Any], ...]:
    """The tool definitions this token may see, in the served order."""
    tools = exposure.scoped(claims.tools)
    if claims.access == READ_ONLY:
        tools = tuple(t for t in tools if t["name"] in exposure.read_only)
    return tools


class Policy:
    """The pipeline for one gateway: visibility, then (calls only) argument rules and limits."""

    def __init__(self, config: Callable[[], GatewayConfig], secrets: SecretResolver | None = None) -> None:
        self._config = config
        self._secrets = secrets
        self._limiter: Limiter | None = None
        self._approvals: approvals.ApprovalStore | None = None
        self._http: aiohttp.ClientSession | None = None
        self._webhooks: set[asyncio.Task[None]] = set()
        self._approvals_for: tuple[str, SecretKeyReference | None] | None = None
        self._rule_cache: dict[tuple[str, tuple[ArgumentRuleSpec, ...]], tuple[CompiledRule, ...]] = {}
        self._limiter_for: tuple[str, SecretKeyReference | None] | None = None

    async def decide(self, claims: SessionClaims, exposed: ExposedTool, arguments: Mapping[str, Any] | None) -> Decision:
        """The steps past visibility (argument rules, limits, approval) for a call `hidden_by` let
        through, of a tool that `has_terms`."""
        if exposed.rules:
            denied = self._rules(claims, exposed, arguments)
            if denied is not None:
                return denied
        config = self._config()
        if exposed.limits or config.limits.per_user:
            limited = await self._limits(config, claims, exposed)
            if not limited.allowed:
                return limited
        if exposed.approval is not None:
            try:
                return await self._approval(claims, exposed, arguments)
            except Exception as exc:  # the store failed: no approval can be checked, so the call is not made
                log.warning("approvals cannot be checked: %s", type(exc).__name__)
                return Decision(Reason.APPROVAL_PENDING, "approval store unavailable",
                                f"The gateway cannot check approvals for {exposed.name!r} right now, so the call was not made. Try again shortly.")
        return ALLOWED

    # --- approvals -----------------------------------------------------------------------

    async def _approval(self, claims: SessionClaims, exposed: ExposedTool, arguments: Mapping[str, Any] | None) -> Decision:
        spec = exposed.approval
        assert spec is not None
        store = await self.approvals()
        wanted = approvals.digest(exposed.name, arguments)
        asked_at = time.time()
        approval = await store.open_for(claims.sub, exposed.name, wanted, dict(arguments or {}), spec.expires_seconds)
        if spec.webhook is not None and approval.state == "pending" and approval.created_at >= asked_at:
            self._tell(spec.webhook, approval)
        if approval.state == "pending":
            approval = await self._ask_at_the_client(claims, exposed.name, arguments, approval, store)
        deadline = time.monotonic() + spec.wait_seconds
        while approval.state == "pending" and time.monotonic() < deadline:
            await asyncio.sleep(APPROVAL_POLL_SECONDS)  # a person decides through the admin API
            approval = await store.get(approval.id) or approval
        if approval.state == "approved":
            used = await store.consume(approval.id)
            if used is not None:
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(used.decided_at or time.time()))
                return Decision(Reason.ALLOWLISTED, f"approval {used.id} by {used.decided_by} at {when}")
        if approval.state == "denied":
            return Decision(Reason.APPROVAL_DENIED, f"approval {approval.id} denied by {approval.decided_by}",
                            f"A person denied this call of {exposed.name!r} (approval {approval.id}). Do not retry it unchanged.")
        until = time.strftime("%H:%M:%S UTC", time.gmtime(approval.expires_at))
        return Decision(
            Reason.APPROVAL_PENDING, f"approval {approval.id}",
            f"This call of {exposed.name!r} needs a person's approval: approval {approval.id} is pending. Once it is "
            f"approved, make the same call again with the same arguments; it lets exactly one such call through, until {until}.",
        )

    def _tell(self, webhook: str, approval: approvals.Approval) -> None:
        """POST a new request for approval to the webhook, beside the call (never holding it up)."""
        config = self._config()
        body = {
            "kind": "portcullis.approval/v1", "id": approval.id, "server": f"{config.server.namespace}/{config.server.name}",
            "user": approval.user, "tool": approval.tool, "createdAt": int(approval.created_at), "expiresAt": int(approval.expires_at),
        }

        async def post() -> None:
            if self._http is None or self._http.closed:
                self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WEBHOOK_SECONDS))
            try:
                async with self._http.post(webhook, json=body) as response:
                    if response.status >= 300:
                        log.warning("approval webhook answered HTTP %s for approval %s", response.status, approval.id)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("approval webhook failed for approval %s: %s", approval.id, type(exc).__name__)

        task = asyncio.get_running_loop().create_task(post(), name=f"approval-webhook/{approval.id}")
        self._webhooks.add(task)
        task.add_done_callback(self._webhooks.discard)

    async def _ask_at_the_client(
        self, claims: SessionClaims, tool: str, arguments: Mapping[str, Any] | None, approval: approvals.Approval,
        store: approvals.ApprovalStore,
    ) -> approvals.Approval:
        """An interactive agent's person is asked directly (MCP elicitation: a 2026-07-28 agent gets
        `input_required`, a 2025-11-25 session agent an `elicitation/create` request); others wait
        for the admin API. The answer decides this one approval."""
        events = call_events.get()
        if events is None or not may_ask(events.capabilities, "elicitation/create"):
            return approval
        shown = json.dumps(dict(arguments or {}), indent=2, ensure_ascii=False)
        question = {
            "mode": "form",
            "message": f"Approve this call of {tool}?\n\n{shown[:4000]}",
            "requestedSchema": {
                "type": "object",
                "properties": {"approve": {"type": "boolean", "title": f"Approve {tool} with exactly these arguments"}},
                "required": ["approve"],
            },
        }
        try:
            answer = await events.ask("elicitation/create", question)
        except (NotRelayable, AgentError) as exc:
            log.info("approval %s could not be asked at the client (%s): it waits for the admin API", approval.id, type(exc).__name__)
            return approval
        action, content = answer.get("action"), answer.get("content")
        if action == "cancel" or action not in ("accept", "decline"):
            return approval  # dismissed: still pending, for the admin API or a later call
        approve = action == "accept" and isinstance(content, dict) and content.get("approve") is True
        decided = await store.decide(approval.id, approve, f"{claims.sub} (at the client)")
        return decided or await store.get(approval.id) or approval

    async def approvals(self) -> approvals.ApprovalStore:
        """Where approvals are kept: the same store as the limits (shared PostgreSQL, or this replica)."""
        limits = self._config().limits
        wanted = (limits.store, limits.postgres_url)
        if self._approvals is not None and self._approvals_for == wanted:
            return self._approvals
        if self._approvals is not None:
            await self._approvals.close()
        if limits.store == "postgres" and limits.postgres_url is not None:
            config = self._config()
            dsn = await self._postgres_dsn(limits.postgres_url)
            self._approvals = approvals.PostgresApprovals(dsn, f"{config.server.namespace}/{config.server.name}")
        else:
            self._approvals = approvals.MemoryApprovals()
        self._approvals_for = wanted
        return self._approvals

    # --- argument rules ------------------------------------------------------------------

    def _rules(self, claims: SessionClaims, exposed: ExposedTool, arguments: Mapping[str, Any] | None) -> Decision | None:
        token = {
            "sub": claims.sub, "tenant": claims.tenant, "tools": list(claims.tools) if claims.tools is not None else None,
            "access": claims.access, "agent_run_id": claims.agent_run_id, "jti": claims.jti,
        }
        for rule in self._compiled(exposed):
            try:
                allowed = rule.allows(arguments, token)
                reason = None
            except RuleEvaluationError as exc:
                allowed, reason = False, exc.reason  # fail closed; the reason names no argument value
            if not allowed:
                said = f": {rule.message}" if rule.message else (" (it could not be evaluated on these arguments)" if reason else "")
                detail = f"rule {rule.name}" + (f": {reason}" if reason else "")
                return Decision(Reason.ARGUMENT_RULE, detail, f"The call to {exposed.name!r} was refused by the rule {rule.name!r}{said}.")
        return None

    def _compiled(self, exposed: ExposedTool) -> tuple[CompiledRule, ...]:
        """The tool's rules, compiled once per (tool, rules) and kept while the config keeps them."""
        key = (exposed.name, exposed.rules)
        compiled = self._rule_cache.get(key)
        if compiled is None:
            # compile() refused a mapping whose rules do not compile, so this does not raise.
            compiled = tuple(compile_rule(ArgumentRule(r.name, r.expression, r.message)) for r in exposed.rules)
            if len(self._rule_cache) > 4096:
                self._rule_cache.clear()
            self._rule_cache[key] = compiled
        return compiled

    # --- rate limits ---------------------------------------------------------------------

    async def _limits(self, config: GatewayConfig, claims: SessionClaims, exposed: ExposedTool) -> Decision:
        declared = [(spec, "user+tool") for spec in exposed.limits] + [(spec, "user") for spec in config.limits.per_user]
        # Scarcest first: an allowed hit stays counted even when a later limit refuses the call.
        declared.sort(key=lambda pair: pair[0].calls / WINDOWS[pair[0].per])
        server = f"{config.server.namespace}/{config.server.name}"
        try:
            limiter = await self.limiter()
            for spec, scope in declared:
                limit = Limit(spec.calls, WINDOWS[spec.per], "user+tool" if scope == "user+tool" else "user")
                verdict = await limiter.hit(key_for(server, claims.sub, exposed.name, limit), limit)
                if not verdict.allowed:
                    return Decision(
                        Reason.RATE_LIMITED, f"limit {_describe(spec, scope, exposed.name)}",
                        f"Rate limit reached: {_describe(spec, scope, exposed.name)} for you. "
                        f"Try again in {_duration(verdict.retry_after_seconds)} "
                        f"(at {time.strftime('%H:%M:%S UTC', time.gmtime(time.time() + verdict.retry_after_seconds))}).",
                    )
        except LimitsUnavailable as exc:
            log.warning("rate limits cannot be checked: %s", exc)
            return Decision(Reason.RATE_LIMITED, "limits store unavailable",
                            "The gateway cannot check this tool's rate limits right now, so the call was not made. Try again shortly.")
        return ALLOWED

    async def limiter(self) -> Limiter:
        """The counter store the config names: shared PostgreSQL, or this replica's memory."""
        limits = self._config().limits
        wanted = (limits.store, limits.postgres_url)
        if self._limiter is not None and self._limiter_for == wanted:
            return self._limiter
        if self._limiter is not None:
            await self._limiter.close()
        if limits.store == "postgres" and limits.postgres_url is not None:
            self._limiter = PostgresLimiter(await self._postgres_dsn(limits.postgres_url))
        else:
            self._limiter = MemoryLimiter()
        self._limiter_for = wanted
        return self._limiter

    async def _postgres_dsn(self, ref: SecretKeyReference) -> str:
        """The policy store's PostgreSQL URL, read from its Secret (never logged)."""
        dsn = await self._secrets(self._config().server.namespace, ref) if self._secrets else None
        if dsn is None:
            raise LimitsUnavailable(f"the PostgreSQL URL (Secret {ref.name}, key {ref.key}) cannot be read")
        return dsn

    def status(self) -> dict[str, Any]:
        limits = self._config().limits
        shared = limits.store == "postgres"
        return {
            "store": limits.store,
            "shared": shared,
            "accuracy": "exact across replicas" if shared else "per replica: N replicas allow up to N times each limit",
        }

    async def close(self) -> None:
        if self._limiter is not None:
            await self._limiter.close()
        if self._approvals is not None:
            await self._approvals.close()
        for task in list(self._webhooks):
            task.cancel()
        if self._http is not None:
            await self._http.close()


def _describe(spec: RateLimitSpec, scope: str, tool: str) -> str:
    what = f"calls of {tool}" if scope == "user+tool" else "calls of this server's tools"
    return f"at most {spec.calls} {what} per {spec.per}"


def _duration(seconds: float) -> str:
    seconds = max(1, int(seconds + 0.999))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
