"""Unseal once per change: every store keeps an opened credential only while its sealed value is unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import portcullis.vault.base
import portcullis.vault.kubernetes
from portcullis.vault.base import Plaintexts
from portcullis.vault.sealing import SealError, new_key, seal, unseal
from tests.support.vaults import KINDS, two_handles

@pytest.fixture
def unseals(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    opened: list[str] = []

    def counting(key: bytes, sealed: str, **where: Any) -> str:
        opened.append(where["connection"])
        return unseal(key, sealed, **where)

    monkeypatch.setattr(portcullis.vault.base, "unseal", counting)
    monkeypatch.setattr(portcullis.vault.kubernetes, "unseal", counting)
    return opened


@pytest.mark.anyio
@pytest.mark.parametrize("kind", KINDS)
async def test_an_unchanged_credential_is_unsealed_once(kind: str, tmp_path: Path, unseals: list[str]) -> None:
    async with two_handles(kind, tmp_path) as (vault, _):
        await vault.put("acme", "alice", "gmail", "g-secret")
        for _ in range(20):
            assert await vault.get("acme", "alice", "gmail") == "g-secret"
        assert unseals == ["gmail"]


@pytest.mark.anyio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_changed_credential_is_opened_again_and_served_new(kind: str, tmp_path: Path, unseals: list[str]) -> None:
    async with two_handles(kind, tmp_path) as (vault, other):
        await vault.put("acme", "alice", "gmail", "old")
        assert await vault.get("acme", "alice", "gmail") == "old"
        await other.put("acme", "alice", "gmail", "new")
        assert await vault.get("acme", "alice", "gmail") == "new"
        assert await vault.get("acme", "alice", "gmail") == "new"
        assert unseals == ["gmail", "gmail"]


@pytest.mark.anyio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_deleted_credential_is_not_served_from_memory(kind: str, tmp_path: Path, unseals: list[str]) -> None:
    async with two_handles(kind, tmp_path) as (vault, other):
        await vault.put("acme", "alice", "gmail", "g")
        assert await vault.get("acme", "alice", "gmail") == "g"
        assert await other.delete("acme", "alice", "gmail") is True
        assert await vault.get("acme", "alice", "gmail") is None
        await other.put("acme", "alice", "gmail", "g")  # the same plaintext, sealed anew: opened anew
        assert await vault.get("acme", "alice", "gmail") == "g"
        assert unseals == ["gmail", "gmail"]


def test_a_value_that_does_not_open_is_never_kept() -> None:
    plain = Plaintexts()
    key = new_key()
    sealed = seal(key, "g", tenant="acme", user="alice", connection="gmail")
    for _ in range(2):  # refused every time, not remembered as anything
        with pytest.raises(SealError):
            plain.open(("globex", "alice", "gmail"), key, sealed)
    assert len(plain) == 0


def test_a_different_tenant_key_drops_the_kept_plaintext() -> None:
    plain = Plaintexts()
    where = ("acme", "alice", "gmail")
    key = new_key()
    sealed = seal(key, "g", tenant="acme", user="alice", connection="gmail")
    assert plain.open(where, key, sealed) == "g"
    assert plain.opened(where, key, sealed) == "g"
    assert plain.opened(where, new_key(), sealed) is None
    assert len(plain) == 0  # dropped, not merely skipped


def test_the_kept_plaintexts_are_bounded_oldest_first() -> None:
    plain = Plaintexts(capacity=3)
    key = new_key()
    for i in range(5):
        plain.keep(("acme", f"u{i}", "gmail"), key, f"sealed-{i}", f"p{i}")
    assert len(plain) == 3
    assert plain.opened(("acme", "u0", "gmail"), key, "sealed-0") is None
    assert plain.opened(("acme", "u4", "gmail"), key, "sealed-4") == "p4"
