"""What resolving a user's credential costs per call: a static secret vs an OAuth grant.

The resolve step of the call path (credentials.py) reads and unseals the user's vault entry on
every call. For `source: oauth` the entry is a JSON record (grant, pending flows) that is also
parsed and checked for being due. This measures `Credentials.headers` for both, on the local
vault (what `portcullis serve` uses) and the in-memory one, interleaved in rounds so machine
noise hits both alike, and reports medians and the ratio. No refresh happens: the grant is
fresh (a refresh is one token request, whose cost is the authorization server's).

    python -m benchmarks.credential_resolution [--calls 2000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from portcullis.api.config import ConnectionConfig, GatewayConfig, ServerInfo
from portcullis.api.resources import CredentialSpec, OAuthSpec
from portcullis.gateway.credentials import Credentials
from portcullis.gateway.oauth.record import Grant, Record
from portcullis.vault.base import MemoryVault, Vault
from portcullis.vault.local import LocalVault

TENANT, USER = "acme", "ada@example.com"


def config() -> GatewayConfig:
    return GatewayConfig(
        server=ServerInfo(name="s", namespace=TENANT, url="http://127.0.0.1:1/mcp", issuer="i"),
        tenant=TENANT,
        vault_namespace=TENANT,
        connections={
            "static": ConnectionConfig(name="static", url="http://127.0.0.1:2/mcp", credential=CredentialSpec(source="user")),
            "grant": ConnectionConfig(
                name="grant", url="http://127.0.0.1:3/mcp", credential=CredentialSpec(source="oauth", oauth=OAuthSpec())
            ),
        },
    )


async def prepare(vault: Vault) -> None:
    await vault.put(TENANT, USER, "static", "s" * 40)
    now = time.time()
    grant = Grant(access_token="a" * 800, refresh_token="r" * 40, expires_at=now + 3600, scope="mail.read", client_id="c", obtained_at=now)
    await vault.put(TENANT, USER, "grant", Record(grant=grant).dumps())


async def per_call_us(credentials: Credentials, connection: str, calls: int) -> float:
    # A resolver that answers wrongly must not report a speed.
    expected = {"static": "Bearer " + "s" * 40, "grant": "Bearer " + "a" * 800}[connection]
    if await credentials.headers(USER, connection) != {"Authorization": expected}:
        raise SystemExit(f"{connection}: the resolved header is not the stored credential")
    start = time.perf_counter()
    for _ in range(calls):
        await credentials.headers(USER, connection)
    return (time.perf_counter() - start) / calls * 1e6


async def run(calls: int, rounds: int) -> None:
    cfg = config()
    with tempfile.TemporaryDirectory() as state:
        for name, vault in (("local (serve)", LocalVault(Path(state))), ("memory", MemoryVault())):
            await prepare(vault)
            credentials = Credentials(lambda: cfg, vault)
            static, grant = [], []
            for _ in range(rounds):  # interleaved: each round measures both
                static.append(await per_call_us(credentials, "static", calls))
                grant.append(await per_call_us(credentials, "grant", calls))
            s, g = statistics.median(static), statistics.median(grant)
            print(f"{name:14s} static secret {s:7.1f} us/call   OAuth grant {g:7.1f} us/call   ratio {g / s:4.2f}x")
            await credentials.oauth.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    asyncio.run(run(args.calls, args.rounds))


if __name__ == "__main__":
    main()
