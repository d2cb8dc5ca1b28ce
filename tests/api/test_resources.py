"""The resource models reject what a platform engineer gets wrong, with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from portcullis.api.durations import format_duration, parse_duration
from portcullis.api.manifests import ManifestError, load_manifests
from portcullis.api.resources import MCPConnection, VirtualMCPServer


def test_shared_credential_requires_a_secret_ref() -> None:
    with pytest.raises(ValidationError, match="secretRef is required"):
        MCPConnection.model_validate(
            {"metadata": {"name": "c"}, "spec": {"url": "http://x/mcp", "credential": {"source": "shared"}}}
        )


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError, match="replicaz"):
        VirtualMCPServer.model_validate({"metadata": {"name": "s"}, "spec": {"replicaz": 2}})


def test_default_ttl_may_not_exceed_max_ttl() -> None:
    with pytest.raises(ValidationError, match="defaultTTL must not exceed maxTTL"):
        VirtualMCPServer.model_validate(
            {"metadata": {"name": "s"}, "spec": {"sessionTokens": {"defaultTTL": "2h", "maxTTL": "1h"}}}
        )


@pytest.mark.parametrize(("text", "seconds"), [("15m", 900), ("1h30m", 5400), ("90s", 90), ("7d", 604800)])
def test_durations_parse_and_format(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("text", ["", "15", "m", "1x", "15m junk", "-5m"])
def test_bad_durations_say_how_to_write_one(text: str) -> None:
    with pytest.raises(ValueError, match="e.g. 15m"):
        parse_duration(text)


def test_manifests_load_from_directories_lists_and_multi_document_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "apiVersion: portcullis.dev/v1alpha1\nkind: VirtualMCPServer\nmetadata: {name: s, namespace: n}\n---\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ignored}\n"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yml").write_text(
        "apiVersion: v1\nkind: List\nitems:\n"
        "- apiVersion: portcullis.dev/v1alpha1\n  kind: MCPConnection\n  metadata: {name: c, namespace: n}\n  spec: {url: 'http://x/mcp'}\n"
        "- apiVersion: v1\n  kind: Secret\n  metadata: {name: shared, namespace: n}\n  stringData: {token: s3cret}\n"
    )
    manifests = load_manifests([tmp_path])
    assert [s.metadata.name for s in manifests.servers] == ["s"]
    assert [c.metadata.name for c in manifests.connections] == ["c"]
    assert manifests.secrets[("n", "shared")] == {"token": "s3cret"}


def test_an_invalid_object_is_reported_with_file_kind_name_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("apiVersion: portcullis.dev/v1alpha1\nkind: MCPConnection\nmetadata: {name: gmail}\nspec: {url: 'ftp://x'}\n")
    with pytest.raises(ManifestError) as caught:
        load_manifests([path])
    message = str(caught.value)
    assert "bad.yaml" in message and "MCPConnection 'gmail'" in message and "spec.url" in message


def test_a_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no such file"):
        load_manifests([tmp_path / "nope"])
