"""Where one gateway process spends its CPU per `tools/call`, from py-spy samples.

Runs the same stack as `gateway_overhead.py` (fast upstream, `portcullis serve`,
both pinned), keeps the gateway saturated with `wrk -c 64` (or the Python
generator), and samples it with py-spy (`py-spy record --format raw -F`, blocking
mode: the non-blocking mode tore about half the stacks on this machine). Two
separate runs, because sampling slows the process it samples:

1. unprofiled: calls/s and the gateway's CPU time per call (utime+stime from
   /proc/<pid>/stat over the run divided by the calls answered);
2. profiled, Python frames only (250 Hz): the distribution of that CPU time;
3. profiled with `--native` (80 Hz; unwinding C stacks is slow, so fewer
   samples): the same, plus the share of CPython's cyclic garbage collector,
   which a Python-only profile charges to whichever line allocated the object
   that crossed the collection threshold.

A share of samples times the unprofiled CPU time per call gives µs per call.
Three views of the same samples:

- **stages**: each sample goes to the innermost frame that matches a stage of a
  call's path (token check, vault, upstream client, audit, SDK dispatch, ...);
  samples in no stage go to the innermost framework frame (uvicorn, starlette,
  the SDK transport, anyio, asyncio). Exclusive: the stages add up to 100%.
- **self**: the leaf function of each sample (time spent in C extensions called
  from Python, such as json's encoder or the Ed25519 verify, counts as the
  calling Python function's self time).
- **inclusive**: every function on the stack, once per sample (nested, so these
  do not add up).

    .venv/bin/pip install py-spy   # not a project dependency
    .venv/bin/python benchmarks/gateway_profile.py [--seconds 20] [--rate 250] [--raw /tmp/gateway.stacks]

The raw collapsed stacks are kept (`--raw`) for flamegraph.pl or speedscope.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import load, stack  # noqa: E402
from benchmarks.gateway_overhead import ARGUMENTS, TOOL, Placement, placement  # noqa: E402

# (label, regex over "function (file:line)"); innermost match wins, so more specific stages
# (nested inside others at run time) take their samples from the enclosing ones.
STAGES: tuple[tuple[str, str], ...] = (
    ("token: JWT verify (EdDSA signature, claims)", r"portcullis/gateway/identity/(tokens|oidc|admission)\.py"),
    ("token: revocation check", r"portcullis/gateway/identity/revocation\.py"),
    ("credential: vault read + AES-GCM open", r"portcullis/vault/|portcullis/gateway/credentials\.py"),
    ("policy: allowlist, scope, rules, limits", r"portcullis/gateway/policy/"),
    ("audit: event + store + metrics", r"portcullis/gateway/audit/|portcullis/gateway/metrics\.py|prometheus_client/|sqlite3"),
    ("upstream: client request/response (http1.py; aiohttp for https)", r"portcullis/gateway/(upstream|http1)\.py|aiohttp/|multidict/|yarl/"),
    ("fast path: request checks, result shaping", r"portcullis/gateway/fastpath\.py"),
    ("relay: result -> CallToolResult model", r"relay_result|build_mcp_server\.<locals>\.call_tool"),
    ("gateway core: call_tool bookkeeping", r"portcullis/gateway/core\.py"),
    ("auth layer: BearerAuth (ASGI)", r"portcullis/gateway/endpoint\.py"),
    ("SDK: result/params (de)serialization (mcp_types, pydantic)", r"mcp_types/"),
    ("SDK: inbound validation ladder (modern envelope, headers)", r"mcp/shared/inbound\.py"),
    ("SDK: OpenTelemetry middleware", r"mcp/(server|shared)/_otel\.py|opentelemetry/"),
    ("SDK: ServerRunner / lowlevel Server dispatch", r"mcp/server/(runner|lowlevel/|connection|context|session)|mcp/shared/(jsonrpc_dispatcher|session|context|dispatch)"),
    ("SDK: streamable HTTP transport (request parsing, checks, response)", r"mcp/server/(streamable_http|_streamable_http|transport_security)"),
    ("SDK: other", r"/mcp/"),
    ("starlette: routing, middleware, Request/Response", r"starlette/|sse_starlette/"),
    ("uvicorn: HTTP protocol (httptools), ASGI cycle", r"uvicorn/|httptools/"),
    ("anyio: task groups, memory streams, cancel scopes", r"anyio/"),
    ("asyncio: event loop, tasks, transports", r"asyncio/|_asynciomodule|selectors\.py"),
)
_STAGE_RE = [(label, re.compile(pattern)) for label, pattern in STAGES]
# Native frames of CPython's cyclic garbage collector (visible only with py-spy --native). A
# collection runs inside whichever allocation crossed the threshold, so without this stage its
# time would be charged to an innocent line (it showed up as starlette's Headers.__init__).
GC_STAGE = "cyclic GC (CPython gc_collect_main, native pass)"
_GC_FRAME = re.compile(r"^(gc_collect_main|gc_collect_with_callback|gc_collect_generations|collect|collect_with_callback|collect_generations) \(")


@dataclass
class Profile:
    samples: Counter[tuple[str, ...]]
    threads: Counter[str]

    @property
    def total(self) -> int:
        return sum(self.samples.values())

    def stages(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for frames, n in self.samples.items():
            out[_stage(frames)] += n
        return out

    def self_time(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for frames, n in self.samples.items():
            out[_short(frames[-1]) if frames else "?"] += n
        return out

    def inclusive(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for frames, n in self.samples.items():
            for frame in {_short(f) for f in frames}:
                out[frame] += n
        return out


def _stage(frames: Sequence[str]) -> str:
    if any(_GC_FRAME.match(frame) for frame in frames):
        return GC_STAGE
    for frame in reversed(frames):
        for label, pattern in _STAGE_RE:
            if pattern.search(frame):
                return label
    return "other: " + (_short(frames[-1]) if frames else "?")


_PREFIXES = (
    str(stack.REPO / ".venv" / "lib") + "/",
    str(stack.REPO / "operator") + "/",
    str(Path(os.__file__).parent) + "/",
)


def _short(frame: str) -> str:
    """`function (file:line)` with the site-packages / stdlib / source-root prefix cut."""
    for prefix in _PREFIXES:
        frame = frame.replace(prefix, "")
    return re.sub(r"python3\.\d+/site-packages/", "", frame)


# A worker thread waiting for work (the audit store's writer between batches) blocks in C with the GIL
# released, and py-spy still samples it as busy: measured from /proc, that thread costs ~9 µs a call
# while such samples made up a fifth of a profile. They are dropped: in the Python pass its leaf is
# `_worker`; in the --native pass the leaf is libc's wait, so the innermost Python frame is looked at.
_IDLE_LEAF = re.compile(r"^_worker \(.*concurrent/futures/thread\.py")
_PYTHON_FRAME = re.compile(r"\.py:\d+\)$")


def _idle(frames: list[str]) -> bool:
    innermost = next((frame for frame in reversed(frames) if _PYTHON_FRAME.search(frame)), "")
    return bool(_IDLE_LEAF.match(innermost))


def parse_raw(text: str) -> Profile:
    samples: Counter[tuple[str, ...]] = Counter()
    threads: Counter[str] = Counter()
    for line in text.splitlines():
        stacktext, _, count = line.rpartition(" ")
        if not stacktext or not count.isdigit():
            continue
        frames = stacktext.split(";")
        if _idle(frames):
            continue
        thread = frames[0] if frames and frames[0].startswith("thread ") else "?"
        if frames and frames[0].startswith("thread "):
            frames = frames[1:]
        threads[re.sub(r"\(\d+\)", "", thread).strip()] += int(count)
        samples[tuple(frames)] += int(count)
    return Profile(samples, threads)


def render(profile: Profile, cpu_us_per_call: float, rps: float, header: str, top: int = 15, native: Profile | None = None) -> str:
    total = profile.total
    out = [header, ""]
    out.append(f"{total} samples; gateway CPU per call (unprofiled run): {cpu_us_per_call:.0f} µs at {rps:.0f} calls/s. "
               "µs/call = share × CPU per call.")
    out.append("Threads: " + ", ".join(f"{t} {n / total:.1%}" for t, n in profile.threads.most_common()) + "\n")

    def table(title: str, counts: Counter[str], limit: int | None, of: int = total) -> None:
        out.append(f"### {title}\n")
        out.append("| # | cost | share | µs/call |")
        out.append("|---:|---|---:|---:|")
        for i, (name, n) in enumerate(counts.most_common(limit), 1):
            share = n / of
            if share < 0.0005:  # a handful of torn stacks; below the table's resolution
                break
            out.append(f"| {i} | `{name}` | {share:.1%} | {share * cpu_us_per_call:.0f} |")
        out.append("")

    if native is not None:
        table(f"By stage of the call, native pass ({native.total} samples; cyclic GC separated; exclusive, adds up to 100%)",
              native.stages(), None, native.total)
    table("By stage of the call, Python pass (GC time hidden in the line that triggered it; exclusive)", profile.stages(), None)
    table(f"Top {top} functions by self time", profile.self_time(), top)
    skip = re.compile(r"^(<module>|main|run|Runner\.run|BaseEventLoop\.|Handle\._run|task_step|_run_until_signal|cmd_serve)")
    inclusive = Counter({k: v for k, v in profile.inclusive().items() if not skip.match(k)})
    table(f"Top {top * 2} functions by inclusive time (nested; event-loop plumbing omitted)", inclusive, top * 2)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each of the two runs")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks here")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--native-rate", type=int, default=80,
                        help="py-spy rate of the second, --native pass (slow: it unwinds C stacks); 0 skips it")
    parser.add_argument("--gateway-executable", help="run this instead of `portcullis` (same CLI)")
    args = parser.parse_args(argv)

    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if spy is None:
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy (a profiling tool, not a project dependency)")
    if args.gateway_executable:
        stack.GATEWAY_EXECUTABLE = args.gateway_executable
    wrk = load.wrk_path() if args.generator in ("auto", "wrk") else None
    where = placement(not args.no_pin)
    if where.client:
        os.sched_setaffinity(0, where.client)

    def drive(target: load.Target, seconds: float) -> load.LoadResult:
        if wrk is not None:
            return load.wrk_load(target, args.connections, seconds, wrk=wrk, prefix=stack.pin_prefix(where.client))
        return load.python_load(target, args.connections, seconds=seconds)

    with tempfile.TemporaryDirectory(prefix="portcullis-profile-") as tmp, stack.upstream(where.upstream) as (_, upstream_url):
        with stack.gateway(upstream_url, Path(tmp), where.gateway) as gw:
            target = load.tool_call(gw.url, TOOL, ARGUMENTS, token=gw.token)
            drive(target, 2.0)  # warm-up
            cpu_before = load.cpu_seconds(gw.pid)
            plain = drive(target, args.seconds)
            cpu_us = (load.cpu_seconds(gw.pid) - cpu_before) / max(1, plain.calls) * 1e6
            print(f"unprofiled: {plain.rps:.0f} calls/s, {cpu_us:.0f} µs gateway CPU per call, failures {plain.failures}",
                  file=sys.stderr)
            raw = args.raw or Path(tmp) / "gateway.stacks"
            profile, profiled, argv_spy = sample(spy, gw.pid, raw, args.rate, False, args.seconds, where, drive, target)
            native = None
            if args.native_rate:
                native_raw = raw.with_name(raw.name + ".native")
                native, _, _ = sample(spy, gw.pid, native_raw, args.native_rate, True, args.seconds, where, drive, target)
    header = (f"## Gateway CPU profile: tools/call `{TOOL}` under {plain.generator} -c {args.connections}\n\n"
              f"py-spy {args.rate} Hz, blocking, {args.seconds:g} s (plus a --native pass at {args.native_rate} Hz); "
              f"{where.describe()}. "
              f"While sampled the gateway answered {profiled.rps:.0f} calls/s (sampling pauses it).\n\n"
              f"`{' '.join(argv_spy)}`")
    print(render(profile, cpu_us, plain.rps, header, args.top, native))
    return 0


def sample(
    spy: str, pid: int, raw: Path, rate: int, native: bool, seconds: float, where: Placement,
    drive: Callable[[load.Target, float], load.LoadResult], target: load.Target,
) -> tuple[Profile, load.LoadResult, list[str]]:
    """py-spy attached for `seconds` while the load runs; the parsed samples."""
    argv = [*stack.pin_prefix(where.client), spy, "record", "--pid", str(pid), "--format", "raw", "-F",
            "--full-filenames", "--threads", "--rate", str(rate), "--duration", f"{seconds:g}", "--output", str(raw)]
    if native:
        argv.append("--native")
    sampler = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)  # py-spy attaches before the load starts; its own --duration bounds it
    result = drive(target, max(1.0, seconds - 1.0))
    _, errors = sampler.communicate(timeout=seconds + 60)
    if sampler.returncode != 0 or not raw.exists():
        raise SystemExit(f"py-spy failed ({sampler.returncode}): {errors.decode()[-2000:]}")
    return parse_raw(raw.read_text()), result, argv


if __name__ == "__main__":
    sys.exit(main())
