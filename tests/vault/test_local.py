from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from portcullis.vault.local import LocalVault
from portcullis.vault.sealing import SealError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.anyio
async def test_local_vault_round_trips_and_lists(tmp_path: Path) -> None:
    vault = LocalVault(tmp_path)
    assert await vault.get("acme", "alice@example.com", "gmail") is None
    await vault.put("acme", "alice@example.com", "gmail", "g-secret")
    await vault.put("acme", "alice@example.com", "google.drive", "d-secret")
    await vault.put("acme", "bob", "gmail", "b-secret")
    assert await vault.get("acme", "alice@example.com", "gmail") == "g-secret"
    assert await vault.connections_of("acme", "alice@example.com") == ["gmail", "google.drive"]
    assert await vault.connections_of("acme", "bob") == ["gmail"]
    assert await vault.connections_of("globex", "bob") == []


@pytest.mark.anyio
async def test_local_vault_files_are_private(tmp_path: Path) -> None:
    vault = LocalVault(tmp_path)
    await vault.put("acme", "alice", "gmail", "g-secret")
    tenant_dir = tmp_path / "vault" / "acme"
    assert _mode(tmp_path / "vault") == 0o700
    assert _mode(tenant_dir) == 0o700
    files = sorted(tenant_dir.iterdir())
    assert [f.name for f in files if f.name == "tenant.key"] == ["tenant.key"]
    assert all(_mode(f) == 0o600 for f in files)
    assert not any(f.name.startswith(".tmp-") for f in files)
    assert all(b"g-secret" not in f.read_bytes() for f in files)


@pytest.mark.anyio
async def test_a_credential_file_copied_to_another_user_does_not_open(tmp_path: Path) -> None:
    vault = LocalVault(tmp_path)
    await vault.put("acme", "alice", "gmail", "alice-secret")
    await vault.put("acme", "bob", "gmail", "bob-secret")
    alice_file = vault._path("acme", "alice", "gmail")
    bob_file = vault._path("acme", "bob", "gmail")
    shutil.copyfile(alice_file, bob_file)
    with pytest.raises(SealError) as err:
        await vault.get("acme", "bob", "gmail")
    assert "alice-secret" not in str(err.value)


@pytest.mark.anyio
async def test_user_ids_with_slashes_stay_inside_the_tenant_directory(tmp_path: Path) -> None:
    vault = LocalVault(tmp_path)
    await vault.put("acme", "../../etc/passwd", "gmail", "s")
    await vault.put("acme", "ALICE", "gmail", "upper")
    await vault.put("acme", "alice", "gmail", "lower")
    names = {p.name for p in (tmp_path / "vault" / "acme").iterdir()}
    assert len(names) == 4 and all("/" not in n and ".." not in n.split(".")[0] for n in names)
    assert await vault.get("acme", "../../etc/passwd", "gmail") == "s"
    # Distinct even on case-insensitive file systems: the names differ by more than case.
    assert len({n.lower() for n in names}) == 4
    assert await vault.get("acme", "ALICE", "gmail") == "upper"


@pytest.mark.anyio
async def test_reads_happen_at_call_time(tmp_path: Path) -> None:
    vault = LocalVault(tmp_path)
    await vault.put("acme", "alice", "gmail", "old")
    assert await vault.get("acme", "alice", "gmail") == "old"
    await LocalVault(tmp_path).put("acme", "alice", "gmail", "new")  # another process, same dir
    assert await vault.get("acme", "alice", "gmail") == "new"
    assert await LocalVault(tmp_path).delete("acme", "alice", "gmail") is True
    assert await vault.get("acme", "alice", "gmail") is None
    assert await vault.delete("acme", "alice", "gmail") is False


@pytest.mark.anyio
async def test_two_vaults_on_one_directory_share_the_tenant_key(tmp_path: Path) -> None:
    a, b = LocalVault(tmp_path), LocalVault(tmp_path)
    await a.put("acme", "alice", "gmail", "s")
    await b.put("acme", "alice", "slack", "t")
    assert await a.get("acme", "alice", "slack") == "t"
    assert await b.get("acme", "alice", "gmail") == "s"


@pytest.mark.anyio
@pytest.mark.parametrize("tenant, connection", [("..", "gmail"), ("a/b", "gmail"), ("acme", "../x"), ("acme", "A")])
async def test_unsafe_tenant_or_connection_names_are_refused(tmp_path: Path, tenant: str, connection: str) -> None:
    with pytest.raises(ValueError):
        await LocalVault(tmp_path).put(tenant, "alice", connection, "s")
