"""An inbox-like upstream MCP server: the thing Portcullis stands in front of.

The demo, the gateway tests and the benchmarks need an upstream that looks like
a real connector - about thirty tools with real descriptions and schemas, so
that exposing two of them is a visible reduction in schema tokens - and that
can prove what reached it. So this server:

- keeps a small mailbox in memory, seeded deterministically (same data on every
  start, no clock, no randomness), so tests can assert on exact results;
- records every `tools/call` it receives with the `Authorization` header it
  arrived with (`CallRecord`): a test shows that a denied call never arrived
  and that alice's call carried alice's credential, not bob's;
- optionally demands credentials (`required_auth`, header value -> user), and
  answers a call without a known one the way a real upstream does: an error
  result saying 401, not a protocol error;
- has the awkward cases a gateway must relay untouched: mixed content (text,
  image, embedded resource), `isError: true`, `structuredContent` with an
  `outputSchema`, and a slow tool (`sleep_ms`) for timeouts;
- declares `tools.listChanged` in both protocol eras, and offers two prompts,
  two resources, two resource templates and completions of their arguments, so
  deny-by-default on prompts, resources and templates can be tested.

It is built on the low-level SDK `Server`, which serves the 2026-07-28
protocol and the session-based 2025-11-25/2025-06-18 protocol from one
Streamable HTTP endpoint (`/mcp`).

Use it as a library (`build_app()`), or as a process::

    python examples/inbox/server.py --host 127.0.0.1 --port 8765

which prints one line, `inbox MCP server ready at http://127.0.0.1:8765/mcp`,
once it accepts connections (`--port 0` picks a free port and prints it).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import json
import sys
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import mcp_types as types
import uvicorn
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import NotificationOptions, Server
from mcp.server.models import InitializationOptions
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler
from mcp.shared.exceptions import MCPError
from mcp_types.jsonrpc import INVALID_PARAMS
from starlette.applications import Starlette
from starlette.requests import Request

SERVER_NAME = "inbox"
SERVER_VERSION = "1.0.0"
MAILBOX_OWNER = "alice@example.com"
MAX_SLEEP_MS = 60_000

# --- what arrived -------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedCall:
    """One `tools/call` as this server received it."""

    tool: str
    arguments: dict[str, Any]
    authorization: str | None
    """The `Authorization` header of the HTTP request that carried the call (None: absent)."""


@dataclass
class CallRecord:
    """Every tools/call received, in arrival order.

    Appended to from the server's thread and read from the test's, hence the lock.
    """

    _calls: list[RecordedCall] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def append(self, call: RecordedCall) -> None:
        with self._lock:
            self._calls.append(call)

    @property
    def calls(self) -> list[RecordedCall]:
        with self._lock:
            return list(self._calls)

    def tools(self) -> list[str]:
        return [c.tool for c in self.calls]

    def calls_of(self, tool: str) -> list[RecordedCall]:
        return [c for c in self.calls if c.tool == tool]

    def clear(self) -> None:
        with self._lock:
            self._calls.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._calls)


def request_headers(ctx: ServerRequestContext[Any, Any]) -> Mapping[str, str]:
    """The HTTP headers of the request that carried this message (empty off HTTP).

    The SDK hands every handler the Starlette `Request` the message arrived in
    as `ctx.request`, in both protocol eras (on the session protocol, the POST
    that carried this particular JSON-RPC message, not the one that opened the
    session). Starlette's `Headers` is case-insensitive.
    """
    request = ctx.request
    if isinstance(request, Request):
        return request.headers
    return {}


# --- the mailbox --------------------------------------------------------------------


@dataclass
class Attachment:
    id: str
    filename: str
    mime_type: str
    data: bytes


@dataclass
class Mail:
    id: str
    thread_id: str
    folder: str
    sender: str
    to: list[str]
    subject: str
    body: str
    date: str
    cc: list[str] = field(default_factory=list)
    read: bool = False
    starred: bool = False
    labels: set[str] = field(default_factory=set)
    attachments: list[Attachment] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "threadId": self.thread_id,
            "from": self.sender,
            "to": list(self.to),
            "subject": self.subject,
            "date": self.date,
            "snippet": self.body[:80],
            "read": self.read,
            "starred": self.starred,
            "labels": sorted(self.labels),
            "hasAttachments": bool(self.attachments),
        }

    def full(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "cc": list(self.cc),
            "folder": self.folder,
            "body": self.body,
            "attachments": [
                {"id": a.id, "filename": a.filename, "mimeType": a.mime_type, "size": len(a.data)}
                for a in self.attachments
            ],
        }


@dataclass
class Draft:
    id: str
    to: list[str]
    subject: str
    body: str
    cc: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "to": list(self.to), "cc": list(self.cc), "subject": self.subject, "body": self.body}


@dataclass
class Contact:
    name: str
    email: str
    company: str = ""
    phone: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "email": self.email, "company": self.company, "phone": self.phone}


@dataclass
class Event:
    id: str
    title: str
    start: str
    end: str
    attendees: list[str]
    location: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "start": self.start,
            "end": self.end,
            "attendees": list(self.attendees),
            "location": self.location,
        }


@dataclass
class Filter:
    id: str
    sender: str | None
    subject_contains: str | None
    action: str
    label: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "from": self.sender,
            "subjectContains": self.subject_contains,
            "action": self.action,
            "label": self.label,
        }


# A 1x1 PNG and a tiny PDF stand in for attachments; both are valid files.
PIXEL_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
)
TINY_PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"


@dataclass
class Mailbox:
    owner: str
    mails: dict[str, Mail]
    drafts: dict[str, Draft]
    labels: dict[str, str]
    contacts: dict[str, Contact]
    events: dict[str, Event]
    filters: dict[str, Filter]
    signature: str
    counter: int = 100

    def next_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{self.counter}"

    def mail(self, mail_id: str) -> Mail:
        try:
            return self.mails[mail_id]
        except KeyError:
            raise ToolFailure(f"no mail with id {mail_id!r}") from None

    def in_folder(self, folder: str) -> list[Mail]:
        # Newest first, as every mail client lists them; ISO dates sort as strings.
        return sorted((m for m in self.mails.values() if m.folder == folder), key=lambda m: m.date, reverse=True)


def seed_mailbox() -> Mailbox:
    """The same small mailbox on every call."""
    me = MAILBOX_OWNER
    raw = [
        ("m-001", "t-001", "inbox", "bob@example.com", "Q3 planning offsite", "Hi Alice, can we lock the dates for the Q3 planning offsite? I suggest the 14th-15th in Lisbon.", "2026-03-02T09:12:00Z", {"work"}, []),
        ("m-002", "t-001", "inbox", "carol@example.com", "Re: Q3 planning offsite", "14th-15th works for me. I'll book the venue if nobody objects by Friday.", "2026-03-02T11:40:00Z", {"work"}, []),
        ("m-003", "t-002", "inbox", "billing@cloudhost.example", "Your invoice for February", "Your invoice INV-2026-0219 of 1,284.00 EUR is attached. Payment is due on 2026-03-16.", "2026-03-01T06:00:00Z", {"finance"}, [Attachment("a-1", "INV-2026-0219.pdf", "application/pdf", TINY_PDF)]),
        ("m-004", "t-003", "inbox", "dave@example.org", "Lunch on Thursday?", "Are you free for lunch on Thursday? The new ramen place near the office opened.", "2026-03-03T08:05:00Z", {"personal"}, []),
        ("m-005", "t-004", "inbox", "security@example.com", "New sign-in from Firefox on Linux", "We noticed a new sign-in to your account. If this was you, you can ignore this message.", "2026-03-03T21:17:00Z", set(), []),
        ("m-006", "t-005", "inbox", "erin@example.com", "Design review: onboarding flow", "Attached are the mockups for the new onboarding flow. Feedback welcome before Wednesday's review.", "2026-03-04T10:30:00Z", {"work"}, [Attachment("a-2", "onboarding-mockup.png", "image/png", PIXEL_PNG)]),
        ("m-007", "t-006", "inbox", "travel@airline.example", "Booking confirmation LIS-7Q2K", "Your flight to Lisbon on 2026-07-13 is confirmed. Booking reference LIS-7Q2K.", "2026-03-04T14:02:00Z", {"travel"}, []),
        ("m-008", "t-005", "inbox", "frank@example.com", "Re: Design review: onboarding flow", "The second screen feels crowded. Could we move the consent checkbox to step three?", "2026-03-04T16:45:00Z", {"work"}, []),
        ("m-009", "t-007", "inbox", "newsletter@devweekly.example", "Dev Weekly #212: MCP gateways", "This week: why MCP gateways scope tools per agent, and how to audit every call.", "2026-03-05T07:00:00Z", set(), []),
        ("m-010", "t-001", "sent", me, "Re: Q3 planning offsite", "Great, thanks Carol. Bob, please send the agenda draft by next week.", "2026-03-02T12:10:00Z", {"work"}, []),
        ("m-011", "t-008", "archive", "grace@example.com", "Tax documents 2025", "Here are the tax documents you asked for. Let me know if anything is missing.", "2026-02-20T15:30:00Z", {"finance"}, []),
        ("m-012", "t-009", "spam", "prize@lottery.example", "You have won!!!", "Claim your prize now by sending your bank details.", "2026-03-01T03:33:00Z", set(), []),
    ]
    mails: dict[str, Mail] = {}
    for mail_id, thread, folder, sender, subject, body, date, labels, attachments in raw:
        read = folder != "inbox" or mail_id in {"m-001", "m-003", "m-009"}
        mails[mail_id] = Mail(
            id=mail_id,
            thread_id=thread,
            folder=folder,
            sender=sender,
            to=["bob@example.com", "carol@example.com"] if sender == me else [me],
            subject=subject,
            body=body,
            date=date,
            read=read,
            starred=mail_id in {"m-003", "m-007"},
            labels=set(labels),
            attachments=list(attachments),
        )
    return Mailbox(
        owner=me,
        mails=mails,
        drafts={"d-001": Draft("d-001", ["dave@example.org"], "Re: Lunch on Thursday?", "Sounds great, 12:30?")},
        labels={"work": "#4285f4", "personal": "#0f9d58", "finance": "#f4b400", "travel": "#db4437"},
        contacts={
            c.email: c
            for c in [
                Contact("Bob Martin", "bob@example.com", "Example Corp", "+1 555 0101"),
                Contact("Carol Diaz", "carol@example.com", "Example Corp", "+1 555 0102"),
                Contact("Dave Kim", "dave@example.org", "Example Org"),
                Contact("Erin Walsh", "erin@example.com", "Example Corp"),
                Contact("Frank Osei", "frank@example.com", "Example Corp"),
                Contact("Grace Hopper", "grace@example.com", "Hopper Accounting", "+1 555 0199"),
            ]
        },
        events={
            "e-001": Event("e-001", "Design review: onboarding", "2026-03-11T14:00:00Z", "2026-03-11T15:00:00Z", [me, "erin@example.com", "frank@example.com"], "Room 4.2"),
            "e-002": Event("e-002", "Lunch with Dave", "2026-03-05T12:30:00Z", "2026-03-05T13:30:00Z", [me, "dave@example.org"], "Ramen Ichi"),
            "e-003": Event("e-003", "Q3 planning offsite", "2026-07-14T09:00:00Z", "2026-07-15T17:00:00Z", [me, "bob@example.com", "carol@example.com"], "Lisbon"),
        },
        filters={"f-001": Filter("f-001", "newsletter@devweekly.example", None, "label", "newsletters")},
        signature="Alice Example\nHead of Product, Example Corp",
    )


# --- tools ----------------------------------------------------------------------------


class ToolFailure(Exception):
    """A tool-level failure: reported as `isError: true` so the model can correct itself."""


@dataclass(frozen=True)
class Caller:
    """Who the call came from, as far as this upstream can tell."""

    user: str | None
    authorization: str | None


Handler = Callable[[Mailbox, dict[str, Any], Caller], Awaitable[types.CallToolResult]]


@dataclass(frozen=True)
class ToolDef:
    tool: types.Tool
    handler: Handler


TOOLS: dict[str, ToolDef] = {}


def _schema(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def tool(
    name: str,
    description: str,
    properties: dict[str, Any] | None = None,
    required: list[str] | None = None,
    *,
    output_schema: dict[str, Any] | None = None,
    read_only: bool = False,
    destructive: bool = False,
) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        TOOLS[name] = ToolDef(
            tool=types.Tool(
                name=name,
                description=description,
                input_schema=_schema(properties or {}, required),
                output_schema=output_schema,
                annotations=types.ToolAnnotations(
                    read_only_hint=read_only, destructive_hint=destructive if not read_only else None
                ),
            ),
            handler=handler,
        )
        return handler

    return register


def text(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=message)])


def structured(data: dict[str, Any]) -> types.CallToolResult:
    # The JSON text mirrors structuredContent for clients that only read content.
    return types.CallToolResult(content=[types.TextContent(text=json.dumps(data))], structured_content=data)


STR = {"type": "string"}
EMAIL = {"type": "string", "format": "email"}
EMAILS = {"type": "array", "items": EMAIL, "minItems": 1}
MAIL_ID = {"type": "string", "description": "Id of the mail, as returned by fetch_mails or search_mails (e.g. m-001)."}
FOLDER = {"type": "string", "enum": ["inbox", "sent", "archive", "trash", "spam"]}
LIMIT = {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}
MAIL_SUMMARY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": STR,
        "threadId": STR,
        "from": STR,
        "to": {"type": "array", "items": STR},
        "subject": STR,
        "date": STR,
        "snippet": STR,
        "read": {"type": "boolean"},
        "starred": {"type": "boolean"},
        "labels": {"type": "array", "items": STR},
        "hasAttachments": {"type": "boolean"},
    },
    "required": ["id", "threadId", "from", "subject", "date"],
}
MAIL_LIST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"mails": {"type": "array", "items": MAIL_SUMMARY_SCHEMA}, "total": {"type": "integer"}},
    "required": ["mails", "total"],
}


def _arg_str(args: dict[str, Any], key: str, default: str | None = None) -> str:
    value = args.get(key, default)
    if not isinstance(value, str) or (default is None and not value):
        raise ToolFailure(f"argument {key!r} must be a non-empty string")
    return value


def _arg_list(args: dict[str, Any], key: str, *, required: bool = True) -> list[str]:
    value = args.get(key)
    if value is None and not required:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ToolFailure(f"argument {key!r} must be a non-empty list of strings")
    return list(value)


def _arg_int(args: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = args.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ToolFailure(f"argument {key!r} must be an integer between {lo} and {hi}")
    return value


@tool(
    "fetch_mails",
    "Fetch the most recent mails of a folder, newest first. Returns summaries (sender, subject, "
    "date, snippet, read/starred state, labels); use get_mail for a full body.",
    {"folder": {**FOLDER, "default": "inbox"}, "limit": LIMIT, "unread_only": {"type": "boolean", "default": False}},
    output_schema=MAIL_LIST_SCHEMA,
    read_only=True,
)
async def fetch_mails(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    folder = _arg_str(args, "folder", "inbox")
    limit = _arg_int(args, "limit", 20, 1, 100)
    mails = [m for m in box.in_folder(folder) if not (args.get("unread_only") and m.read)]
    return structured({"mails": [m.summary() for m in mails[:limit]], "total": len(mails)})


@tool(
    "search_mails",
    "Search all folders except trash and spam. Matches the query case-insensitively against "
    "sender, subject and body; optional sender and date bounds narrow the search.",
    {
        "query": {"type": "string", "description": "Words to look for."},
        "from": {"type": "string", "description": "Only mails from this address."},
        "after": {"type": "string", "format": "date", "description": "Only mails on or after this date (YYYY-MM-DD)."},
        "before": {"type": "string", "format": "date", "description": "Only mails before this date (YYYY-MM-DD)."},
        "limit": LIMIT,
    },
    ["query"],
    output_schema=MAIL_LIST_SCHEMA,
    read_only=True,
)
async def search_mails(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    query = _arg_str(args, "query").lower()
    limit = _arg_int(args, "limit", 20, 1, 100)
    hits = []
    for mail in sorted(box.mails.values(), key=lambda m: m.date, reverse=True):
        if mail.folder in ("trash", "spam"):
            continue
        if query not in f"{mail.sender} {mail.subject} {mail.body}".lower():
            continue
        if args.get("from") and mail.sender != args["from"]:
            continue
        if args.get("after") and mail.date[:10] < str(args["after"]):
            continue
        if args.get("before") and mail.date[:10] >= str(args["before"]):
            continue
        hits.append(mail)
    return structured({"mails": [m.summary() for m in hits[:limit]], "total": len(hits)})


@tool("get_mail", "Get one mail with its full body, recipients and attachment list.", {"mail_id": MAIL_ID}, ["mail_id"], read_only=True)
async def get_mail(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    return structured(box.mail(_arg_str(args, "mail_id")).full())


@tool(
    "get_thread",
    "Get every mail of a conversation thread, oldest first.",
    {"thread_id": {"type": "string", "description": "Thread id (threadId of a mail, e.g. t-001)."}},
    ["thread_id"],
    output_schema={
        "type": "object",
        "properties": {"threadId": STR, "subject": STR, "mails": {"type": "array", "items": {"type": "object"}}},
        "required": ["threadId", "mails"],
    },
    read_only=True,
)
async def get_thread(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    thread_id = _arg_str(args, "thread_id")
    mails = sorted((m for m in box.mails.values() if m.thread_id == thread_id), key=lambda m: m.date)
    if not mails:
        raise ToolFailure(f"no thread with id {thread_id!r}")
    return structured({"threadId": thread_id, "subject": mails[0].subject, "mails": [m.full() for m in mails]})


def _deliver(box: Mailbox, to: list[str], subject: str, body: str, cc: list[str], thread_id: str | None = None) -> Mail:
    mail_id = box.next_id("m")
    mail = Mail(
        id=mail_id,
        thread_id=thread_id or box.next_id("t"),
        folder="sent",
        sender=box.owner,
        to=to,
        cc=cc,
        subject=subject,
        body=f"{body}\n\n--\n{box.signature}",
        date=f"2026-03-06T{box.counter % 24:02d}:00:00Z",
        read=True,
    )
    box.mails[mail_id] = mail
    return mail


@tool(
    "send_mail",
    "Send a new mail from the user's account. The user's signature is appended.",
    {"to": EMAILS, "subject": STR, "body": STR, "cc": {"type": "array", "items": EMAIL}, "bcc": {"type": "array", "items": EMAIL}},
    ["to", "subject", "body"],
)
async def send_mail(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    mail = _deliver(box, _arg_list(args, "to"), _arg_str(args, "subject"), _arg_str(args, "body"), _arg_list(args, "cc", required=False))
    return text(f"Sent {mail.id} to {', '.join(mail.to)}.")


@tool(
    "reply",
    "Reply to a mail, in its thread. With reply_all, every original recipient except the user is copied.",
    {"mail_id": MAIL_ID, "body": STR, "reply_all": {"type": "boolean", "default": False}},
    ["mail_id", "body"],
)
async def reply(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    original = box.mail(_arg_str(args, "mail_id"))
    cc = [a for a in original.to + original.cc if a != box.owner] if args.get("reply_all") else []
    subject = original.subject if original.subject.startswith("Re:") else f"Re: {original.subject}"
    mail = _deliver(box, [original.sender], subject, _arg_str(args, "body"), cc, original.thread_id)
    return text(f"Replied to {original.sender} with {mail.id} in thread {original.thread_id}.")


@tool(
    "forward",
    "Forward a mail, with its attachments, to other recipients with an optional note on top.",
    {"mail_id": MAIL_ID, "to": EMAILS, "note": STR},
    ["mail_id", "to"],
)
async def forward(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    original = box.mail(_arg_str(args, "mail_id"))
    body = f"{args.get('note', '')}\n\n---------- Forwarded message ----------\nFrom: {original.sender}\n{original.body}"
    mail = _deliver(box, _arg_list(args, "to"), f"Fwd: {original.subject}", body, [])
    mail.attachments = list(original.attachments)
    return text(f"Forwarded {original.id} as {mail.id} to {', '.join(mail.to)}.")


@tool(
    "delete_mail",
    "Move a mail to trash, or delete it for good with permanent=true (cannot be undone).",
    {"mail_id": MAIL_ID, "permanent": {"type": "boolean", "default": False}},
    ["mail_id"],
    destructive=True,
)
async def delete_mail(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    mail = box.mail(_arg_str(args, "mail_id"))
    if args.get("permanent"):
        del box.mails[mail.id]
        return text(f"Deleted {mail.id} permanently.")
    mail.folder = "trash"
    return text(f"Moved {mail.id} to trash.")


@tool("archive_mail", "Archive a mail: remove it from the inbox without deleting it.", {"mail_id": MAIL_ID}, ["mail_id"])
async def archive_mail(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    mail = box.mail(_arg_str(args, "mail_id"))
    mail.folder = "archive"
    return text(f"Archived {mail.id}.")


@tool(
    "mark_read",
    "Mark one or more mails as read (or unread with read=false).",
    {"mail_ids": {"type": "array", "items": STR, "minItems": 1}, "read": {"type": "boolean", "default": True}},
    ["mail_ids"],
)
async def mark_read(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    ids = _arg_list(args, "mail_ids")
    for mail_id in ids:
        box.mail(mail_id).read = bool(args.get("read", True))
    return text(f"Marked {len(ids)} mail(s) as {'read' if args.get('read', True) else 'unread'}.")


@tool("star_mail", "Star or unstar a mail.", {"mail_id": MAIL_ID, "starred": {"type": "boolean", "default": True}}, ["mail_id"])
async def star_mail(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    mail = box.mail(_arg_str(args, "mail_id"))
    mail.starred = bool(args.get("starred", True))
    return text(f"{'Starred' if mail.starred else 'Unstarred'} {mail.id}.")


@tool("move_to_folder", "Move a mail to another folder.", {"mail_id": MAIL_ID, "folder": FOLDER}, ["mail_id", "folder"])
async def move_to_folder(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    mail = box.mail(_arg_str(args, "mail_id"))
    folder = _arg_str(args, "folder")
    if folder not in FOLDER["enum"]:
        raise ToolFailure(f"unknown folder {folder!r}")
    mail.folder = folder
    return text(f"Moved {mail.id} to {folder}.")


@tool("list_labels", "List the user's labels with their colours and how many mails carry each.", read_only=True)
async def list_labels(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    counts = {name: sum(name in m.labels for m in box.mails.values()) for name in box.labels}
    return structured({"labels": [{"name": n, "color": c, "count": counts[n]} for n, c in sorted(box.labels.items())]})


@tool(
    "create_label",
    "Create a label. Colour is a #rrggbb hex string.",
    {"name": STR, "color": {"type": "string", "pattern": "^#[0-9a-fA-F]{6}$", "default": "#9e9e9e"}},
    ["name"],
)
async def create_label(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    name = _arg_str(args, "name")
    if name in box.labels:
        raise ToolFailure(f"label {name!r} already exists")
    box.labels[name] = _arg_str(args, "color", "#9e9e9e")
    return text(f"Created label {name!r}.")


@tool("delete_label", "Delete a label and remove it from every mail. Mails themselves are kept.", {"name": STR}, ["name"], destructive=True)
async def delete_label(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    name = _arg_str(args, "name")
    if box.labels.pop(name, None) is None:
        raise ToolFailure(f"no label {name!r}")
    for mail in box.mails.values():
        mail.labels.discard(name)
    return text(f"Deleted label {name!r}.")


@tool("add_label", "Put a label on a mail. The label must exist (see create_label).", {"mail_id": MAIL_ID, "label": STR}, ["mail_id", "label"])
async def add_label(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    mail = box.mail(_arg_str(args, "mail_id"))
    label = _arg_str(args, "label")
    if label not in box.labels:
        raise ToolFailure(f"no label {label!r}; create it first")
    mail.labels.add(label)
    return text(f"Labelled {mail.id} with {label!r}.")


@tool("remove_label", "Take a label off a mail.", {"mail_id": MAIL_ID, "label": STR}, ["mail_id", "label"])
async def remove_label(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    mail = box.mail(_arg_str(args, "mail_id"))
    mail.labels.discard(_arg_str(args, "label"))
    return text(f"Removed label {args['label']!r} from {mail.id}.")


@tool("list_drafts", "List unsent drafts.", read_only=True)
async def list_drafts(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    return structured({"drafts": [d.as_dict() for d in box.drafts.values()]})


@tool(
    "create_draft",
    "Save a draft without sending it.",
    {"to": EMAILS, "subject": STR, "body": STR, "cc": {"type": "array", "items": EMAIL}},
    ["to", "subject", "body"],
)
async def create_draft(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    draft = Draft(box.next_id("d"), _arg_list(args, "to"), _arg_str(args, "subject"), _arg_str(args, "body"), _arg_list(args, "cc", required=False))
    box.drafts[draft.id] = draft
    return text(f"Saved draft {draft.id}.")


@tool(
    "update_draft",
    "Change the recipients, subject or body of a draft; fields left out are kept.",
    {"draft_id": STR, "to": EMAILS, "subject": STR, "body": STR},
    ["draft_id"],
)
async def update_draft(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    draft = box.drafts.get(_arg_str(args, "draft_id"))
    if draft is None:
        raise ToolFailure(f"no draft {args['draft_id']!r}")
    if "to" in args:
        draft.to = _arg_list(args, "to")
    draft.subject = args.get("subject", draft.subject)
    draft.body = args.get("body", draft.body)
    return text(f"Updated draft {draft.id}.")


@tool("send_draft", "Send a saved draft; it is removed from drafts.", {"draft_id": STR}, ["draft_id"])
async def send_draft(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    draft = box.drafts.pop(_arg_str(args, "draft_id"), None)
    if draft is None:
        raise ToolFailure(f"no draft {args['draft_id']!r}")
    mail = _deliver(box, draft.to, draft.subject, draft.body, draft.cc)
    return text(f"Sent draft {draft.id} as {mail.id}.")


@tool("delete_draft", "Discard a draft.", {"draft_id": STR}, ["draft_id"], destructive=True)
async def delete_draft(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    if box.drafts.pop(_arg_str(args, "draft_id"), None) is None:
        raise ToolFailure(f"no draft {args['draft_id']!r}")
    return text(f"Discarded draft {args['draft_id']}.")


@tool("list_attachments", "List the attachments of a mail (id, file name, type, size).", {"mail_id": MAIL_ID}, ["mail_id"], read_only=True)
async def list_attachments(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    return structured({"attachments": box.mail(_arg_str(args, "mail_id")).full()["attachments"]})


@tool(
    "get_attachment",
    "Download an attachment. Returns a text description, the file itself as an embedded "
    "resource and, for images, the image.",
    {"mail_id": MAIL_ID, "attachment_id": {"type": "string", "description": "Attachment id from list_attachments (e.g. a-1)."}},
    ["mail_id", "attachment_id"],
    read_only=True,
)
async def get_attachment(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    mail = box.mail(_arg_str(args, "mail_id"))
    wanted = _arg_str(args, "attachment_id")
    found = next((a for a in mail.attachments if a.id == wanted), None)
    if found is None:
        raise ToolFailure(f"mail {mail.id} has no attachment {wanted!r}")
    data = base64.b64encode(found.data).decode()
    content: list[types.ContentBlock] = [
        types.TextContent(text=f"{found.filename} ({found.mime_type}, {len(found.data)} bytes) from {mail.sender}"),
    ]
    if found.mime_type.startswith("image/"):
        content.append(types.ImageContent(data=data, mime_type=found.mime_type))
    content.append(
        types.EmbeddedResource(
            resource=types.BlobResourceContents(uri=f"inbox://mail/{mail.id}/attachments/{found.id}", mime_type=found.mime_type, blob=data)
        )
    )
    return types.CallToolResult(content=content)


@tool(
    "list_contacts",
    "List contacts, optionally only those whose name, address or company contains the query.",
    {"query": STR},
    read_only=True,
)
async def list_contacts(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    query = str(args.get("query", "")).lower()
    found = [c.as_dict() for c in box.contacts.values() if query in f"{c.name} {c.email} {c.company}".lower()]
    return structured({"contacts": found})


@tool("get_contact", "Get one contact by e-mail address.", {"email": EMAIL}, ["email"], read_only=True)
async def get_contact(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    contact = box.contacts.get(_arg_str(args, "email"))
    if contact is None:
        raise ToolFailure(f"no contact {args['email']!r}")
    return structured(contact.as_dict())


@tool("create_contact", "Add a contact to the address book.", {"name": STR, "email": EMAIL, "company": STR, "phone": STR}, ["name", "email"])
async def create_contact(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    contact = Contact(_arg_str(args, "name"), _arg_str(args, "email"), str(args.get("company", "")), str(args.get("phone", "")))
    box.contacts[contact.email] = contact
    return text(f"Added {contact.name} <{contact.email}>.")


@tool(
    "list_events",
    "List calendar events overlapping a time range (ISO 8601 timestamps).",
    {"start": {"type": "string", "format": "date-time"}, "end": {"type": "string", "format": "date-time"}},
    read_only=True,
)
async def list_events(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    start, end = str(args.get("start", "")), str(args.get("end", "9999"))
    found = [e.as_dict() for e in sorted(box.events.values(), key=lambda e: e.start) if e.end > start and e.start < end]
    return structured({"events": found})


@tool(
    "create_event",
    "Create a calendar event and invite attendees by e-mail.",
    {"title": STR, "start": {"type": "string", "format": "date-time"}, "end": {"type": "string", "format": "date-time"}, "attendees": {"type": "array", "items": EMAIL}, "location": STR},
    ["title", "start", "end"],
)
async def create_event(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    start, end = _arg_str(args, "start"), _arg_str(args, "end")
    if end <= start:
        raise ToolFailure("end must be after start")
    event = Event(box.next_id("e"), _arg_str(args, "title"), start, end, [box.owner, *_arg_list(args, "attendees", required=False)], str(args.get("location", "")))
    box.events[event.id] = event
    return text(f"Created event {event.id} ({event.title}).")


@tool("list_filters", "List the rules applied to incoming mail.", read_only=True)
async def list_filters(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    return structured({"filters": [f.as_dict() for f in box.filters.values()]})


@tool(
    "create_filter",
    "Create a rule for incoming mail: match on sender and/or subject, then label, archive or delete.",
    {"from": EMAIL, "subject_contains": STR, "action": {"type": "string", "enum": ["label", "archive", "delete"]}, "label": STR},
    ["action"],
)
async def create_filter(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    if not args.get("from") and not args.get("subject_contains"):
        raise ToolFailure("a filter needs 'from' or 'subject_contains'")
    action = _arg_str(args, "action")
    if action == "label" and not args.get("label"):
        raise ToolFailure("action 'label' needs a 'label'")
    rule = Filter(box.next_id("f"), args.get("from"), args.get("subject_contains"), action, args.get("label"))
    box.filters[rule.id] = rule
    return text(f"Created filter {rule.id}.")


@tool(
    "get_mailbox_stats",
    "Counts per folder, unread mails in the inbox, and the owner of the mailbox.",
    output_schema={
        "type": "object",
        "properties": {"owner": STR, "folders": {"type": "object", "additionalProperties": {"type": "integer"}}, "unread": {"type": "integer"}},
        "required": ["owner", "folders", "unread"],
    },
    read_only=True,
)
async def get_mailbox_stats(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    folders: dict[str, int] = {}
    for mail in box.mails.values():
        folders[mail.folder] = folders.get(mail.folder, 0) + 1
    unread = sum(1 for m in box.mails.values() if m.folder == "inbox" and not m.read)
    return structured({"owner": box.owner, "folders": dict(sorted(folders.items())), "unread": unread})


@tool(
    "whoami",
    "Who this mailbox server thinks is calling: the user the presented credential belongs to.",
    read_only=True,
)
async def whoami(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    return structured({"user": caller.user, "authenticated": caller.authorization is not None})


@tool(
    "export_mailbox",
    "Export the whole mailbox as an mbox archive. Disabled on this workspace: always fails "
    "with an error result.",
    {"format": {"type": "string", "enum": ["mbox", "eml"], "default": "mbox"}},
    read_only=True,
)
async def export_mailbox(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    raise ToolFailure("Mailbox export is disabled by the workspace administrator.")


@tool(
    "sync_mailbox",
    "Synchronise the mailbox with the mail server. Takes sleep_ms milliseconds (simulated "
    "network time; at most 60000).",
    {"sleep_ms": {"type": "integer", "minimum": 0, "maximum": MAX_SLEEP_MS, "default": 1000}},
)
async def sync_mailbox(box: Mailbox, args: dict[str, Any], caller: Caller) -> types.CallToolResult:
    delay = _arg_int(args, "sleep_ms", 1000, 0, MAX_SLEEP_MS)
    await anyio.sleep(delay / 1000)
    return text(f"Mailbox synchronised after {delay} ms.")


# --- prompts and resources ----------------------------------------------------------------

PROMPTS = [
    types.Prompt(
        name="summarize_inbox",
        description="Summarise the unread mails of the inbox in a few bullet points.",
        arguments=[types.PromptArgument(name="max_items", description="At most this many bullets.", required=False)],
    ),
    types.Prompt(
        name="draft_reply",
        description="Draft a reply to one mail in a given tone.",
        arguments=[
            types.PromptArgument(name="mail_id", description="The mail to answer.", required=True),
            types.PromptArgument(name="tone", description="friendly, formal or brief.", required=False),
        ],
    ),
]

RESOURCES = [
    types.Resource(uri="inbox://signature", name="signature", description="The user's mail signature.", mime_type="text/plain"),
    types.Resource(uri="inbox://stats", name="stats", description="Folder counts of the mailbox, as JSON.", mime_type="application/json"),
]

# Templates: one mail, and one folder's mails; a mapping may expose one and hide the other.
TEMPLATES = [
    types.ResourceTemplate(uri_template="inbox://mails/{mail_id}", name="mail", description="One mail, as JSON.", mime_type="application/json"),
    types.ResourceTemplate(
        uri_template="inbox://folders/{folder}", name="folder", description="The mails of one folder, as JSON.", mime_type="application/json"
    ),
]
MAIL_PREFIX, FOLDER_PREFIX = "inbox://mails/", "inbox://folders/"
TONES = ["brief", "formal", "friendly"]


def completions(box: Mailbox, ref: types.PromptReference | types.ResourceTemplateReference, argument: str, value: str) -> list[str]:
    """Suggestions for a prompt argument or a template variable, filtered by the typed prefix."""
    if argument == "tone":
        candidates = TONES
    elif argument == "mail_id":
        candidates = sorted(box.mails)
    elif argument == "folder":
        candidates = sorted({m.folder for m in box.mails.values()})
    elif argument == "max_items":
        candidates = ["3", "5", "10"]
    else:
        candidates = []
    return [c for c in candidates if c.startswith(value)]


# --- the server -----------------------------------------------------------------------------


class InboxServer(Server[Any]):
    """The low-level Server, declaring `listChanged` on the session protocol too.

    On 2026-07-28 the SDK derives `listChanged` from a served
    `subscriptions/listen`; on the session protocol it reads
    NotificationOptions, which the Streamable HTTP manager does not pass.
    """

    def create_initialization_options(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
    ) -> InitializationOptions:
        return super().create_initialization_options(
            notification_options or NotificationOptions(tools_changed=True, prompts_changed=True, resources_changed=True),
            experimental_capabilities,
            extensions,
        )


def build_server(
    *,
    mailbox: Mailbox | None = None,
    record: CallRecord | None = None,
    required_auth: Mapping[str, str] | None = None,
) -> InboxServer:
    """The MCP server over one mailbox (a freshly seeded one by default).

    `required_auth` maps an exact `Authorization` header value to the user it
    belongs to (`{"Bearer alice-secret": "alice"}`). When given, a tool call
    without one of those values gets a 401 error result; listing stays open.
    """
    box = mailbox or seed_mailbox()
    bus = InMemorySubscriptionBus()

    async def list_tools(ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[d.tool for d in TOOLS.values()])

    def input_schema(name: str) -> Mapping[str, Any] | None:
        found = TOOLS.get(name)
        return found.tool.input_schema if found else None

    async def call_tool(ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> types.CallToolResult:
        arguments = dict(params.arguments or {})
        authorization = request_headers(ctx).get("authorization")
        if record is not None:
            record.append(RecordedCall(params.name, copy.deepcopy(arguments), authorization))
        found = TOOLS.get(params.name)
        if found is None:
            raise MCPError(INVALID_PARAMS, f"Unknown tool: {params.name}")
        user: str | None = None
        if required_auth is not None:
            user = required_auth.get(authorization or "")
            if user is None:
                return types.CallToolResult(
                    content=[types.TextContent(text="401 Unauthorized: missing or unknown credential for the inbox")],
                    is_error=True,
                )
        try:
            return await found.handler(box, arguments, Caller(user=user, authorization=authorization))
        except ToolFailure as exc:
            return types.CallToolResult(content=[types.TextContent(text=str(exc))], is_error=True)

    async def list_prompts(ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None) -> types.ListPromptsResult:
        return types.ListPromptsResult(prompts=PROMPTS)

    async def get_prompt(ctx: ServerRequestContext[Any, Any], params: types.GetPromptRequestParams) -> types.GetPromptResult:
        args = params.arguments or {}
        if params.name == "summarize_inbox":
            unread = [m for m in box.in_folder("inbox") if not m.read]
            listing = "\n".join(f"- {m.sender}: {m.subject}" for m in unread)
            message = f"Summarise these unread mails in at most {args.get('max_items', '5')} bullet points:\n{listing}"
        elif params.name == "draft_reply":
            mail = box.mails.get(args.get("mail_id", ""))
            if mail is None:
                raise MCPError(INVALID_PARAMS, f"no mail with id {args.get('mail_id')!r}")
            message = f"Write a {args.get('tone', 'friendly')} reply to this mail from {mail.sender}:\n\n{mail.body}"
        else:
            raise MCPError(INVALID_PARAMS, f"Unknown prompt: {params.name}")
        return types.GetPromptResult(messages=[types.PromptMessage(role="user", content=types.TextContent(text=message))])

    async def list_resources(ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=RESOURCES)

    async def read_resource(ctx: ServerRequestContext[Any, Any], params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        if params.uri == "inbox://signature":
            contents = types.TextResourceContents(uri=params.uri, mime_type="text/plain", text=box.signature)
        elif params.uri == "inbox://stats":
            stats = await get_mailbox_stats(box, {}, Caller(None, None))
            contents = types.TextResourceContents(uri=params.uri, mime_type="application/json", text=json.dumps(stats.structured_content))
        elif params.uri.startswith(MAIL_PREFIX) and params.uri[len(MAIL_PREFIX) :] in box.mails:
            mail = box.mails[params.uri[len(MAIL_PREFIX) :]]
            contents = types.TextResourceContents(uri=params.uri, mime_type="application/json", text=json.dumps(mail.full()))
        elif params.uri.startswith(FOLDER_PREFIX):
            folder = [m.summary() for m in box.in_folder(params.uri[len(FOLDER_PREFIX) :])]
            contents = types.TextResourceContents(uri=params.uri, mime_type="application/json", text=json.dumps(folder))
        else:
            raise MCPError(INVALID_PARAMS, f"Resource not found: {params.uri}")
        return types.ReadResourceResult(contents=[contents])

    async def list_resource_templates(
        ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        return types.ListResourceTemplatesResult(resource_templates=TEMPLATES)

    async def complete(ctx: ServerRequestContext[Any, Any], params: types.CompleteRequestParams) -> types.CompleteResult:
        values = completions(box, params.ref, params.argument.name, params.argument.value)
        return types.CompleteResult(completion=types.Completion(values=values, total=len(values), has_more=False))

    return InboxServer(
        SERVER_NAME,
        version=SERVER_VERSION,
        instructions="A mailbox with mails, drafts, labels, contacts, calendar events and filters.",
        get_tool_input_schema=input_schema,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        on_list_prompts=list_prompts,
        on_get_prompt=get_prompt,
        on_list_resources=list_resources,
        on_read_resource=read_resource,
        on_list_resource_templates=list_resource_templates,
        on_completion=complete,
        on_subscriptions_listen=ListenHandler(bus),
    )


def build_app(
    *,
    record: CallRecord | None = None,
    required_auth: dict[str, str] | None = None,
    mailbox: Mailbox | None = None,
    json_response: bool = False,
    stateless_http: bool = False,
    host: str = "127.0.0.1",
) -> Starlette:
    """An ASGI app serving the inbox at `/mcp` (both protocol eras).

    `host` is the address the app will be bound to: the SDK's DNS-rebinding
    protection admits Host headers naming it (loopback by default).
    """
    server = build_server(mailbox=mailbox, record=record, required_auth=required_auth)
    return server.streamable_http_app(json_response=json_response, stateless_http=stateless_http, host=host)


# --- as a process -------------------------------------------------------------------------


class _ReadyServer(uvicorn.Server):
    """Prints one line once the socket is bound: scripts and tests wait for it."""

    async def startup(self, sockets: list[Any] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(f"{SERVER_NAME} MCP server ready at http://{host}:{port}/mcp", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the example inbox MCP server over Streamable HTTP.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port to bind; 0 picks a free one (default 8765)")
    parser.add_argument(
        "--auth",
        action="append",
        default=[],
        metavar="USER=SECRET",
        help="require 'Authorization: Bearer SECRET' on tool calls; repeat per user",
    )
    args = parser.parse_args(argv)
    required: dict[str, str] | None = None
    if args.auth:
        required = {}
        for item in args.auth:
            user, sep, secret = item.partition("=")
            if not sep or not user or not secret:
                parser.error(f"--auth expects USER=SECRET, got {item!r}")
            required[f"Bearer {secret}"] = user
    app = build_app(required_auth=required, host=args.host)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", ws="none", access_log=False)
    asyncio.run(_ReadyServer(config).serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
