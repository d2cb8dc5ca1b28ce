"""What any gateway on the gateway's own stack pays per call before it does anything: the floor.

The gateway runs on uvicorn (uvloop, httptools) and forwards each call with its own pooled
HTTP/1.1 client (gateway/http1.py). This runs a proxy built of exactly those parts and
nothing else: an ASGI app that reads the agent's POST, sends its body to the upstream on the
same pooled client, and returns the upstream's answer, with no authentication, audit,
allowlist, credential, JSON parsing or result shaping. Its CPU per call is what the stack
itself costs; the gateway's CPU per call minus it is what the gateway's own checks cost.
Both run pinned to the first core, in front of `fast_upstream.py` on the second, under wrk,
alternating run by run so machine noise hits both alike.

`--awake` runs a busy loop at the lowest priority (nice 19) on the gateway's core while it is
measured, so the core never idles between one call's request and its upstream answer. At one
connection that is what a call's latency is made of: on the 2-core VM of
`benchmarks/results/instructions-2026-12-03.md` the same build answered at p50 0.39 ms with the
core kept awake against 0.53 ms without, for the same instructions per call.

    python benchmarks/stack_floor.py [--seconds 5] [--rounds 3] [--connections 64] [--awake]
    python benchmarks/stack_floor.py --connections 1 --awake   # the core kept from idling between calls
    python benchmarks/stack_floor.py --serve-floor UPSTREAM_URL   # (the proxy process itself)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import load, stack  # noqa: E402

TOOL, ARGUMENTS = "echo", {"text": "hello from the benchmark"}


def serve_floor(upstream_url: str) -> None:
    """The floor proxy: uvicorn + uvloop + httptools, the gateway's pooled client, nothing more."""
    import aiohttp
    import uvicorn

    from portcullis.gateway import http1

    state: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()  # lifespan.startup
            state["session"] = aiohttp.ClientSession()
            state["wire"] = http1.Client.of(state["session"]).endpoint(upstream_url)
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            await state["session"].close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        headers = {"content-type": "application/json", "accept": "application/json, text/event-stream",
                   "mcp-protocol-version": "2026-07-28"}
        async with state["wire"].request("POST", b"".join(chunks), headers, 10) as response:
            body = b"".join([chunk async for chunk in response.content.iter_any()])
            status = response.status
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    port = stack.free_port()
    print(f"floor proxy ready at http://127.0.0.1:{port}/mcp", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning",
                access_log=False, timeout_keep_alive=75)


def _floor_process(upstream_url: str, cores: list[int]) -> tuple[stack.Process, str]:
    argv = [*stack.pin_prefix(cores), sys.executable, str(Path(__file__).resolve()), "--serve-floor", upstream_url]
    popen = subprocess.Popen(argv, stdout=subprocess.PIPE)
    line = stack._read_line(popen, stack.STARTUP_TIMEOUT)
    if "ready at " not in line:
        raise RuntimeError(f"the floor proxy did not start: {line!r}")
    return stack.Process(popen, argv), line.split("ready at ", 1)[1].split()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--awake", action="store_true",
                        help="keep the measured processes' core from idling (a nice-19 busy loop beside them)")
    parser.add_argument("--baseline", metavar="EXECUTABLE",
                        help="also run this `portcullis` (an older build) as a gateway, interleaved, and report the ratio")
    parser.add_argument("--serve-floor", metavar="UPSTREAM_URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_floor:
        serve_floor(args.serve_floor)
        return 0
    wrk = load.wrk_path()
    if wrk is None:
        print("wrk not found (Debian: apt-get install -y wrk): using the Python generator, which caps below the floor "
              "proxy; CPU per call is still each process's own", file=sys.stderr)
    two_cores = (os.cpu_count() or 1) > 1
    gateway_cores, other = ([0], [1]) if two_cores else (None, None)
    figures: dict[str, list[tuple[float, float, float]]] = {"floor proxy": [], "gateway": []}
    if args.baseline:
        figures["baseline gateway"] = []
    with tempfile.TemporaryDirectory(prefix="portcullis-floor-") as tmp, stack.upstream(other) as (_, upstream_url):
        floor, floor_url = _floor_process(upstream_url, gateway_cores or [])
        spinner = None
        if args.awake:
            spinner = subprocess.Popen([*stack.pin_prefix(gateway_cores), "nice", "-n", "19", sys.executable, "-c", "while True: pass"])
        try:
            with contextlib.ExitStack() as gateways:
                gw = gateways.enter_context(stack.gateway(upstream_url, Path(tmp) / "gw", gateway_cores))
                targets = {"floor proxy": (floor.pid, load.tool_call(floor_url, TOOL, ARGUMENTS)),
                           "gateway": (gw.pid, load.tool_call(gw.url, TOOL, ARGUMENTS, token=gw.token))}
                if args.baseline:
                    base = gateways.enter_context(stack.gateway(upstream_url, Path(tmp) / "base", gateway_cores,
                                                                executable=args.baseline))
                    targets["baseline gateway"] = (base.pid, load.tool_call(base.url, TOOL, ARGUMENTS, token=base.token))
                def run(target: load.Target, connections: int, seconds: float) -> load.LoadResult:
                    if wrk is None:
                        return load.python_load(target, connections, seconds=seconds)
                    return load.wrk_load(target, connections, seconds, wrk=wrk, prefix=stack.pin_prefix(other))

                for pid, target in targets.values():  # warm both (pools, first discovery)
                    run(target, 8, 1.0)
                for round_number in range(args.rounds):
                    items = list(targets.items())
                    order = items[round_number % len(items):] + items[:round_number % len(items)]  # rotated each round
                    for name, (pid, target) in order:
                        before = load.cpu_seconds(pid)
                        result = run(target, args.connections, args.seconds)
                        if result.failures or not result.calls:
                            raise SystemExit(f"{name}: {result.failures} failures, e.g. {result.failure_samples[:1]}")
                        figures[name].append(((load.cpu_seconds(pid) - before) / result.calls * 1e6, result.rps, result.p50_ms))
                    print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
            floor.stop()
    cpu = {name: statistics.median(c for c, _, _ in runs) for name, runs in figures.items()}
    rps = {name: statistics.median(r for _, r, _ in runs) for name, runs in figures.items()}
    p50 = {name: statistics.median(p for _, _, p in runs) for name, runs in figures.items()}
    generator = "wrk" if wrk else "the Python generator"
    awake = ", the core kept awake (--awake)" if args.awake else ""
    print(f"\n## CPU per call at {args.connections} connections (median of {args.rounds} runs of {args.seconds:g} s, {generator}{awake})\n")
    print("| process | CPU µs/call | calls/s | p50 ms |")
    print("|---|---:|---:|---:|")
    for name in figures:
        print(f"| {name} | {cpu[name]:,.0f} | {rps[name]:,.0f} | {p50[name]:.3f} |")
    own = cpu["gateway"] - cpu["floor proxy"]
    if args.baseline:
        ratios = [a / b for (a, _, _), (b, _, _) in zip(figures["gateway"], figures["baseline gateway"])]
        print(f"\nGateway CPU per call against the baseline: {statistics.median(ratios):.2f}x "
              f"(median of per-round ratios; rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"\nThe gateway's own checks and bookkeeping: {own:,.0f} µs per call "
          f"({own / cpu['gateway']:.0%} of its CPU); the stack's floor: {cpu['floor proxy']:,.0f} µs.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
