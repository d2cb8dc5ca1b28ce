"""The example RBAC for an application backend that mints session tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rbac" / "app-backend-minter.yaml"


def docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]


def by_kind(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs() if d["kind"] == kind]
    return doc


@pytest.mark.parametrize("doc", docs(), ids=lambda d: str(d["kind"]))
def test_every_object_is_valid_kubernetes(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, "1.33", strict=True)


def test_role_grants_mint_on_one_server_only() -> None:
    assert by_kind("Role")["rules"] == [
        {
            "apiGroups": ["portcullis.dev"],
            "resources": ["virtualmcpservers"],
            "resourceNames": ["summarizer"],
            "verbs": ["mint"],
        }
    ]


def test_binding_ties_the_role_to_the_backend_service_account() -> None:
    account, role, binding = by_kind("ServiceAccount"), by_kind("Role"), by_kind("RoleBinding")
    assert account["metadata"] == {"name": "app-backend", "namespace": "acme"}
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "app-backend", "namespace": "acme"}]
    assert {d["metadata"]["namespace"] for d in docs()} == {"acme"}


AUDITOR = EXAMPLE.parent / "auditor.yaml"


@pytest.mark.parametrize("doc", [d for d in yaml.safe_load_all(AUDITOR.read_text()) if d], ids=lambda d: str(d["kind"]))
def test_the_auditor_example_is_valid_and_grants_only_audit(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, "1.33", strict=True)
    if doc["kind"] == "Role":
        assert doc["rules"] == [
            {"apiGroups": ["portcullis.dev"], "resources": ["virtualmcpservers"], "resourceNames": ["summarizer"], "verbs": ["audit"]}
        ]
