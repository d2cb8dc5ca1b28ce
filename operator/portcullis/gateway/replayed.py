"""The SDK's answers that depend on nothing in the request but its id, kept and replayed.

A session-era client opens a session with `initialize` and, if it keeps none of
its own, ends it with DELETE. The SDK serves both statelessly, building a whole
server per request: about a millisecond of CPU each, more than the tool call
between them. LangChain's MCP adapters open a session for every tool call by
default, so for their users these two dominate what the gateway costs.

Neither answer depends on the request beyond its id: `initialize` answers with
the version negotiated from the one asked for, the server's capabilities, its
info and instructions (all of the config), and a stateless DELETE is refused
the same way every time. So the first answer of each kind is the SDK's, kept
while the config is the same object, and later requests get it again, under
their own request id. Only a request the SDK would accept as it stands is
answered from here (`initialize_request`); anything else goes to the SDK,
whose answers to bad requests stay the only ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import mcp_types as types
from starlette.types import Message, Send

MAX_KEPT: Final = 16
"""Answers kept per config (one per protocol version asked for, and DELETE): a bound for odd clients."""
_ALLOWED_KEYS: Final = frozenset({"jsonrpc", "id", "method", "params"})


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    """The body; for `initialize` the JSON-RPC `result` is kept instead (`result`), to be sent under each id."""
    result: dict[str, Any] | None = None


class Replayed:
    def __init__(self, config: Callable[[], object]):
        self._config = config  # the gateway's config, read when used: a swap changes what is answered
        self._of: object = None
        self._answers: dict[str, _Answer] = {}

    def _kept(self) -> dict[str, _Answer]:
        config = self._config()
        if config is not self._of:
            self._answers, self._of = {}, config
        return self._answers

    async def replay(self, key: str, send: Send, request_id: Any = None) -> bool:
        """Send the kept answer for `key` (under `request_id`), if there is one."""
        answer = self._kept().get(key)
        if answer is None:
            return False
        body = answer.body
        if answer.result is not None:
            message = {"jsonrpc": "2.0", "id": request_id, "result": answer.result}
            body = b"event: message\r\ndata: " + json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode() + b"\r\n\r\n"
        await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers})
        await send({"type": "http.response.body", "body": body})
        return True

    def keeping(self, key: str, send: Send, *, sse_result: bool = False) -> Send:
        """`send`, keeping the answer it passes on for `key` once it is complete.

        `sse_result`: the answer is one JSON-RPC result on an event stream (`initialize`); only a
        200 carrying a result is kept, and its result rather than its bytes."""
        kept = self._kept()
        config = self._of
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def passing(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.start":
                start.update(status=message["status"], headers=list(message.get("headers", [])))
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False) and start and self._of is config and len(kept) < MAX_KEPT:
                    answer = _answer(start["status"], start["headers"], b"".join(chunks), sse_result)
                    if answer is not None:
                        kept[key] = answer

        return passing


def _answer(status: int, headers: list[tuple[bytes, bytes]], body: bytes, sse_result: bool) -> _Answer | None:
    headers = [(name, value) for name, value in headers if name.lower() != b"mcp-session-id"]
    if not sse_result:
        return _Answer(status, headers, body)
    if status != 200:
        return None
    data = [line[5:].strip() for line in body.decode("utf-8", "replace").splitlines() if line.startswith("data:")]
    try:
        message = json.loads(data[0]) if len(data) == 1 else None
    except ValueError:
        return None
    if not isinstance(message, dict) or not isinstance(message.get("result"), dict):
        return None
    return _Answer(status, headers, b"", message["result"])


def initialize_request(message: Any) -> tuple[Any, str] | None:
    """(request id, protocol version asked for) of a well-formed `initialize` the SDK would answer
    as it answers any other asking for that version; None for anything else."""
    if not isinstance(message, dict) or message.keys() - _ALLOWED_KEYS or message.get("jsonrpc") != "2.0":
        return None
    request_id = message.get("id")
    if message.get("method") != "initialize" or isinstance(request_id, bool) or not isinstance(request_id, (int, str)):
        return None
    try:
        params = types.InitializeRequestParams.model_validate(message.get("params"), by_name=False)
    except ValueError:
        return None
    return request_id, params.protocol_version
