"""The command line as an agent developer uses it: compile, serve, credentials, token mint/revoke."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from portcullis.cli import main
from tests.support.servers import portcullis_serve

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "examples" / "inbox" / "manifests"


def run_cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "portcullis.cli", *args],
        capture_output=True, text=True, timeout=60, input=stdin, env={**os.environ, **(env or {})},
    )


def test_compile_prints_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", "-f", str(MANIFESTS)]) == 0
    config = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in config["tools"]] == ["inbox_fetch_mails", "search_mails"]
    assert config["server"]["url"] == "http://summarizer.demo.svc:8080/mcp"


def test_compile_errors_name_object_and_field_and_exit_non_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.yaml").write_text(
        (MANIFESTS / "summarizer.yaml").read_text().replace("name: search_mails", "name: search_mails\n      as: 'bad name'")
        + "\n---\n" + (MANIFESTS / "connection.yaml").read_text()
    )
    assert main(["compile", "-f", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "ToolMapping/summarizer-inbox: spec.tools[1].as" in err and "not a valid MCP tool name" in err


@contextmanager
def serving(state: Path) -> Iterator[dict[str, str]]:
    with portcullis_serve(MANIFESTS, state_dir=state) as served:
        yield {"mcp": served.mcp, "admin": served.admin}


def test_serve_credentials_and_tokens_from_the_command_line(tmp_path: Path) -> None:
    state = str(tmp_path)
    with serving(tmp_path) as urls:
        admin = ["--state-dir", state, "--admin-url", urls["admin"]]
        refused = run_cli("token", "mint", "--user", "ada@example.com", *admin)
        assert refused.returncode == 1 and "connect them first" in refused.stderr
        stored = run_cli("credentials", "set", "-n", "demo", "--user", "ada@example.com", "--connection", "inbox", "--state-dir", state, stdin="s3cret\n")
        assert stored.returncode == 0, stored.stderr
        assert "s3cret" not in stored.stdout
        listed = run_cli("credentials", "list", "-n", "demo", "--user", "ada@example.com", "--state-dir", state)
        header, row = listed.stdout.splitlines()
        assert header.split() == ["CONNECTION", "CONNECTED", "HOW", "SCOPES", "REFRESHED"]
        assert row.split() == ["inbox", "yes", "static", "-", "-"]
        minted = run_cli("token", "mint", "--user", "ada@example.com", "--ttl", "5m", "--json", *admin)
        assert minted.returncode == 0, minted.stderr
        answer = json.loads(minted.stdout)
        assert answer["audience"] == urls["mcp"]
        revoked = run_cli("token", "revoke", "--jti", answer["jti"], *admin)
        assert revoked.returncode == 0, revoked.stderr
        too_long = run_cli("token", "mint", "--user", "ada@example.com", "--ttl", "3h", *admin)
        assert too_long.returncode == 1 and "maxTTL" in too_long.stderr


def test_token_mint_without_a_running_gateway_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "admin-secret").write_text("a-secret-that-is-long-enough\n")
    result = run_cli("token", "mint", "--user", "a", "--state-dir", str(tmp_path), "--admin-url", "http://127.0.0.1:9")
    assert result.returncode == 1
    assert "is `portcullis serve` running?" in result.stderr


def test_a_client_on_the_wrong_state_dir_is_told_so_and_creates_nothing(tmp_path: Path) -> None:
    result = run_cli("token", "mint", "--user", "a", "--state-dir", str(tmp_path / "elsewhere"), "--admin-url", "http://127.0.0.1:9")
    assert result.returncode == 1
    assert "no admin secret in" in result.stderr and "--state-dir" in result.stderr
    assert not (tmp_path / "elsewhere").exists()


def test_crds_check_and_write_work_as_the_help_says(tmp_path: Path) -> None:
    assert run_cli("crds", "--check", str(ROOT / "crds")).returncode == 0
    assert run_cli("crds", "--write", str(tmp_path)).returncode == 0
    assert run_cli("crds", "--check", str(tmp_path)).returncode == 0
    (tmp_path / sorted(p.name for p in tmp_path.iterdir())[0]).write_text("stale")
    stale = run_cli("crds", "--check", str(tmp_path))
    assert stale.returncode == 1 and "stale" in stale.stderr


def test_a_typo_in_a_kind_is_an_error_and_other_kinds_are_named_as_skipped(tmp_path: Path) -> None:
    for source in MANIFESTS.iterdir():
        (tmp_path / source.name).write_text(source.read_text())
    (tmp_path / "other.yaml").write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n")
    skipped = run_cli("compile", "-f", str(tmp_path))
    assert skipped.returncode == 0 and "skipped" in skipped.stderr and "Deployment web (apps/v1)" in skipped.stderr
    (tmp_path / "typo.yaml").write_text("apiVersion: portcullis.dev/v1alpha1\nkind: ToolMaping\nmetadata: {name: x}\n")
    typo = run_cli("compile", "-f", str(tmp_path))
    assert typo.returncode == 1 and "typo.yaml (document 1): unknown kind 'ToolMaping'" in typo.stderr


def test_a_port_in_use_is_named_with_the_flag_that_moves_it(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "-f", str(MANIFESTS), "--port", str(port), "--state-dir", str(tmp_path))
    assert result.returncode == 1
    assert f"127.0.0.1:{port} is already in use: choose another with --port" in result.stderr


def test_serve_refuses_a_url_agents_could_not_use_and_says_what_to_give(tmp_path: Path) -> None:
    result = run_cli("serve", "-f", str(MANIFESTS), "--url", "http://lb:9000", "--state-dir", str(tmp_path))
    assert result.returncode == 2
    assert "argument --url: public URL 'http://lb:9000' has no path" in result.stderr
    assert "e.g. http://lb:9000/mcp" in result.stderr


def test_credentials_set_refuses_a_tenant_or_connection_no_server_here_uses(tmp_path: Path) -> None:
    state = str(tmp_path)
    nobody = run_cli("credentials", "set", "-n", "demo", "--user", "ada@example.com", "--connection", "inbox", "--state-dir", state, stdin="s\n")
    assert nobody.returncode == 1 and "no virtual server of tenant 'demo' has run" in nobody.stderr
    with serving(tmp_path):
        pass  # the server records what it needs in the state directory
    wrong_tenant = run_cli("credentials", "set", "-n", "dmeo", "--user", "ada@example.com", "--connection", "inbox", "--state-dir", state, stdin="s\n")
    assert wrong_tenant.returncode == 1 and "tenant 'dmeo'" in wrong_tenant.stderr
    wrong_connection = run_cli("credentials", "set", "-n", "demo", "--user", "ada@example.com", "--connection", "gmail", "--state-dir", state, stdin="s\n")
    assert wrong_connection.returncode == 1 and "(they take: inbox)" in wrong_connection.stderr
    stored = run_cli("credentials", "set", "-n", "demo", "--user", "ada@example.com", "--connection", "inbox", "--state-dir", state, stdin="s\n")
    assert stored.returncode == 0, stored.stderr
