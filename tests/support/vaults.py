"""Every credential store, twice over one backend: the store under test and a second handle on the same
data (another process on the state directory, another replica on the API server)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from portcullis.kube import KubeClient
from portcullis.vault.base import MemoryVault, Vault
from portcullis.vault.kubernetes import KubernetesVault
from portcullis.vault.local import LocalVault
from tests.support.kmock_support import emulator

KINDS = ("memory", "local", "kubernetes")
NS = "acme-vault"


@asynccontextmanager
async def two_handles(kind: str, tmp_path: Path) -> AsyncIterator[tuple[Vault, Vault]]:
    if kind == "memory":
        vault = MemoryVault()
        yield vault, vault
    elif kind == "local":
        yield LocalVault(tmp_path), LocalVault(tmp_path)
    else:
        async with emulator() as k8s, KubeClient(str(k8s.url)) as one, KubeClient(str(k8s.url)) as two:
            yield KubernetesVault(one, NS), KubernetesVault(two, NS)
