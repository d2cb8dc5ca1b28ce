"""An ordinary FastMCP app, served over FastMCP's own Streamable HTTP transport: an upstream nobody here wrote.

Run as `python tests/support/fastmcp_server.py`: it binds 127.0.0.1 on a port the
kernel picks (a pre-bound socket handed to uvicorn, so there is no race for a
"free" port), prints one ready line with its URL, and serves until terminated.

Everything below is FastMCP's plain decorator API, the way its users write
servers; nothing is tuned to the gateway. `list_page_size=2` makes FastMCP page
every list (tools, prompts, resources, templates), so pagination is exercised.
FastMCP 4.2 has no server-side sampling helper (`Context.sample` is gone), so
this server cannot ask for sampling; it elicits through `Context.elicit`.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import anyio
from fastmcp import Context, FastMCP
from mcp_types import Completion, PromptReference, ResourceTemplateReference

HOST = "127.0.0.1"
PAGE_SIZE = 2
CITIES = ["Amsterdam", "Athens", "Berlin", "Bern", "Bordeaux"]

mcp = FastMCP("foreign-fastmcp", instructions="A FastMCP server for Portcullis' fidelity tests.", list_page_size=PAGE_SIZE)


@mcp.tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@mcp.tool
def echo(message: str) -> str:
    """Echo the message back."""
    return message


@mcp.tool
async def count_with_progress(steps: int, ctx: Context) -> str:
    """Count to `steps`, reporting progress at each step."""
    for step in range(1, steps + 1):
        await ctx.report_progress(step, steps, f"step {step} of {steps}")
    return f"counted to {steps}"


@mcp.tool
async def chatty(ctx: Context) -> str:
    """Log three messages to the client while working."""
    await ctx.info("starting the work")
    await ctx.warning("the work is half done")
    await ctx.error("the work hit a snag, and recovered")
    return "done talking"


# What became of each `slow` call, by tag: how a test sees, upstream, whether a cancellation arrived.
OUTCOMES: dict[str, str] = {}
SETTLED: dict[str, anyio.Event] = {}


@mcp.tool
async def slow(seconds: float, tag: str, ctx: Context) -> str:
    """Sleep for `seconds`, reporting progress every 0.5 s (a long-running call)."""
    OUTCOMES[tag] = "running"
    settled = SETTLED.setdefault(tag, anyio.Event())
    ticks = max(1, int(seconds / 0.5))
    try:
        for tick in range(1, ticks + 1):
            await anyio.sleep(seconds / ticks)
            await ctx.report_progress(tick, ticks)
    except anyio.get_cancelled_exc_class():
        OUTCOMES[tag] = "cancelled"
        raise
    else:
        OUTCOMES[tag] = "finished"
    finally:
        settled.set()
    return f"slept {seconds} s"


@mcp.tool
async def outcome(tag: str, wait_seconds: float = 0) -> str:
    """What became of the `slow` call with this tag (running, finished, cancelled, unknown), waiting up to
    `wait_seconds` for a running one to settle."""
    with anyio.move_on_after(wait_seconds):
        await SETTLED.setdefault(tag, anyio.Event()).wait()
    return OUTCOMES.get(tag, "unknown")


@mcp.tool
def which_session(ctx: Context) -> str:
    """The id of the session this call came in on (the fidelity tests ask the upstream about it directly)."""
    return ctx.session_id


@dataclass
class Contact:
    name: str
    email: str


@mcp.tool
async def ask_contact(ctx: Context) -> str:
    """Ask the user for a contact through elicitation."""
    answer = await ctx.elicit("Whom should we write to?", Contact)
    if answer.action == "accept":
        return f"writing to {answer.data.name} <{answer.data.email}>"
    return f"elicitation {answer.action}"


@mcp.tool(tags={"hidden"})
def secret_tool() -> str:
    """Appears once `reveal` was called in the session."""
    return "revealed"


@mcp.tool
async def reveal(ctx: Context) -> str:
    """Enable `secret_tool` for this session (FastMCP then sends tools/list_changed)."""
    await ctx.enable_components(names={"secret_tool"})
    return "revealed secret_tool"


mcp.disable(names={"secret_tool"})


@mcp.prompt
def greet(name: str, style: str = "plain") -> str:
    """Greet someone."""
    return f"Write a {style} greeting for {name}."


@mcp.prompt
def travel(city: str) -> str:
    """Plan a trip to a city."""
    return f"Plan three days in {city}."


@mcp.resource("data://config", mime_type="application/json")
def config() -> dict[str, object]:
    """The server's static configuration."""
    return {"version": 1, "features": ["tools", "prompts", "resources"]}


@mcp.resource("data://readme", mime_type="text/plain")
def readme() -> str:
    """A static text resource."""
    return "This server was written with FastMCP."


@mcp.resource("data://logo", mime_type="image/png")
def logo() -> bytes:
    """A static binary resource."""
    return b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


@mcp.resource("weather://{city}/today", mime_type="text/plain")
def weather(city: str) -> str:
    """Today's weather in a city."""
    return f"Sunny in {city}."


@mcp.resource("users://{user_id}/profile", mime_type="application/json")
def profile(user_id: str) -> dict[str, str]:
    """A user's profile."""
    return {"id": user_id, "name": f"User {user_id}"}


@mcp.completion
def complete(ref: PromptReference | ResourceTemplateReference, argument: object, context: object) -> Completion | None:
    value = getattr(argument, "value", "")
    name = getattr(argument, "name", "")
    if name == "city":
        matches = [c for c in CITIES if c.lower().startswith(value.lower())]
        return Completion(values=matches, total=len(matches), has_more=False)
    if name == "style":
        return Completion(values=[s for s in ("plain", "poetic", "pirate") if s.startswith(value)])
    return None


def main() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    print(f"fastmcp ready http://{HOST}:{port}/mcp", flush=True)
    mcp.run(transport="http", host=HOST, port=port, sockets=[sock], show_banner=False, log_level="warning")


if __name__ == "__main__":
    main()
