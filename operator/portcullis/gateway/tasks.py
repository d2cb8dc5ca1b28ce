"""Tasks (the 2025-11-25 task extension), relayed for exposed tools with no state in any replica.

A session-era agent may call a tool that supports it (`execution.taskSupport`)
with a `task` parameter; the upstream answers at once with a task
(`CreateTaskResult`) and the agent polls it later (`tasks/get`), fetches its
result (`tasks/result`), cancels it (`tasks/cancel`) or lists its tasks
(`tasks/list`) — on whichever replica its next request reaches. So the agent
never sees the upstream's task id: it gets a gateway task id (session_ids.py),
signed, naming the connection, the upstream's id, the user and the exposed tool
that made it. Every later request goes to that connection through the call
path (`Gateway.task_request`): refused, before any upstream traffic and with
the upstream's own answer for a task that does not exist, when the id is not
this server's or names another user, or when its tool is no longer exposed to
the token; otherwise forwarded with the upstream's id and audited once, under
the exposed tool's name.

`tasks/list` has no id to read, and an upstream's task carries no tool name,
so the gateway lists only what it can attribute: the tasks of a connection
that offers exactly one task-capable tool, when that tool is exposed (under
one name) to the token, and that calls as the user (`credential.source:
user`; with a shared credential the upstream's list is every user's). Another
connection's tasks may come from a tool the allowlist hides, so they are not
listed; the agent still polls them by the ids it was given. The combined list is paged by the gateway (paging.py), each
connection asked for its first page.

The upstream's `notifications/tasks/status` are not relayed (the agent polls);
its related-task references in `_meta` are dropped with its other identity
stamps (core.relay_result), and `tasks/result` gets the gateway's own.

Task traffic goes to the upstream on the session era, on the session every
agent of that credential shares: the creating call and its polls then reach
the upstream alike from any replica, whose tasks the spec binds to the
caller's authorization (the user's credential).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Final

from portcullis.gateway.core import INVALID_PARAMS, Gateway, RPCError
from portcullis.gateway.policy.pipeline import hidden_by
from portcullis.gateway.session_ids import SessionIds, TaskRef
from portcullis.gateway.identity.tokens import SessionClaims, TokenError
from portcullis.gateway.upstream import NotRelayable, call_events

TASKS_CAPABILITY: Final[dict[str, Any]] = {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}
"""The server capability that tells a 2025-11-25 client it may augment `tools/call` with a task."""
TASK_METHODS: Final = ("tasks/get", "tasks/result", "tasks/cancel")
RELATED_TASK: Final = "io.modelcontextprotocol/related-task"
_TASK_CAPABLE: Final = ("optional", "required")


class _TaskTraffic:
    """The `CallEvents` of task traffic: the session era, on the credential's shared upstream session.

    A task outlives the request that made it, so nothing the upstream sends beside an answer
    has anyone to go to: the agent learns of its task by polling.
    """

    capabilities: dict[str, Any] = {}
    log_level: str | None = None
    era = "session"
    agent_session: str | None = None

    async def progress(self, params: dict[str, Any]) -> None:
        pass

    async def log(self, params: dict[str, Any]) -> None:
        pass

    async def ask(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        raise NotRelayable(method)


@contextlib.contextmanager
def _task_traffic() -> Iterator[None]:
    reset = call_events.set(_TaskTraffic())
    try:
        yield
    finally:
        call_events.reset(reset)


class Tasks:
    def __init__(self, gateway: Gateway, ids: SessionIds):
        self.gateway = gateway
        self.ids = ids

    async def call(self, claims: SessionClaims, params: dict[str, Any]) -> dict[str, Any]:
        """A task-augmented `tools/call`: the upstream's task, under a gateway task id."""
        name = str(params["name"])
        relay = {k: v for k, v in params.items() if k in ("_meta", "task")}
        with _task_traffic():
            result = await self.gateway.call_tool(claims, name, params.get("arguments"), relay)
        task = result.get("task")
        exposed = self.gateway.exposure.by_name.get(name)
        if isinstance(task, dict) and isinstance(task.get("taskId"), str) and exposed is not None:
            ref = TaskRef(exposed.connection, task["taskId"], claims.sub, name)
            result = {**result, "task": {**task, "taskId": self.ids.task_id(ref)}}
        return result  # an upstream that ran the call at once answered with its result

    async def request(self, claims: SessionClaims, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """`tasks/get`, `tasks/result` or `tasks/cancel` for a gateway task id."""
        presented = params.get("taskId")
        ref = self._open(presented)
        forwarded = {k: v for k, v in params.items() if k == "_meta"}
        if ref is None or ref.user != claims.sub:
            tool, connection = (ref.tool if ref is not None else None), None
        else:
            tool, connection = ref.tool, ref.connection
            forwarded["taskId"] = ref.upstream_id
        with _task_traffic():
            result = await self.gateway.task_request(claims, method, tool, connection, forwarded)
        if method == "tasks/result":
            meta = result.get("_meta")
            kept: dict[str, Any] = meta if isinstance(meta, dict) else {}
            return {**result, "_meta": {**kept, RELATED_TASK: {"taskId": presented}}}
        return {**result, "taskId": presented} if "taskId" in result else result

    async def list_tasks(self, claims: SessionClaims) -> list[dict[str, Any]]:
        """Every task of this user the gateway can attribute to a tool exposed to the token."""
        listed: list[dict[str, Any]] = []
        attributable = self._attributable(claims)
        if not attributable:
            try:  # nothing to ask: the request is still audited (denied, not exposed)
                await self.gateway.task_request(claims, "tasks/list", None, "", {})
            except RPCError:
                pass
            return listed
        for tool, connection in attributable:
            try:  # one upstream failing (audited) leaves the others' tasks listed, as other lists do
                with _task_traffic():
                    result = await self.gateway.task_request(claims, "tasks/list", tool, connection, {})
            except RPCError:
                continue
            tasks = result.get("tasks")
            for task in tasks if isinstance(tasks, list) else []:
                if isinstance(task, dict) and isinstance(task.get("taskId"), str):
                    ref = TaskRef(connection, task["taskId"], claims.sub, tool)
                    listed.append({**task, "taskId": self.ids.task_id(ref)})
        return listed

    def _attributable(self, claims: SessionClaims) -> list[tuple[str, str]]:
        """(exposed tool, connection) of each connection whose tasks can only be that tool's."""
        exposure = self.gateway.exposure
        pairs: list[tuple[str, str]] = []
        for connection, config in sorted(self.gateway.config.connections.items()):
            if not config.credential.per_user:
                continue  # the upstream sees one caller for every user: its list is everybody's
            tools = self.gateway.catalog.listing(connection).tools or {}
            capable = [n for n, t in tools.items() if _task_capable(t)]
            if len(capable) != 1:
                continue
            names = [e.name for e in exposure.by_name.values() if e.connection == connection and e.upstream_name == capable[0]]
            if len(names) == 1 and hidden_by(claims, names[0], exposure) is None:  # scope and access level alike
                pairs.append((names[0], connection))
        return pairs

    def _open(self, presented: Any) -> TaskRef | None:
        if not isinstance(presented, str):
            raise RPCError(INVALID_PARAMS, "Invalid params: taskId must be a string")
        try:
            return self.ids.open_task_id(presented)
        except TokenError:
            return None


def _task_capable(definition: dict[str, Any]) -> bool:
    execution = definition.get("execution")
    return isinstance(execution, dict) and execution.get("taskSupport") in _TASK_CAPABLE
