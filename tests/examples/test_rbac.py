"""The example RBAC: an application backend that mints, one that does everything, an auditor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.examples.admin_api import admin_routes, admin_verbs, granted_verbs

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


# --- the app backend of the quickstart: every verb the admin API checks, each explained -------

APP_BACKEND = EXAMPLE.parent / "app-backend.yaml"


def app_backend_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(APP_BACKEND.read_text()) if d]


@pytest.mark.parametrize("doc", app_backend_docs(), ids=lambda d: str(d["kind"]))
def test_the_app_backend_example_is_valid_kubernetes(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, "1.33", strict=True)


def test_the_app_backend_is_granted_every_verb_the_admin_api_checks_on_one_server() -> None:
    (role,) = [d for d in app_backend_docs() if d["kind"] == "Role"]
    (rule,) = role["rules"]
    assert (rule["apiGroups"], rule["resources"], rule["resourceNames"]) == (["portcullis.dev"], ["virtualmcpservers"], ["summarizer"])
    # Read from gateway/admin.py: a verb added there and not here fails this test.
    assert sorted(rule["verbs"]) == sorted(admin_verbs())
    assert granted_verbs(app_backend_docs(), account="app-backend", namespace="acme", server="summarizer") == admin_verbs()
    assert granted_verbs(app_backend_docs(), account="app-backend", namespace="acme", server="researcher") == set()


def test_each_granted_verb_is_explained_beside_it_with_the_calls_it_opens() -> None:
    lines = APP_BACKEND.read_text().splitlines()
    verbs_at = {line.strip()[2:]: i for i, line in enumerate(lines) if line.strip().startswith("- ") and line.strip()[2:] in admin_verbs()}
    assert set(verbs_at) == admin_verbs()
    for verb, at in verbs_at.items():
        comment: list[str] = []
        for line in reversed(lines[:at]):
            if not line.strip().startswith("#"):
                break
            comment.insert(0, line.strip().lstrip("# "))
        explained = " ".join(comment)
        for route in (r for r in admin_routes() if r.verb == verb):
            assert route.path in explained and route.method in explained, f"{verb}: say it opens {route.method} {route.path}"


def test_the_app_backend_shares_its_account_with_the_minter_example_without_a_clash() -> None:
    # Both files may be applied together (the e2e suite does): same ServiceAccount, distinct Role and binding names.
    minter = {(d["kind"], d["metadata"]["name"]) for d in docs()}
    backend = {(d["kind"], d["metadata"]["name"]) for d in app_backend_docs()}
    assert minter & backend == {("ServiceAccount", "app-backend")}
