"""Pooled clients for upstream MCP servers.

Why not the SDK's `Client` here: a gateway forwards already-validated JSON-RPC
and relays the upstream's answer, so parsing every result into pydantic models
and back is pure cost on the hot path (it was most of the 5.5 ms a naive
SDK-on-SDK gateway added). This module speaks the wire directly and returns
plain dicts: requests and answers over the gateway's own keep-alive HTTP/1.1
pools (http1.py: about half aiohttp's CPU per request), https origins and the
long-lived streams over the gateway's one aiohttp session.

It speaks both eras of Streamable HTTP:

- 2026-07-28: every request is one self-contained POST carrying the envelope in
  `params._meta` plus the routing headers (`MCP-Protocol-Version`, `Mcp-Method`,
  `Mcp-Name`, `Mcp-Param-*`). No session, so any connection of the pool serves
  any user: the user's credential is just one more header.
- 2025-11-25 and older: an `initialize` handshake yields an `Mcp-Session-Id`.
  A session is tied to the credential it was opened with, so sessions are kept
  per credential (by hash; the credential itself is only held for the request).

Which era an upstream speaks is found once, with `server/discover`, and
remembered. Every failure becomes an `UpstreamError` naming the connection.

Two clocks bound a request (`_Deadline`): the connection's `timeoutSeconds` is an
idle timeout, restarted by every message the upstream sends for the request (a
long tool that reports progress runs on), and `maxDurationSeconds` caps the whole
request however lively it is. The MCP spec asks for exactly this pair (lifecycle,
"Timeouts"). What arrives on a call's response stream besides its answer goes to
the call's `CallEvents` (progress, log messages) or, for list changes, to the
client's `on_change`: none of it is dropped.

Two bounds per connection keep one upstream from hurting the calls to others:

- `maxResultBytes`: every answer is read in chunks against a byte budget (a JSON
  body whole, a response stream across all its events, the change stream per
  event), and the response is closed the moment the budget is spent. Nothing is
  ever read unbounded, so a 50 MB answer costs at most the limit in memory.
- `maxConnections`: each request holds one of the connection's slots while it is
  on the wire (see `_Slots`).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import itertools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from mcp.shared.inbound import (
    MCP_METHOD_HEADER,
    MCP_NAME_HEADER,
    MCP_PROTOCOL_VERSION_HEADER,
    NAME_BEARING_METHODS,
    encode_header_value,
    find_invalid_x_mcp_header,
    mcp_param_headers,
    x_mcp_header_map,
)
from mcp_types import CLIENT_CAPABILITIES_META_KEY, CLIENT_INFO_META_KEY, LOG_LEVEL_META_KEY, PROTOCOL_VERSION_META_KEY

from portcullis import __version__
from portcullis.api.config import ConnectionConfig
from portcullis.gateway import http1, jsonwire, tracing

MODERN_VERSION: Final = "2026-07-28"
LEGACY_VERSION: Final = "2025-11-25"
SESSION_HEADER: Final = "mcp-session-id"
CLIENT_INFO: Final = {"name": "portcullis-gateway", "version": __version__}
_ACCEPT: Final = "application/json, text/event-stream"
# JSON-RPC errors that say "this server does not speak the modern era".
_UNSUPPORTED_VERSION: Final = -32022
_MAX_LEGACY_SESSIONS: Final = 1024
SESSIONLESS_RECHECK_SECONDS: Final = 300.0
"""How long an upstream that answered `initialize` without a session id is taken to keep none (`_sessionless`)."""
# Bodies and events larger than this are parsed in a worker thread (`_parse`).
_THREAD_PARSE_BYTES: Final = 1 << 20
# A call waiting longer than this for a slot of its connection is worth a warning.
_SLOW_SLOT_SECONDS: Final = 1.0

log = logging.getLogger("portcullis.gateway.upstream")


class NotRelayable(Exception):
    """The agent of this call cannot be asked this (its era or its declared capabilities)."""


class AgentError(Exception):
    """The agent answered a request relayed to it with a JSON-RPC error; passed on as it is."""

    def __init__(self, error: dict[str, Any]):
        self.error = error
        super().__init__(str(error.get("message", "")))


class CallEvents(Protocol):
    """Where what an upstream sends on one request's response stream, besides the answer, goes."""

    capabilities: dict[str, Any]
    """The calling agent's client capabilities, as the upstream should see them."""
    log_level: str | None
    """The log level to ask a 2026-07-28 upstream for on the agent's behalf (its own `_meta` wins)."""
    era: str
    """"session" for a 2025-11-25 (or older) agent, "modern" for a 2026-07-28 one."""
    agent_session: str | None
    """The agent's session id, when it has one (the session era): its upstream sessions are its own."""

    async def progress(self, params: dict[str, Any]) -> None:
        """`notifications/progress` params, as the upstream sent them."""

    async def log(self, params: dict[str, Any]) -> None:
        """`notifications/message` params, as the upstream sent them."""

    async def ask(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """A request the upstream sends its client mid-call: the agent's result; NotRelayable, or AgentError."""


call_events: contextvars.ContextVar[CallEvents | None] = contextvars.ContextVar("portcullis_call_events", default=None)
"""The current request's `CallEvents` (set by the endpoint around a call, None elsewhere).
A context variable, so the hot path passes nothing."""

ChangeListener = Callable[[str], None]
"""Told the method of a `notifications/{tools,prompts,resources}/list_changed` met on any stream."""


class UpstreamError(Exception):
    """The upstream could not be reached or answered something unusable.

    The message is safe to show an agent: it names the connection, never a credential.
    """

    def __init__(self, connection: str, message: str, *, status: int | None = None, transport: bool = False):
        self.connection = connection
        self.status = status
        """The HTTP status, when the upstream answered with one."""
        self.transport = transport
        """True when nothing was answered at all (refused, timed out): the upstream's era is still unknown."""
        super().__init__(f"upstream {connection!r}: {message}")

    @property
    def kind(self) -> str:
        """What failed, in words safe for the audit log: never the upstream's bytes."""
        if self.transport:
            return "transport"
        return f"http {self.status}" if self.status is not None else "protocol"


class NoChangeStream(UpstreamError):
    """The upstream offers no stream of change notifications (405 on GET, -32601 on listen)."""


class NoSessions(UpstreamError):
    """A 2026-07-28 upstream that refuses the session protocol's `initialize`."""


class ResultTooLarge(UpstreamError):
    """The upstream answered more than the connection's `maxResultBytes`; the rest was never read."""

    def __init__(self, connection: str, limit: int):
        super().__init__(connection, f"answered more than {limit} bytes (maxResultBytes of connection {connection})")

    @property
    def kind(self) -> str:
        return "result too large"


class SlotsBusy(UpstreamError):
    """All of the connection's `maxConnections` slots stayed busy for the connection's whole timeout.

    `transport`: nothing was sent, so nothing about the upstream (its era) was learnt.
    """

    def __init__(self, connection: str, limit: int, seconds: int):
        message = f"its maxConnections slots are all busy ({limit} requests in flight, none came free within {seconds}s)"
        super().__init__(connection, message, transport=True)

    @property
    def kind(self) -> str:
        return "slots busy"


LISTENING: Final = "portcullis/listening"
"""Yielded by `UpstreamClient.changes` each time its stream opens: what changed before is not replayed."""
TOOLS_LIST_CHANGED: Final = "notifications/tools/list_changed"
PROMPTS_LIST_CHANGED: Final = "notifications/prompts/list_changed"
RESOURCES_LIST_CHANGED: Final = "notifications/resources/list_changed"
_CHANGE_METHODS: Final = frozenset({TOOLS_LIST_CHANGED, PROMPTS_LIST_CHANGED, RESOURCES_LIST_CHANGED})
_ACKNOWLEDGED: Final = "notifications/subscriptions/acknowledged"
RELAYED_CAPABILITIES: Final[dict[str, Any]] = {
    "elicitation": {"form": {}, "url": {}},
    "sampling": {"context": {}, "tools": {}},
    "roots": {},
    # An agent that runs what it is asked as tasks of its own is polled for them (ASKED_CAPABILITY).
    "tasks": {"list": {}, "cancel": {}, "requests": {"elicitation": {"create": {}}, "sampling": {"createMessage": {}}}},
}
"""What an upstream is told, when the gateway lists it, that the gateway's agents may support.

On that era an upstream asks its client for input inside a result (`inputRequests`,
SEP-2322), which the gateway relays verbatim and whose answers it forwards on the
retry: whatever an agent supports reaches the upstream. A tool an upstream offers
only to such clients is therefore listed; each call then carries the calling
agent's own capabilities, so an agent without one is answered as the upstream
answers such a client. Towards 2025-11-25 upstreams the same holds, with sessions:
on that era the upstream asks mid-stream, which the gateway relays only to session-era
agents that declared the capability (session_calls.py): the catalog's listing session
declares them all, each agent's calls go on a session declaring what it declared.
"""
_LISTINGS: Final = frozenset({"tools/list", "prompts/list", "resources/list", "resources/templates/list"})
ASKED_CAPABILITY: Final = {
    "elicitation/create": "elicitation", "sampling/createMessage": "sampling", "roots/list": "roots",
    # A client that runs what it is asked as tasks of its own (2025-11-25 `tasks.requests`) is polled
    # for them by the upstream: those are the agent's tasks, asked of it like any other question.
    "tasks/get": "tasks", "tasks/result": "tasks", "tasks/list": "tasks", "tasks/cancel": "tasks",
}
"""What an upstream may ask its client mid-call, and the client capability each needs."""


def can_be_asked(capabilities: Any) -> bool:
    """Did a client declare anything an upstream may ask it (`ASKED_CAPABILITY`)?"""
    return isinstance(capabilities, dict) and any(isinstance(capabilities.get(c), dict) for c in ASKED_CAPABILITY.values())


def may_ask(capabilities: Mapping[str, Any], method: str) -> bool:
    """May an upstream ask a client that declared `capabilities` this `method`?"""
    capability = ASKED_CAPABILITY.get(method)
    return capability is not None and isinstance(capabilities.get(capability), dict)
_METHOD_NOT_FOUND: Final = -32601


class _Deadline:
    """The two clocks of one request: idle (`timeoutSeconds`, restarted by `touch`) inside a hard cap.

    Entered around the whole exchange (connecting, the answer's headers, every
    event). On expiry the exchange's task is cancelled, which closes the upstream
    connection, and `UpstreamError` says which clock ran out.

    What `asyncio.timeout_at` does, with one timer per exchange: `touch` only moves
    the deadline later, and the timer, when it fires early, re-arms itself for the
    new deadline. `asyncio.Timeout` instead replaces its timer on every reschedule
    and asks the kernel for the process id (CPython 3.11's `get_running_loop`) each
    time; here the loop is the client's (`UpstreamClient._deadline`).
    """

    __slots__ = ("_armed", "_cancelling", "_cap", "_config", "_expired", "_handle", "_idle", "_loop", "_task", "_when")

    def __init__(self, config: ConnectionConfig, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any]):
        self._config = config
        self._loop = loop
        self._task = task
        self._idle = float(config.timeout_seconds)
        now = loop.time()
        self._cap = now + config.max_duration_seconds
        self._when = self._armed = min(now + self._idle, self._cap)
        self._handle: asyncio.TimerHandle | None = None
        self._cancelling = 0
        self._expired = False

    async def __aenter__(self) -> _Deadline:
        self._cancelling = self._task.cancelling()
        self._handle = self._loop.call_at(self._armed, self._fire)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        # As asyncio.Timeout: the cancellation is ours to turn into an error only if nobody else's is pending.
        if self._expired and self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            config = self._config
            if self._loop.time() >= self._cap:
                message = f"did not finish within {config.max_duration_seconds}s (maxDurationSeconds of connection {config.name})"
            else:
                message = f"sent nothing for {config.timeout_seconds}s (timeoutSeconds of connection {config.name})"
            raise UpstreamError(config.name, message, transport=True) from None

    def touch(self) -> None:
        """The upstream said something for this request: the idle clock starts again."""
        self._move(min(self._loop.time() + self._idle, self._cap))

    def hold(self) -> None:
        """The upstream waits for the agent (a person may be answering): only the cap runs, until `touch`."""
        self._move(self._cap)

    def _move(self, when: float) -> None:
        self._when = when
        if when < self._armed and self._handle is not None:  # earlier than the timer: only after `hold`
            self._handle.cancel()
            self._armed = when
            self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        if self._loop.time() < self._when:  # touched since armed: wait for the new deadline
            self._armed = self._when
            self._handle = self._loop.call_at(self._when, self._fire)
            return
        self._handle = None
        self._expired = True
        self._task.cancel()


