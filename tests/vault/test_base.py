from __future__ import annotations

import pytest

from portcullis.vault.base import MemoryVault, Vault
from portcullis.vault.sealing import SealError


@pytest.mark.anyio
async def test_memory_vault_stores_gets_lists_and_deletes() -> None:
    vault: Vault = MemoryVault()
    assert await vault.get("acme", "alice", "gmail") is None
    await vault.put("acme", "alice", "gmail", "g-secret")
    await vault.put("acme", "alice", "slack", "s-secret")
    assert await vault.get("acme", "alice", "gmail") == "g-secret"
    assert await vault.connections_of("acme", "alice") == ["gmail", "slack"]
    assert await vault.connections_of("acme", "bob") == []
    assert await vault.delete("acme", "alice", "gmail") is True
    assert await vault.delete("acme", "alice", "gmail") is False
    assert await vault.get("acme", "alice", "gmail") is None


@pytest.mark.anyio
async def test_memory_vault_keeps_values_sealed() -> None:
    vault = MemoryVault()
    await vault.put("acme", "alice", "gmail", "g-secret")
    # Swap the sealed values of two users: neither opens in the other's slot.
    await vault.put("acme", "bob", "gmail", "b-secret")
    users = vault._sealed["acme"]
    users["alice"]["gmail"], users["bob"]["gmail"] = users["bob"]["gmail"], users["alice"]["gmail"]
    with pytest.raises(SealError):
        await vault.get("acme", "alice", "gmail")
