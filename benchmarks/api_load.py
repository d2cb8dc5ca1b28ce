"""The cluster data plane's load on the API server, and how fast a deleted credential is cut off.

Everything real but the API server: the in-cluster gateway (`portcullis gateway --in-cluster`'s
code, `gateway.cluster.build`) reads its config, keys, revocations and every user's credential
from the kmock emulator over real HTTP, in front of the example inbox upstream, which demands
each user's own credential; agents are MCP SDK clients (2026-07-28). It measures

- **API requests per tool call at steady state**: after a warm-up, every request the emulator
  receives during `--calls` tool calls (spread over `--users` users with per-user credentials),
  divided by the calls; by kind (a watch stream counts once, when it is opened).
- **API requests per admin request**: `--mints` POST /v1/tokens with one ServiceAccount token
  (TokenReview and SubjectAccessReview answered by the emulator, as test_admission does).
- **deletion-to-refusal latency**: another client deletes one user's credential Secret; the time
  until (a) the gateway's vault answers "not connected" (polled in-process every 0.5 ms) and
  (b) that user's next tool call is refused with "connect inbox first" (calls back to back).
  Median over `--trials`; the credential is stored again and served before the next trial.
- **resolve cost per call**: `Credentials.headers` for a `source: user` connection on the
  Kubernetes vault, as the gateway holds it (after: served from the watch and the kept
  plaintext) and on a vault with no watch running (every call GETs and unseals: before).

    .venv/bin/python benchmarks/api_load.py [--calls 2000] [--users 20] [--trials 18] [--mints 200]

"Before" is the same harness on the tree without the watch-backed caches (PYTHONPATH pointing at
a copy of `operator/` from before the change). Figures of 2026-12-02 on this shared 2-core
machine (benchmarks/results/api-load-2026-12-02.md has every run):

                                       before                      after
    API requests per tool call         1.000 (a Secret GET each)   0.000 in 2,000 calls (goal <= 0.01)
    API requests per admin mint        3.000 (TokenReview, SAR,    0.000 in 200 mints (one review pair
                                       a Secret GET)               per caller per 10 s by design)
    DELETE acked -> vault refuses      1.37 ms (its next GET)      1.34 ms median (the watch), n=15
    DELETE acked -> tool call refused  3.59 ms, the first call     2.35 ms, the first call, n=15
    resolve, Kubernetes vault          419-742 us/call             2.3-3.7 us/call

The emulator runs in the benchmark's own process, so an API request costs the gateway's CPU
too; a real API server is farther away (a GET costs more latency, a watch event arrives later).
"""

from __future__ import annotations

import argparse
import base64
import collections
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from portcullis.api.manifests import Manifests  # noqa: E402
from portcullis.api.resources import MCPConnection, ToolMapping, VirtualMCPServer  # noqa: E402
from portcullis.compile import compile_strict  # noqa: E402
from portcullis.gateway.audit import MemoryAuditSink  # noqa: E402
from portcullis.gateway.cluster import build  # noqa: E402
from portcullis.gateway.credentials import Credentials  # noqa: E402
from portcullis.gateway.identity.tokens import SigningKeys, mint_token  # noqa: E402
from portcullis.gateway.runtime import Servers  # noqa: E402
from portcullis.kube import KubeClient  # noqa: E402
from portcullis.vault.kubernetes import KubernetesVault, credential_secret_name  # noqa: E402
from tests.support.agent import agent, result_text  # noqa: E402
from tests.support.kmock_support import Emulator, emulator  # noqa: E402
from tests.support.servers import load_example, run_asgi  # noqa: E402

NS = "acme"
SA_TOKEN = "good-token"
SA_USER = "system:serviceaccount:agents:runner"


def user(i: int) -> str:
    return f"user{i}@example.com"


def secret_of(i: int) -> str:
    return f"inbox-token-{i:04d}"