class UpstreamRPCError(Exception):
    """The upstream answered with a JSON-RPC error; relayed as is."""

    def __init__(self, error: dict[str, Any]):
        self.error = error
        super().__init__(str(error.get("message", "upstream error")))


@dataclass
class _LegacySession:
    session_id: str | None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


_NO_SESSION: Final = _LegacySession(None)
"""The session of an upstream that keeps none: requests go without an id, and share this one."""

agent_upstreams: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar("portcullis_agent_upstreams", default={})
"""Connection name -> the upstream session opened for the current agent session at its `initialize`,
the same on every replica (carried sealed in the agent's session id: upstream_sessions.py). Read
by `_legacy` only for requests whose `CallEvents` name that agent session."""


class _Slots:
    """At most `maxConnections` requests of one connection on the wire at once (per replica).

    A semaphore per client rather than a TCPConnector per client: a client is
    replaced whole when its connection's config changes, and a semaphore needs no
    closing where a connector would need whoever drops the client to close it;
    and only a wait in front of the request can be timed, logged and failed with
    a message naming the limit (aiohttp's own connector queue is silent and spends
    the request's timeout). The gateway's shared pools (http1.py, aiohttp) keep pooling
    keep-alive connections and has no per-host cap, so this is the bound. On
    HTTP/1.1 a request on the wire is one connection, so bounding requests bounds
    the upstream's sockets (idle ones in the pool aside). The change stream does
    not take a slot: it is one idle stream per upstream, and would take a slot for good.

    The wait for a slot is bounded by the connection's timeout, apart from the
    exchange that follows (bounded by it too). Were both one deadline, a queued
    call would always get its slot, just before that deadline, from a call that
    arrived earlier and so timed out earlier, and "all busy" would never be said.
    A wait past `_SLOW_SLOT_SECONDS` logs one warning per streak of saturation
    (until a call finds a slot free again), not one per call.
    """

    def __init__(self, config: ConnectionConfig):
        self._config = config
        self._free = asyncio.Semaphore(config.max_connections)
        self._saturated = False  # warned, and no call has found a free slot since

    def hold(self) -> _Slot:
        """`async with` it around one request on the wire."""
        return _Slot(self)

    async def acquire(self) -> None:
        if not self._free.locked():
            await self._free.acquire()  # free: returns at once
            if self._saturated:
                self._saturated = False
                log.info("upstream %r has free connection slots again", self._config.name)
            return
        slow = asyncio.get_running_loop().call_later(_SLOW_SLOT_SECONDS, self._warn)
        try:
            async with asyncio.timeout(self._config.timeout_seconds):
                await self._free.acquire()
        except TimeoutError:
            raise SlotsBusy(self._config.name, self._config.max_connections, self._config.timeout_seconds) from None
        finally:
            slow.cancel()

    def release(self) -> None:
        self._free.release()

    def _warn(self) -> None:
        if not self._saturated:
            self._saturated = True
            config = self._config
            log.warning(
                "calls to upstream %r (%s) are waiting for a connection: all %d of its maxConnections are busy "
                "(a slow or hung upstream?); calls that find none free within %ss fail",
                config.name, config.url, config.max_connections, config.timeout_seconds,
            )


