"""Tasks (the 2025-11-25 task extension), relayed for exposed tools with no state in any replica.

A session-era agent may call a tool that supports it (`execution.taskSupport`)
with a `task` parameter; the upstream answers at once with a task
(`CreateTaskResult`) and the agent polls it later (`tasks/get`), fetches its
result (`tasks/result`), cancels it (`tasks/cancel`) or lists its tasks
(`tasks/list`) — on whichever replica its next request reaches. So the agent
never sees the upstream's task id: it gets a gateway task id (session_ids.py),
signed, naming the connection, the upstream's id, the user and the exposed tool
that made it, and the same string each time it is issued for the same task.
Every later request goes to that connection through the call path
(`Gateway.task_request`): refused, before any upstream traffic and with the
upstream's own answer for a task that does not exist, when the id is not this
server's or names another user, or when its tool is no longer exposed to the
token; otherwise forwarded with the upstream's id and audited once, under the
exposed tool's name.

Task traffic goes on the agent's own upstream session (upstream_sessions.py),
the same on every replica, where the task was made. An upstream that binds its
tasks to the session that made them (the TypeScript SDK does) finds them
from any replica, and what the task asks its client while the agent waits on
`tasks/result` (an elicitation, a sampling request) is asked of the agent on
that request's stream, as it is directly: a task made on a session that
declared elicitation can elicit. Requests without a session id (served by the
SDK, statelessly) go on the credential's shared session and cannot be asked
anything.

`tasks/list` has no id to read, and an upstream's task carries no tool name,
so the gateway lists only what it can attribute: the tasks of a connection
that offers exactly one task-capable tool, when that tool is exposed (under
one name) to the token, and that calls as the user (`credential.source:
user`; with a shared credential the upstream's list is every user's). Another
connection's tasks may come from a tool the allowlist hides, so they are not
listed; the agent still polls them by the ids it was given. Each connection's
pages are followed, and the combined list is paged by the gateway (paging.py).
The upstream's `notifications/tasks/status` on the session's GET stream are
passed on under the same rule (`status`), for the session's own tasks.
Related-task references (`_meta`) in what a task asks are renamed to the
gateway's id; in results they are dropped with the upstream's other identity
stamps (core.relay_result), and `tasks/result` gets the gateway's own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Final

from portcullis.gateway import paging
from portcullis.gateway.core import INVALID_PARAMS, Gateway, RPCError, relay_result
from portcullis.gateway.policy.pipeline import hidden_by
from portcullis.gateway.session_ids import SessionIds, TaskRef
from portcullis.gateway.identity.tokens import SessionClaims, TokenError
from portcullis.gateway.upstream import CallEvents, NotRelayable, call_events

TASKS_CAPABILITY: Final[dict[str, Any]] = {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}
"""The server capability that tells a 2025-11-25 client it may augment `tools/call` with a task."""
TASK_METHODS: Final = ("tasks/get", "tasks/result", "tasks/cancel")
TASK_REQUESTS: Final = frozenset({*TASK_METHODS, "tasks/list"})
MAX_UPSTREAM_PAGES: Final = 100
"""Pages of one upstream's `tasks/list` followed for one listing: a bound, not a limit anyone should reach."""
RELATED_TASK: Final = "io.modelcontextprotocol/related-task"
_TASK_CAPABLE: Final = ("optional", "required")


class _TaskTraffic:
    """The `CallEvents` of task traffic with no stream to the agent (a request without a session):
    the session era, on the credential's shared upstream session, asking the agent nothing."""

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