def config_json(inbox_url: str) -> str:
    m = Manifests(
        servers=[VirtualMCPServer.model_validate({"metadata": {"name": "summarizer", "namespace": NS}})],
        connections=[MCPConnection.model_validate(
            {"metadata": {"name": "inbox", "namespace": NS}, "spec": {"url": inbox_url, "credential": {"source": "user"}}}
        )],
        mappings=[ToolMapping.model_validate({
            "metadata": {"name": "m", "namespace": NS},
            "spec": {"serverRef": {"name": "summarizer"}, "connectionRef": {"name": "inbox"}, "tools": [{"name": "fetch_mails"}]},
        })],
    )
    return compile_strict(m.servers[0], m.mappings, m.connections).model_dump_json()


def serve_reviews(k8s: Emulator) -> None:
    def token_review(request: Any) -> dict[str, Any]:
        ok = request.data["spec"]["token"] == SA_TOKEN
        status = {"authenticated": True, "user": {"username": SA_USER, "groups": ["system:serviceaccounts"]}} if ok else {"authenticated": False}
        return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status}

    def access_review(request: Any) -> dict[str, Any]:
        spec = request.data["spec"]
        allowed = spec["user"] == SA_USER and spec["resourceAttributes"]["verb"] == "mint"
        return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "status": {"allowed": allowed}}

    k8s["post /apis/authentication.k8s.io/v1/tokenreviews"] << token_review
    k8s["post /apis/authorization.k8s.io/v1/subjectaccessreviews"] << access_review


def kind_of(request: Any) -> str:
    """One request of the emulator's log, as a short label: `GET secrets/<name>`, `WATCH secrets`, ..."""
    params = request.params or {}
    resource = getattr(request.resource, "plural", None) or str(request.url).split("?")[0].rsplit("/", 1)[-1]
    if params.get("watch") == "true":
        return f"WATCH {resource}"
    target = resource if request.name is None else f"{resource}/<name>"
    method = getattr(request.method, "value", request.method)
    return f"{str(method).upper()} {target}"


def count_since(k8s: Emulator, start: int) -> tuple[int, collections.Counter[str]]:
    log = list(k8s)
    return len(log) - start, collections.Counter(kind_of(r) for r in log[start:])


async def wait_for(predicate: Callable[[], Any], timeout: float, step: float = 0.0005) -> float:
    """Poll an async predicate until true; returns the seconds it took."""
    started = time.perf_counter()
    with anyio.fail_after(timeout):
        while not await predicate():
            await anyio.sleep(step)
    return time.perf_counter() - started


async def resolve_us(credentials: Credentials, who: str, calls: int, rounds: int) -> float:
    if await credentials.headers(who, "inbox") is None:
        raise SystemExit("the resolver answered nothing for a connected user")
    per_round = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            await credentials.headers(who, "inbox")
        per_round.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(per_round)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    inbox = load_example("examples/inbox/server.py")
    required = {f"Bearer {secret_of(i)}": user(i) for i in range(args.users)}
    out: dict[str, Any] = {}
    with run_asgi(inbox.build_app(required_auth=required)) as inbox_url:
        async with emulator() as k8s, KubeClient(str(k8s.url)) as client, KubeClient(str(k8s.url)) as admin:
            serve_reviews(k8s)
            keys = SigningKeys.generate()
            base = f"/api/v1/namespaces/{NS}"
            await client.create(f"{base}/configmaps", {"metadata": {"name": "summarizer-config"}, "data": {"config.json": config_json(inbox_url)}})
            await client.create(f"{base}/secrets", {
                "metadata": {"name": "summarizer-signing-keys"}, "data": {"keys.json": base64.b64encode(keys.to_json().encode()).decode()},
            })
            other_replica = KubernetesVault(admin, NS)
            for i in range(args.users):
                await other_replica.put(NS, user(i), "inbox", secret_of(i))
            with tempfile.TemporaryDirectory() as state:
                servers = await build(client, "summarizer", NS, "127.0.0.1", (0, 0, 0, 0), audit=MemoryAuditSink(), state_dir=Path(state))
                async with anyio.create_task_group() as tg:
                    tg.start_soon(servers.serve)
                    with anyio.fail_after(30):
                        while not servers.started.is_set():
                            await anyio.sleep(0.01)
                    out.update(await measure(args, k8s, admin, other_replica, servers, keys))
                    servers.stop()
    return out


