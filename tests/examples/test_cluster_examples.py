"""The cluster examples are objects a real API server admits, and they fit together.

`examples/cluster/` is what the README's quickstart applies (`kubectl apply -f examples/cluster/`,
top level only); `examples/cluster/more/` holds variants applied on purpose. Built-in kinds are
validated against Kubernetes' own schemas (strict: unknown fields fail), custom objects against
the CRDs in crds/ (defaults, schema, CEL rules), and the three Portcullis objects must compile
to a server whose upstream is the example Deployment's Service.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from portcullis.api.manifests import load_manifests
from portcullis.compile import compile_strict
from tests.support.crd_schema import admit

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "examples" / "cluster"
K8S_VERSION = "1.33"
CRDS = {
    doc["spec"]["names"]["kind"]: doc
    for doc in (yaml.safe_load(p.read_text()) for p in sorted((ROOT / "crds").glob("*.yaml")))
}
Doc = dict[str, Any]


def kubectl_order(directory: Path) -> list[Path]:
    """The files `kubectl apply -f <directory>` reads, in its order: top level, lexical."""
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml", ".json"))


def documents(paths: list[Path]) -> list[tuple[str, Doc]]:
    return [(f"{p.relative_to(ROOT)}:{d['kind']}/{d['metadata']['name']}", d) for p in paths for d in yaml.safe_load_all(p.read_text()) if d]


QUICKSTART = documents(kubectl_order(CLUSTER))
MORE = documents(kubectl_order(CLUSTER / "more"))


@pytest.mark.parametrize(("where", "doc"), QUICKSTART + MORE, ids=[w for w, _ in QUICKSTART + MORE])
def test_every_object_is_admitted_strictly(where: str, doc: Doc) -> None:
    if doc["apiVersion"].startswith("portcullis.dev/"):
        assert admit(doc, CRDS[doc["kind"]]) == [], where
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubectl_creates_the_namespace_before_anything_in_it() -> None:
    first_where, first = QUICKSTART[0]
    assert (first["kind"], first["metadata"]["name"]) == ("Namespace", "acme"), first_where
    assert {d["metadata"].get("namespace") for _, d in QUICKSTART[1:]} == {"acme"}


def test_the_quickstart_namespace_enforces_the_restricted_pod_security_standard() -> None:
    _, namespace = QUICKSTART[0]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def by_kind(kind: str) -> list[Doc]:
    return [d for _, d in QUICKSTART if d["kind"] == kind]


def test_the_upstream_runs_the_inbox_example_from_the_portcullis_image_as_restricted_pods() -> None:
    (deployment,) = by_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # The image carries examples/ under /opt/portcullis (Dockerfile); the script is the repository's.
    command = container["command"]
    assert command[0] == "python" and command[1].startswith("/opt/portcullis/examples/")
    assert (ROOT / command[1].removeprefix("/opt/portcullis/")).is_file()
    assert "COPY examples /opt/portcullis/examples" in (ROOT / "Dockerfile").read_text()
    args = container["args"]
    assert args[args.index("--host") + 1] == "0.0.0.0"  # loopback would be unreachable through the Service
    # What the restricted Pod Security Standard asks of every container.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_the_connection_points_at_the_upstream_service_and_port() -> None:
    (deployment,), (service,) = by_kind("Deployment"), by_kind("Service")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    listen = int(container["args"][container["args"].index("--port") + 1])
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named[port["targetPort"]] == listen
    (connection,) = by_kind("MCPConnection")
    meta = service["metadata"]
    assert connection["spec"]["url"] == f"http://{meta['name']}.{meta['namespace']}.svc:{port['port']}/mcp"


def test_the_summarizer_compiles_to_two_inbox_tools_with_per_user_credentials() -> None:
    manifests = load_manifests(kubectl_order(CLUSTER))
    (server,) = manifests.servers
    config = compile_strict(server, manifests.mappings, manifests.connections)
    assert [(t.name, t.upstream_name, t.connection) for t in config.tools] == [
        ("inbox_fetch_mails", "fetch_mails", "inbox"),
        ("search_mails", "search_mails", "inbox"),
    ]
    assert config.user_connections() == ["inbox"]