class _OfTask:
    """The agent's `CallEvents` for a request about one task: what the upstream sends meanwhile names
    the task by the gateway's id, never the upstream's."""

    def __init__(self, events: CallEvents, upstream_id: str, task_id: str):
        self._events = events
        self._ids = upstream_id, task_id
        self.capabilities = events.capabilities
        self.log_level = events.log_level
        self.era = events.era
        self.agent_session = events.agent_session

    async def progress(self, params: dict[str, Any]) -> None:
        await self._events.progress(_renamed(params, *self._ids))

    async def log(self, params: dict[str, Any]) -> None:
        await self._events.log(_renamed(params, *self._ids))

    async def ask(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        return await self._events.ask(method, _renamed(params, *self._ids))


def _renamed(params: dict[str, Any], upstream_id: str, task_id: str) -> dict[str, Any]:
    meta = params.get("_meta")
    related = meta.get(RELATED_TASK) if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or not isinstance(related, dict):
        return params
    if related.get("taskId") == upstream_id:
        return {**params, "_meta": {**meta, RELATED_TASK: {**related, "taskId": task_id}}}
    return {**params, "_meta": {k: v for k, v in meta.items() if k != RELATED_TASK}}  # another task's: not the agent's to see


@contextlib.contextmanager
def _task_traffic(of_task: tuple[str, str] | None = None) -> Iterator[None]:
    """The current request's events (the agent's stream, session_calls.py), or none to relay to."""
    events: CallEvents = call_events.get() or _TaskTraffic()
    reset = call_events.set(_OfTask(events, *of_task) if of_task is not None else events)
    try:
        yield
    finally:
        call_events.reset(reset)


class Tasks:
    def __init__(self, gateway: Gateway, ids: SessionIds):
        self.gateway = gateway
        self.ids = ids

    async def serve(self, claims: SessionClaims, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """A task-augmented `tools/call`, or a `tasks/*` request, from a session-era agent."""
        if method == "tools/call":
            return await self.call(claims, params)
        if method == "tasks/list":
            return await self.list_page(claims, params.get("cursor"))
        return await self.request(claims, method, params)

    async def call(self, claims: SessionClaims, params: dict[str, Any]) -> dict[str, Any]:
        """A task-augmented `tools/call`: the upstream's task, under a gateway task id."""
        name, arguments, task = params.get("name"), params.get("arguments"), params.get("task")
        if not isinstance(name, str) or not isinstance(arguments, (dict, type(None))) or not isinstance(task, dict):
            raise RPCError(INVALID_PARAMS, "Invalid params: a task-augmented tools/call needs a name, object arguments and a task object")
        if not isinstance(params.get("_meta", {}), dict) or not isinstance(task.get("ttl", 0), (int, float, type(None))):
            raise RPCError(INVALID_PARAMS, "Invalid params: _meta must be an object and task.ttl a number")
        relay = {k: v for k, v in params.items() if k in ("_meta", "task")}
        with _task_traffic():
            result = await self.gateway.call_tool(claims, name, arguments, relay)
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
        of_task: tuple[str, str] | None = None
        if ref is None or ref.user != claims.sub:
            tool, connection = (ref.tool if ref is not None else None), None
        else:
            tool, connection = ref.tool, ref.connection
            forwarded["taskId"] = ref.upstream_id
            of_task = ref.upstream_id, str(presented)
        with _task_traffic(of_task):
            result = await self.gateway.task_request(claims, method, tool, connection, forwarded)
        if method == "tasks/result":
            meta = result.get("_meta")
            kept: dict[str, Any] = meta if isinstance(meta, dict) else {}
            return {**result, "_meta": {**kept, RELATED_TASK: {"taskId": presented}}}
        return {**result, "taskId": presented} if "taskId" in result else result

    async def list_page(self, claims: SessionClaims, cursor: Any) -> dict[str, Any]:
        """One page of `list_tasks`, under the gateway's own cursor (an invalid one is -32602)."""
        if not isinstance(cursor, (str, type(None))):
            raise RPCError(INVALID_PARAMS, "Invalid params: cursor must be a string")
        page, next_cursor = paging.page(await self.list_tasks(claims), cursor)
        return {"tasks": list(page), **({"nextCursor": next_cursor} if next_cursor else {})}

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
            params: dict[str, Any] = {}
            for _ in range(MAX_UPSTREAM_PAGES):
                try:  # one upstream failing (audited) leaves the others' tasks listed, as other lists do
                    with _task_traffic():
                        result = await self.gateway.task_request(claims, "tasks/list", tool, connection, params)
                except RPCError:
                    break
                tasks = result.get("tasks")
                for task in tasks if isinstance(tasks, list) else []:
                    if isinstance(task, dict) and isinstance(task.get("taskId"), str):
                        ref = TaskRef(connection, task["taskId"], claims.sub, tool)
                        listed.append({**task, "taskId": self.ids.task_id(ref)})
                cursor = result.get("nextCursor")
                if not isinstance(cursor, str) or not cursor:
                    break
                params = {"cursor": cursor}
        return listed

    def status(self, claims: SessionClaims, connection: str, params: dict[str, Any]) -> dict[str, Any] | None:
        """An upstream's `notifications/tasks/status` params as the agent may see them, under the gateway's
        id; None when the task cannot be attributed to a tool exposed to the token (the agent polls)."""
        upstream_id = params.get("taskId")
        if not isinstance(upstream_id, str):
            return None
        for tool, attributed in self._attributable(claims, shared=True):
            if attributed == connection:
                return {**relay_result(params), "taskId": self.ids.task_id(TaskRef(connection, upstream_id, claims.sub, tool))}
        return None

    def _attributable(self, claims: SessionClaims, *, shared: bool = False) -> list[tuple[str, str]]:
        """(exposed tool, connection) of each connection whose tasks can only be that tool's.

        `shared`: a connection with one credential for every user counts too (for what the upstream
        sends on the agent's own session, which concerns that session's tasks, not everybody's)."""
        exposure = self.gateway.exposure
        pairs: list[tuple[str, str]] = []
        for connection, config in sorted(self.gateway.config.connections.items()):
            if not config.credential.per_user and not shared:
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