async def measure(
    args: argparse.Namespace, k8s: Emulator, admin: KubeClient, other_replica: KubernetesVault, servers: Servers, keys: SigningKeys
) -> dict[str, Any]:
    gateway: Any = servers.gateway
    config = gateway.config
    vault = gateway.credentials.vault
    url = f"http://127.0.0.1:{servers.listeners[0].port}/mcp"
    out: dict[str, Any] = {}

    def token(who: str) -> str:
        minted, _ = mint_token(keys, issuer=config.server.issuer, audience=config.server.url, user=who, tenant=NS, ttl_seconds=3600)
        return minted

    async with agents(url, [token(user(i)) for i in range(args.users)]) as sessions:
        async def call(i: int) -> str:
            result = await sessions[i].call_tool("fetch_mails", {"limit": 1})
            return "refused" if result.is_error and "connect inbox first" in result_text(result) else ("error" if result.is_error else "ok")

        # Warm-up: every user once, and until the watch (if any) has the credentials.
        for _ in range(3):
            for i in range(args.users):
                if (outcome := await call(i)) != "ok":
                    raise SystemExit(f"warm-up call of user {i} answered {outcome}")
        await anyio.sleep(0.2)

        # -- API requests per tool call -----------------------------------------------------------
        start = len(list(k8s))
        started = time.perf_counter()
        per_worker = args.calls // args.concurrency
        failures = 0

        async def worker(w: int) -> None:
            nonlocal failures
            for n in range(per_worker):
                if await call((w * per_worker + n) % args.users) != "ok":
                    failures += 1

        async with anyio.create_task_group() as tg:
            for w in range(args.concurrency):
                tg.start_soon(worker, w)
        calls = per_worker * args.concurrency
        elapsed = time.perf_counter() - started
        total, kinds = count_since(k8s, start)
        out["calls"] = {"calls": calls, "failures": failures, "seconds": elapsed, "api_requests": total,
                        "per_call": total / calls, "kinds": dict(kinds)}

        # -- deletion-to-refusal ------------------------------------------------------------------
        vault_cut, call_cut, calls_until_cut, restore = [], [], [], []
        vault_after_ack, call_after_ack = [], []
        for trial in range(args.trials):
            i = trial % args.users
            path = f"/api/v1/namespaces/{NS}/secrets/{credential_secret_name(user(i))}"
            attempts = 0

            async def vault_says_absent() -> bool:
                return await vault.get(NS, user(i), "inbox") is None

            async def refused_call() -> bool:
                nonlocal attempts
                attempts += 1
                return await call(i) == "refused"

            sent = time.perf_counter()
            assert await admin.delete(path)
            acked = time.perf_counter()
            if trial % 2 == 0:  # alternate which probe runs, so neither slows the other
                await wait_for(vault_says_absent, 30)
                done = time.perf_counter()
                vault_cut.append(done - sent)
                vault_after_ack.append(done - acked)
            else:
                await wait_for(refused_call, 30, step=0)
                done = time.perf_counter()
                call_cut.append(done - sent)
                call_after_ack.append(done - acked)
                calls_until_cut.append(attempts)
            put_at = time.perf_counter()
            await other_replica.put(NS, user(i), "inbox", secret_of(i))

            async def served() -> bool:
                return await call(i) == "ok"

            await wait_for(served, 30, step=0)
            restore.append(time.perf_counter() - put_at)
        out["cut"] = {"vault": vault_cut, "call": call_cut, "vault_after_ack": vault_after_ack, "call_after_ack": call_after_ack,
                      "calls_until_cut": calls_until_cut, "restore": restore}

    # -- API requests per admin request ------------------------------------------------------------
    admin_url = f"http://127.0.0.1:{servers.listeners[1].port}/v1/tokens"
    async with httpx2.AsyncClient(timeout=10) as http:
        first = await http.post(admin_url, json={"user": user(0)}, headers={"Authorization": f"Bearer {SA_TOKEN}"})
        if first.status_code != 201:
            raise SystemExit(f"minting answered {first.status_code}: {first.text}")
        start = len(list(k8s))
        statuses: collections.Counter[int] = collections.Counter()
        minting = time.perf_counter()
        for _ in range(args.mints):
            answer = await http.post(admin_url, json={"user": user(0)}, headers={"Authorization": f"Bearer {SA_TOKEN}"})
            statuses[answer.status_code] += 1
        total, kinds = count_since(k8s, start)
        out["mints"] = {"mints": args.mints, "statuses": dict(statuses), "seconds": time.perf_counter() - minting,
                        "api_requests": total, "per_mint": total / args.mints, "kinds": dict(kinds)}

    # -- resolve cost per call ---------------------------------------------------------------------
    direct = KubernetesVault(admin, NS)  # no watch running: every read is a GET, every read unseals
    out["resolve_us"] = {
        "gateway's vault (as served)": await resolve_us(Credentials(lambda: config, vault), user(1), args.resolve_calls, 5),
        "vault without a watch (direct GET)": await resolve_us(Credentials(lambda: config, direct), user(1), max(20, args.resolve_calls // 20), 5),
    }
    out["mirror"] = gateway.background.status()
    return out


@asynccontextmanager
async def agents(url: str, tokens: list[str]) -> AsyncIterator[list[Any]]:
    async with AsyncExitStack() as stack:
        sessions = [await stack.enter_async_context(agent(url, t, "2026-07-28")) for t in tokens]
        yield sessions


def ms(values: list[float]) -> str:
    if not values:
        return "n/a"
    v = sorted(x * 1000 for x in values)
    return f"median {statistics.median(v):.2f} ms (min {v[0]:.2f}, max {v[-1]:.2f}, n={len(v)})"


def report(out: dict[str, Any]) -> str:
    c, m, cut = out["calls"], out["mints"], out["cut"]
    lines = [
        f"tool calls: {c['calls']} ({c['failures']} failed) in {c['seconds']:.1f} s; API requests {c['api_requests']} "
        f"-> {c['per_call']:.4f} per call",
        "  by kind: " + (", ".join(f"{k} {n}" for k, n in sorted(c["kinds"].items())) or "none"),
        f"admin mints: {m['mints']} {m['statuses']} in {m['seconds']:.1f} s; API requests {m['api_requests']} -> {m['per_mint']:.3f} per mint",
        "  by kind: " + (", ".join(f"{k} {n}" for k, n in sorted(m["kinds"].items())) or "none"),
        f"DELETE sent -> vault says not connected:  {ms(cut['vault'])}",
        f"DELETE acked -> vault says not connected: {ms(cut['vault_after_ack'])}",
        f"DELETE sent -> tool call refused:         {ms(cut['call'])}",
        f"DELETE acked -> tool call refused:        {ms(cut['call_after_ack'])}; calls until refused {cut['calls_until_cut']}",
        f"put again (another replica) -> served:    {ms(cut['restore'])}",
    ]
    for name, us in out["resolve_us"].items():
        lines.append(f"resolve, {name}: {us:.1f} us/call")
    lines.append("loops: " + ", ".join(f"{k} synced={v['synced']} failing={v['failing']}" for k, v in out["mirror"].items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--trials", type=int, default=18)
    parser.add_argument("--mints", type=int, default=200)
    parser.add_argument("--resolve-calls", type=int, default=2000)
    args = parser.parse_args()
    if args.users < 2:
        parser.error("--users must be at least 2")
    print(report(anyio.run(run, args)))


if __name__ == "__main__":
    main()