class _Slot:
    """One request's hold on a `_Slots` (a class, not a generator context manager: it is on every call)."""

    __slots__ = ("_slots",)

    def __init__(self, slots: _Slots):
        self._slots = slots

    async def __aenter__(self) -> None:
        await self._slots.acquire()

    async def __aexit__(self, *exc_info: Any) -> None:
        self._slots.release()


class _Budget:
    """What is left of `maxResultBytes` for one answer: every byte read is spent here first."""

    __slots__ = ("_connection", "_response", "limit", "spent")

    def __init__(self, response: http1.Response, config: ConnectionConfig):
        self._response = response
        self._connection = config.name
        self.limit = config.max_result_bytes
        self.spent = 0

    def spend(self, n: int) -> None:
        self.spent += n
        if self.spent > self.limit:
            self._response.close()  # the rest is never read, and the connection is not reused
            raise ResultTooLarge(self._connection, self.limit)

    def refill(self) -> None:
        self.spent = 0


class UpstreamClient:
    """One upstream MCP server, as one `MCPConnection` describes it."""

    def __init__(self, config: ConnectionConfig, http: aiohttp.ClientSession, *, on_change: ChangeListener | None = None):
        self.config = config
        self._http = http
        self._on_change = on_change
        self._era: str | None = None  # "modern" | "legacy", found on first use
        self._sessions_refused: bool | None = None  # a modern upstream's answer to `initialize`, once asked
        self._era_lock = asyncio.Lock()
        self._sessions: dict[str, _LegacySession] = {}
        self._opening: dict[str, asyncio.Lock] = {}
        # Until when this upstream is taken to keep no sessions: it answered `initialize` without an id,
        # so a handshake tells it nothing it could keep (`_sessionless`).
        self._sessionless_until = 0.0
        self._ids = itertools.count(1)
        self._param_headers: dict[str, dict[tuple[str, ...], str]] = {}
        # aiohttp bounds connecting; everything after is `_Deadline`'s (an idle clock aiohttp lacks).
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.timeout_seconds)
        # Calls, answers and notices go over the gateway's lean keep-alive pools (http1.py;
        # https through `http` itself); the long-lived streams stay on `http`.
        self._wire = http1.Client.of(http).endpoint(config.url)
        self._slots = _Slots(config)
        self._notices: set[asyncio.Task[None]] = set()  # cancellation notices on their way (kept referenced)
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop requests run on (`_deadline`)

    @property
    def name(self) -> str:
        return self.config.name

    def _deadline(self) -> _Deadline:
        """A `_Deadline` for the current task, on the loop this client runs on (looked up once)."""
        loop = self._loop
        task = asyncio.current_task(loop) if loop is not None else None
        if loop is None or task is None:  # the first request, or a client carried to another loop (tests do)
            self._loop = loop = asyncio.get_running_loop()
            task = asyncio.current_task(loop)
            assert task is not None, "an upstream request runs in a task"
        return _Deadline(self.config, loop, task)

    @property
    def era(self) -> str | None:
        return self._era

    def remember_tool_schemas(self, tools: list[dict[str, Any]]) -> None:
        """Keep the `x-mcp-header` map of each tool so calls can mirror `Mcp-Param-*` headers."""
        maps: dict[str, dict[tuple[str, ...], str]] = {}
        for tool in tools:
            schema = tool.get("inputSchema")
            if isinstance(schema, dict) and find_invalid_x_mcp_header(schema) is None:
                mapping = x_mcp_header_map(schema)
                if mapping:
                    maps[str(tool.get("name"))] = mapping
        self._param_headers = maps

    async def request(
        self, method: str, params: dict[str, Any] | None = None, *, credential: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Send one JSON-RPC request and return its `result` (raises on error).

        A session-era agent's request goes to an upstream that speaks both eras on the
        session protocol, as it would directly: some of what an upstream offers exists
        only there (questions asked mid-call, per-session tools). Listings, shared by
        all agents, and upstreams that refuse sessions stay on the era discovered.
        """
        era = self._era or await self._discover(credential)
        if era == "modern":
            events = call_events.get()
            if events is not None and events.era == "session" and self._sessions_refused is not True:
                try:
                    return await self._legacy(method, params or {}, credential)
                except NoSessions:
                    self._sessions_refused = True
                    log.info("upstream %r refuses sessions: session-era agents are served on 2026-07-28", self.name)
            return await self._modern(method, params or {}, credential)
        return await self._legacy(method, params or {}, credential)

    async def list_all(
        self, method: str, key: str, *, credential: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """Follow `nextCursor` through a paginated list method."""
        items: list[dict[str, Any]] = []
        params: dict[str, Any] = {}
        for _ in range(1000):  # a bound, not a limit anyone should reach
            result = await self.request(method, params, credential=credential)
            page = result.get(key)
            if not isinstance(page, list):
                raise UpstreamError(self.name, f"{method} answered without a {key!r} list")
            items.extend(page)
            cursor = result.get("nextCursor")
            if not cursor:
                return items
            params = {"cursor": cursor}
        raise UpstreamError(self.name, f"{method} paginated past 1000 pages")

    # --- change notifications ------------------------------------------------------

    async def changes(self, credential: Mapping[str, str] | None = None) -> AsyncIterator[str]:
        """The upstream's list-change notifications, from one long-lived stream.

        Yields `LISTENING` once the stream is open, then the method of each
        `notifications/{tools,prompts,resources}/list_changed` as it arrives. On
        2026-07-28 the stream is a `subscriptions/listen` request (acknowledged
        first); on the session protocol it is the session's standalone GET stream.
        Ends when the upstream closes the stream gracefully; raises `NoChangeStream`
        when the upstream has none, `UpstreamError` or `UpstreamRPCError` otherwise.
        The stream has no read timeout (it is idle by nature): only connecting is bounded.
        """
        era = self._era or await self._discover(credential)
        if era == "modern":
            request_id = next(self._ids)
            meta = {PROTOCOL_VERSION_META_KEY: MODERN_VERSION, CLIENT_CAPABILITIES_META_KEY: {}, CLIENT_INFO_META_KEY: CLIENT_INFO}
            wanted = {"toolsListChanged": True, "promptsListChanged": True, "resourcesListChanged": True}
            body = {"jsonrpc": "2.0", "id": request_id, "method": "subscriptions/listen", "params": {"notifications": wanted, "_meta": meta}}
            headers = {
                "accept": _ACCEPT,
                "content-type": "application/json",
                MCP_PROTOCOL_VERSION_HEADER: MODERN_VERSION,
                MCP_METHOD_HEADER: "subscriptions/listen",
                **(credential or {}),
            }
            opened = self._http.post(self.config.url, data=jsonwire.dumps(body), headers=headers, timeout=self._stream_timeout())
        else:
            # The listing session's own stream: an upstream tells the sessions it serves.
            key = _session_key(credential, RELAYED_CAPABILITIES)
            session = await self._legacy_session(key, credential, RELAYED_CAPABILITIES)
            request_id = None
            headers = {"accept": "text/event-stream", MCP_PROTOCOL_VERSION_HEADER: LEGACY_VERSION, **(credential or {})}
            if session.session_id:
                headers[SESSION_HEADER] = session.session_id
            opened = self._http.get(self.config.url, headers=headers, timeout=self._stream_timeout())
        try:
            async with opened as response:
                budget = _Budget(response, self.config)  # per event: the stream itself has no end
                if era == "legacy" and response.status == 404:
                    self._sessions.pop(key, None)  # the upstream forgot the session
                if response.status == 405:
                    raise NoChangeStream(self.name, "offers no change notification stream (HTTP 405)")
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    message = await _decode(await _read_body(response, budget), self.name)
                    if message is not None and isinstance(message.get("error"), dict):
                        if message["error"].get("code") == _METHOD_NOT_FOUND:
                            raise NoChangeStream(self.name, "does not serve subscriptions/listen")
                        raise UpstreamRPCError(message["error"])
                    raise UpstreamError(self.name, f"HTTP {response.status}: no change notification stream")
                if era == "legacy":
                    yield LISTENING
                async for message in _sse_messages(response, budget, per_event=True):
                    method = message.get("method")
                    if method == _ACKNOWLEDGED:
                        yield LISTENING
                    elif method in _CHANGE_METHODS:
                        yield str(method)
                    elif request_id is not None and message.get("id") == request_id:
                        if isinstance(message.get("error"), dict):
                            raise UpstreamRPCError(message["error"])
                        return  # the upstream closed the subscription gracefully
        except asyncio.TimeoutError:
            raise UpstreamError(self.name, f"no change stream within {self.config.timeout_seconds}s") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(self.name, f"change stream dropped ({type(exc).__name__})") from None
        except (ValueError, HttpProcessingError):  # a line over aiohttp's line limit (LineTooLong, see `_sse_lines`)
            raise UpstreamError(self.name, "sent a change-stream line longer than the gateway reads") from None
        raise UpstreamError(self.name, "change stream ended")

    def _stream_timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None, connect=self.config.timeout_seconds, sock_read=None)

    # --- era discovery -----------------------------------------------------------

    async def _discover(self, credential: Mapping[str, str] | None) -> str:
        async with self._era_lock:
            if self._era is not None:
                return self._era
            try:
                await self._modern("server/discover", {}, credential)
                self._era = "modern"
            except (UpstreamRPCError, UpstreamError) as exc:
                if isinstance(exc, UpstreamError) and (
                    exc.transport or isinstance(exc, ResultTooLarge) or exc.status in (401, 403)
                ):
                    raise  # nothing learnt about the era (a refused credential says nothing of it)
                self._era = "legacy"
            return self._era

    # --- 2026-07-28 --------------------------------------------------------------

    async def _modern(
        self, method: str, params: dict[str, Any], credential: Mapping[str, str] | None
    ) -> dict[str, Any]:
        meta = dict(params.get("_meta") or {})
        meta[PROTOCOL_VERSION_META_KEY] = MODERN_VERSION
        # A call carries its agent's own capabilities (a 2026-07-28 agent's in the relayed `_meta`,
        # a session-era agent's from its session); a listing, shared by every agent, what the
        # gateway can relay to one (`RELAYED_CAPABILITIES`).
        if method in _LISTINGS:
            meta.setdefault(CLIENT_CAPABILITIES_META_KEY, RELAYED_CAPABILITIES)
        else:
            events = call_events.get()
            meta.setdefault(CLIENT_CAPABILITIES_META_KEY, events.capabilities if events is not None else {})
            if events is not None and events.log_level is not None:
                meta.setdefault(LOG_LEVEL_META_KEY, events.log_level)
        meta.setdefault(CLIENT_INFO_META_KEY, CLIENT_INFO)
        body = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": {**params, "_meta": meta}}
        headers = {
            "accept": _ACCEPT,
            "content-type": "application/json",
            MCP_PROTOCOL_VERSION_HEADER: MODERN_VERSION,
            MCP_METHOD_HEADER: method,
        }
        name_key = NAME_BEARING_METHODS.get(method)
        if name_key is not None and isinstance(params.get(name_key), str):
            headers[MCP_NAME_HEADER] = encode_header_value(params[name_key])
        if method == "tools/call":
            header_map = self._param_headers.get(str(params.get("name")))
            if header_map and isinstance(params.get("arguments"), dict):
                headers.update(mcp_param_headers(header_map, params["arguments"]))
        if credential:
            headers.update(credential)
        tracing.inject(headers)
        response, _ = await self._post(body, headers)
        return response

    # --- 2025-11-25 and older ----------------------------------------------------

    async def _legacy(
        self, method: str, params: dict[str, Any], credential: Mapping[str, str] | None
    ) -> dict[str, Any]:
        events = call_events.get()
        pinned: str | None = None
        if events is not None and events.agent_session is not None and method not in _LISTINGS:
            # A session-era agent's own session has its own upstream session, declaring what the agent
            # declared: what the upstream keeps per session (a log level, subscriptions) stays that
            # agent's. Opened at the agent's `initialize` and the same on every replica when it could
            # be (`agent_upstreams`, seeded here on first use); else opened here, for this replica only.
            capabilities = events.capabilities
            key = _session_key(credential, capabilities, events.agent_session)
            pinned = agent_upstreams.get().get(self.name)
            if pinned is not None and key not in self._sessions and key not in self._opening:
                self._sessions[key] = _LegacySession(pinned)
        else:
            # The shared session: the catalog's listings (whoever's call set them off: the catalog
            # is every agent's) and change stream, and agents with no session of their own. It
            # declares what the gateway can relay (see RELAYED_CAPABILITIES).
            capabilities = RELAYED_CAPABILITIES
            key = _session_key(credential, capabilities)
        for attempt in (1, 2):
            session = await self._legacy_session(key, credential, capabilities)
            headers = {"accept": _ACCEPT, "content-type": "application/json", MCP_PROTOCOL_VERSION_HEADER: LEGACY_VERSION}
            if session.session_id:
                headers[SESSION_HEADER] = session.session_id
            if credential:
                headers.update(credential)
            tracing.inject(headers)
            body = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
            try:
                result, _ = await self._post(body, headers)
                return result
            except asyncio.CancelledError:
                # The agent cancelled. The session protocol's upstream is told so (2026-07-28 ones
                # take the closed request as the signal), beside the cancellation, which goes on.
                self._tell_cancelled(body["id"], headers)
                raise
            except UpstreamError as exc:
                # 404 on a session means the upstream forgot it (restart, idle expiry): open a new one once.
                if attempt == 1 and exc.status == 404 and session.session_id:
                    if self._sessions.get(key) is session:  # not one a concurrent request reopened already
                        del self._sessions[key]
                    if session.session_id == pinned:
                        log.info("upstream %r forgot an agent's session: that agent continues on a new session of this "
                                 "replica's, without the level, subscriptions and stream it had", self.name)
                    continue
                raise
        raise AssertionError("unreachable")

    def _tell_cancelled(self, request_id: object, headers: dict[str, str]) -> None:
        notice = {
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": request_id, "reason": "cancelled by the agent"},
        }
        task = asyncio.get_running_loop().create_task(self._courtesy(notice, headers))
        self._notices.add(task)
        task.add_done_callback(self._notices.discard)

    async def _courtesy(self, notice: dict[str, Any], headers: dict[str, str]) -> None:
        try:
            await self._notify(notice, headers)
        except UpstreamError as exc:  # best effort: the upstream's request may have ended anyway
            log.info("telling %s of a cancellation failed: %s", self.name, exc)

    async def _legacy_session(
        self, key: str, credential: Mapping[str, str] | None, capabilities: Mapping[str, Any] | None = None
    ) -> _LegacySession:
        session = self._sessions.get(key)
        if session is not None:
            return session
        if self._sessionless():
            return _NO_SESSION  # what another handshake would open: nothing the upstream keeps
        # One handshake per credential at a time: concurrent first uses (a refresh, the change
        # stream, a call) would otherwise each open a session and keep only the last, and the
        # change stream could end up on a session nothing else uses.
        lock = self._opening.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                session = self._sessions.get(key)
                if session is None:
                    session = await self._open_legacy_session(key, credential, capabilities or {})
                return session
        finally:
            if not lock.locked() and self._opening.get(key) is lock:
                del self._opening[key]

    async def _open_legacy_session(
        self, key: str, credential: Mapping[str, str] | None, capabilities: Mapping[str, Any]
    ) -> _LegacySession:
        if len(self._sessions) >= _MAX_LEGACY_SESSIONS:
            self._sessions.pop(next(iter(self._sessions)))
        session = await self._handshake(credential, capabilities)
        self._sessions[key] = session
        return session

    async def _handshake(self, credential: Mapping[str, str] | None, capabilities: Mapping[str, Any]) -> _LegacySession:
        """`initialize` and `notifications/initialized`: a new upstream session, kept by nobody yet."""
        headers = {"accept": _ACCEPT, "content-type": "application/json"}
        if credential:
            headers.update(credential)
        init = {
            "jsonrpc": "2.0",
            "id": next(self._ids),
            "method": "initialize",
            "params": {"protocolVersion": LEGACY_VERSION, "capabilities": dict(capabilities), "clientInfo": CLIENT_INFO},
        }
        try:
            result, response_headers = await self._post(init, headers)
        except UpstreamRPCError as exc:
            raise NoSessions(self.name, f"refused initialize ({exc})") from None
        except UpstreamError as exc:
            if exc.status in (400, 404, 405):
                raise NoSessions(self.name, f"refused initialize (HTTP {exc.status})") from None
            raise
        session_id = response_headers.get(SESSION_HEADER)
        self._sessionless_until = 0.0 if session_id else asyncio.get_running_loop().time() + SESSIONLESS_RECHECK_SECONDS
        version = str(result.get("protocolVersion") or LEGACY_VERSION)
        headers[MCP_PROTOCOL_VERSION_HEADER] = version
        if session_id:
            headers[SESSION_HEADER] = session_id
        await self._notify({"jsonrpc": "2.0", "method": "notifications/initialized"}, headers)
        return _LegacySession(session_id)

    # --- an agent's own upstream sessions, the same on every replica (upstream_sessions.py) ---

    async def open_session(self, credential: Mapping[str, str] | None, capabilities: Mapping[str, Any]) -> str | None:
        """A new upstream session for one agent session, declaring what that agent declared.

        Its id, or None when this upstream keeps no session: a 2026-07-28 upstream that refuses the
        session protocol, or one that answers `initialize` without an id. Not kept here: the id travels
        sealed in the agent's session id, and each replica seeds it on first use (`_legacy`).
        """
        era = self._era or await self._discover(credential)
        if era == "modern" and self._sessions_refused or self._sessionless():
            return None
        try:
            session = await self._handshake(credential, capabilities)
        except NoSessions:
            if era != "modern":
                raise
            self._sessions_refused = True
            log.info("upstream %r refuses sessions: session-era agents are served on 2026-07-28", self.name)
            return None
        return session.session_id

    def _sessionless(self) -> bool:
        """Did this upstream answer `initialize` without a session id lately? Then it keeps no session: an
        agent's requests need no handshake of their own, and `initialize` opens nothing for an agent.
        Asked again after SESSIONLESS_RECHECK_SECONDS, in case a redeployed upstream keeps them now."""
        return self._sessionless_until > asyncio.get_running_loop().time()

    async def end_session(self, session_id: str, credential: Mapping[str, str] | None) -> int:
        """DELETE one upstream session (the agent ended its own): the upstream's HTTP status."""
        for key, session in list(self._sessions.items()):  # this replica's seed of it, if any
            if session.session_id == session_id:
                del self._sessions[key]
        headers = {MCP_PROTOCOL_VERSION_HEADER: LEGACY_VERSION, SESSION_HEADER: session_id, **(credential or {})}
        try:
            async with self._slots.hold(), self._deadline(), self._wire.request(
                "DELETE", b"", headers, self.config.timeout_seconds
            ) as response:
                await _read_body(response, _Budget(response, self.config))
                return response.status
        except (asyncio.TimeoutError, http1.HTTPError, aiohttp.ClientError) as exc:
            raise UpstreamError(self.name, f"ending a session failed ({_failure(exc)})", transport=True) from None

    async def session_messages(
        self, session_id: str, credential: Mapping[str, str] | None, opened: Callable[[], None]
    ) -> AsyncIterator[dict[str, Any]]:
        """What the upstream sends on one session's standalone GET stream, message by message, until it ends.

        `opened` is called once the stream is open. List changes go to `on_change`, as on any other
        stream, and are not yielded. Raises `NoChangeStream` when the upstream has no such stream
        (405), `UpstreamError` with its status otherwise (404: the session is forgotten; 409: another
        stream of the session is open). Only connecting is bounded: the stream is idle by nature.
        """
        headers = {"accept": "text/event-stream", MCP_PROTOCOL_VERSION_HEADER: LEGACY_VERSION, SESSION_HEADER: session_id,
                   **(credential or {})}
        try:
            # On the pooled wire (one agent session's stream is opened and closed with it: a new aiohttp
            # request each time cost several times as much); bounded until its head arrives, then idle by nature.
            async with asyncio.timeout(self.config.timeout_seconds) as opening, self._wire.request(
                "GET", b"", headers, self.config.timeout_seconds
            ) as response:
                opening.reschedule(None)
                if response.status == 405:
                    raise NoChangeStream(self.name, "offers no session stream (HTTP 405)")
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    raise UpstreamError(self.name, f"HTTP {response.status}: no session stream", status=response.status)
                opened()
                async for message in _sse_messages(response, _Budget(response, self.config), per_event=True):
                    method = message.get("method")
                    if method in _CHANGE_METHODS and "id" not in message:
                        if self._on_change is not None:
                            self._on_change(str(method))
                    else:
                        yield message
        except asyncio.TimeoutError:
            raise UpstreamError(self.name, f"no session stream within {self.config.timeout_seconds}s", transport=True) from None
        except (http1.HTTPError, aiohttp.ClientError) as exc:
            raise UpstreamError(self.name, f"session stream dropped ({_failure(exc)})", transport=True) from None
        except (ValueError, HttpProcessingError):  # a line over aiohttp's line limit (LineTooLong, see `_sse_lines`)
            raise UpstreamError(self.name, "sent a session-stream line longer than the gateway reads") from None

    async def answer_on_session(self, session_id: str, credential: Mapping[str, str] | None, reply: dict[str, Any]) -> None:
        """POST the answer to a request the upstream sent on a session's GET stream."""
        headers = {"accept": _ACCEPT, "content-type": "application/json", MCP_PROTOCOL_VERSION_HEADER: LEGACY_VERSION,
                   SESSION_HEADER: session_id, **(credential or {})}
        try:
            async with asyncio.timeout(self.config.timeout_seconds):
                await self._send_answer(reply, headers)
        except TimeoutError:
            raise UpstreamError(self.name, "answering its request timed out", transport=True) from None

    # --- the wire ------------------------------------------------------------------

    async def _post(self, body: dict[str, Any], headers: dict[str, str]) -> tuple[dict[str, Any], Mapping[str, str]]:
        request_id = body["id"]
        raw = b""
        message: dict[str, Any] | None = None
        try:
            async with self._slots.hold(), self._deadline() as deadline, self._wire.request(
                "POST", jsonwire.dumps(body), headers, self.config.timeout_seconds
            ) as response:
                deadline.touch()
                budget = _Budget(response, self.config)
                ctype = response.headers.get("content-type", "")
                if ctype.startswith("text/event-stream"):
                    message = await self._read_sse_response(response, request_id, budget, deadline, headers)
                elif response.status >= 400 and not ctype.startswith("application/json"):
                    raise UpstreamError(self.name, f"HTTP {response.status} from {self.config.url}", status=response.status)
                else:
                    raw = await _read_body(response, budget)
            if raw:  # parsed after the slot and the connection are given back
                message = await _decode(raw, self.name)
            if message is None:
                raise UpstreamError(self.name, f"HTTP {response.status}: no JSON-RPC response", status=response.status)
            return _result_of(message, self.name, response.status), response.headers
        except asyncio.TimeoutError:  # connecting (the wire's connect timeout); the rest is `_Deadline`'s
            raise UpstreamError(self.name, f"no connection within {self.config.timeout_seconds}s", transport=True) from None
        except http1.InvalidRequest:
            raise UpstreamError(self.name, "a request header holds a line break (not sent)", transport=True) from None
        except (http1.NotAnswered, aiohttp.ClientConnectionError) as exc:
            raise UpstreamError(self.name, f"unreachable ({_failure(exc)})", transport=True) from None
        except (http1.HTTPError, aiohttp.ClientError) as exc:
            raise UpstreamError(self.name, f"bad HTTP exchange ({_failure(exc)})") from None
        except (ValueError, HttpProcessingError):  # a line over the line limit (LineTooLong, see `_sse_lines`)
            raise UpstreamError(self.name, "sent an event line longer than the gateway reads") from None

    async def _read_sse_response(
        self, response: http1.Response, request_id: object, budget: _Budget, deadline: _Deadline, headers: dict[str, str]
    ) -> dict[str, Any] | None:
        """Read server-sent events until the JSON-RPC response to `request_id` arrives.

        Every message restarts the idle clock. Progress and log messages go to the
        current call's `CallEvents`, list changes to `on_change` (an upstream may
        announce them on any stream it has open, this one included); all of it is
        part of the answer and spends the same budget.
        """
        events = call_events.get()
        async for message in _sse_messages(response, budget):
            deadline.touch()
            if message.get("id") == request_id and ("result" in message or "error" in message):
                return message
            method = message.get("method")
            params = message.get("params")
            if isinstance(method, str) and "id" in message:
                # The upstream asks its client something (session protocol): the agent answers, or is said unable to.
                await self._answer(message, events, deadline, headers)
            elif method in _CHANGE_METHODS:
                if self._on_change is not None:
                    self._on_change(str(method))
            elif events is not None and isinstance(params, dict):
                if method == "notifications/progress":
                    await events.progress(params)
                elif method == "notifications/message":
                    await events.log(params)
        return None

    async def _answer(self, request: dict[str, Any], events: CallEvents | None, deadline: _Deadline, headers: dict[str, str]) -> None:
        method, params = str(request["method"]), request.get("params")
        reply: dict[str, Any] = {"jsonrpc": "2.0", "id": request["id"]}
        deadline.hold()
        try:
            if events is None:
                raise NotRelayable(method)
            reply["result"] = await events.ask(method, params if isinstance(params, dict) else {})
        except NotRelayable:
            reply["error"] = {"code": _METHOD_NOT_FOUND, "message": f"{method} cannot reach this call's client through the gateway"}
        except AgentError as exc:
            reply["error"] = exc.error
        finally:
            deadline.touch()
        await self._send_answer(reply, headers)

    async def _send_answer(self, reply: dict[str, Any], headers: dict[str, str]) -> None:
        """POST the client's answer on the call's session. No slot: the call it belongs to holds one."""
        try:
            async with self._wire.request("POST", jsonwire.dumps(reply), headers, self.config.timeout_seconds) as response:
                await _read_body(response, _Budget(response, self.config))
        except (http1.HTTPError, aiohttp.ClientError) as exc:
            raise UpstreamError(self.name, f"answering its request failed ({_failure(exc)})") from None

    async def _notify(self, body: dict[str, Any], headers: dict[str, str]) -> None:
        try:
            async with self._slots.hold(), self._deadline(), self._wire.request(
                "POST", jsonwire.dumps(body), headers, self.config.timeout_seconds
            ) as response:
                await _read_body(response, _Budget(response, self.config))
        except (asyncio.TimeoutError, http1.HTTPError, aiohttp.ClientError) as exc:
            raise UpstreamError(self.name, f"handshake failed ({_failure(exc)})") from None


def _session_key(credential: Mapping[str, str] | None, capabilities: Mapping[str, Any], agent_session: str | None = None) -> str:
    """Which session towards a session-protocol upstream a request goes on.

    One per credential and declared capabilities (what a client declared at `initialize`
    decides what the upstream may ask it), and one per agent session when the agent has one.
    """
    key = _credential_key(credential)
    if capabilities:
        key += ":" + hashlib.sha256(json.dumps(capabilities, sort_keys=True).encode()).hexdigest()[:32]
    if agent_session is not None:
        key += ":" + hashlib.sha256(agent_session.encode()).hexdigest()[:32]
    return key


def _credential_key(credential: Mapping[str, str] | None) -> str:
    if not credential:
        return ""
    joined = "\n".join(f"{k}:{v}" for k, v in sorted(credential.items()))
    return hashlib.sha256(joined.encode()).hexdigest()


def _failure(exc: Exception) -> str:
    """A transport failure's name for a message: the wire's label (aiohttp's word for it), or the error's type."""
    return exc.label if isinstance(exc, http1.HTTPError) else type(exc).__name__


async def _read_body(response: http1.Response, budget: _Budget) -> bytes:
    """The whole body, chunk by chunk as it arrives, each spent against `budget` before it is kept.

    Chunks are kept apart until the end, so an answer cut off holds no more than
    the bytes read (a growing buffer would copy itself on the way).
    """
    declared = response.content_length
    if declared is not None and declared > budget.limit and "content-encoding" not in response.headers:
        budget.spend(declared)  # refused before a byte of it is read
    whole = http1.arrived(response.content)
    if whole is not None:
        budget.spend(len(whole))
        return whole
    chunks: list[bytes] = []
    async for chunk in response.content.iter_any():
        budget.spend(len(chunk))
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _parse(data: bytes, loads: Callable[[bytes], Any]) -> Any:
    """`loads(data)`, in a worker thread when `data` is large.

    json.loads holds the GIL from start to end, so the thread does not parse beside
    the event loop; it only lets the loop run between the steps of a parse (bytes
    to str, then the scan). Measured (benchmarks/results/large-results-2026-12-01.md):
    the worst stall for one 47 MiB text went from 187 to 118 ms, and for 16 MiB of
    many small items not at all. What bounds the stall is `maxResultBytes`.
    """
    if len(data) > _THREAD_PARSE_BYTES:
        return await asyncio.to_thread(loads, data)
    return loads(data)


def _loads_event(data: bytes) -> Any:
    return jsonwire.loads(data.decode("utf-8", "replace"))


async def _decode(raw: bytes, connection: str) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        message = await _parse(raw, jsonwire.loads)
    except ValueError:  # jsonwire.loads: too deep a nesting is one too
        raise UpstreamError(connection, "answered something that is not JSON") from None
    if not isinstance(message, dict):
        raise UpstreamError(connection, "answered JSON that is not a JSON-RPC response")
    return message


def _result_of(message: dict[str, Any], connection: str, status: int) -> dict[str, Any]:
    if isinstance(message.get("error"), dict):
        raise UpstreamRPCError(message["error"])
    result = message.get("result")
    if not isinstance(result, dict):
        raise UpstreamError(connection, f"HTTP {status}: response has neither result nor error", status=status)
    return result


async def _sse_messages(
    response: http1.Response, budget: _Budget, *, per_event: bool = False
) -> AsyncIterator[dict[str, Any]]:
    """Every JSON-RPC message of a server-sent event stream, until it ends (unparsable events are skipped).

    The budget covers the whole response, or each event when `per_event` (an endless stream).
    """
    data_lines: list[bytes] = []
    async for line in _sse_lines(response, budget):
        if line.startswith(b"data:"):
            data_lines.append(line[5:].lstrip(b" "))
        elif line == b"":
            if per_event:
                budget.refill()
            if not data_lines:
                continue
            payload, data_lines = b"\n".join(data_lines), []
            try:
                message = await _parse(payload, _loads_event)
            except ValueError:
                continue
            if isinstance(message, dict):
                yield message


async def _sse_lines(response: http1.Response, budget: _Budget) -> AsyncIterator[bytes]:
    """The lines of an event stream without their line ends, split here rather than by aiohttp's readline.

    Every piece is spent against `budget` as it arrives, so one endless line stops
    at `maxResultBytes` like everything else; and a line is held to aiohttp's own
    line limit (twice the session's read buffer, as its readline holds it), with
    the same `LineTooLong`.
    """
    line_limit = response.content.get_read_buffer_limits()[1]
    partial: list[bytes] = []  # the start of a line that goes on in the next chunk
    partial_size = 0
    async for chunk in response.content.iter_any():
        start = 0
        while (end := chunk.find(b"\n", start)) != -1:
            budget.spend(end + 1 - start)
            if partial_size + end + 1 - start > line_limit:
                raise LineTooLong(chunk[start : start + 100] + b"...", line_limit)
            line = chunk[start:end]
            if partial:
                partial.append(line)
                line = b"".join(partial)
                partial.clear()
                partial_size = 0
            yield line.rstrip(b"\r")
            start = end + 1
        if start < len(chunk):
            budget.spend(len(chunk) - start)
            partial_size += len(chunk) - start
            if partial_size > line_limit:
                raise LineTooLong(chunk[start : start + 100] + b"...", line_limit)
            partial.append(chunk[start:])
    if partial:
        yield b"".join(partial).rstrip(b"\r")
