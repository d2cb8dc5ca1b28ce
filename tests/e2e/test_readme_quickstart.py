"""The README's cluster quickstart, checked without a cluster: every path, flag, name and port.

The cluster suite runs the block verbatim (conftest.py); these tests run everywhere and read the
same commands (quickstart.py), so a renamed file, a chart value that does not exist, a port the
Service does not have or a verb the app backend is not granted fails here, before any cluster.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python as helm
import pytest
import yaml

from portcullis.api.manifests import load_manifests
from portcullis.api.status import ConditionType
from portcullis.compile import compile_strict
from portcullis.render.metadata import ADMIN_PORT, MCP_PORT
from portcullis.render.service import build_service
from tests.e2e import environment
from tests.e2e.quickstart import BEGIN, END, Curl, Names, Quickstart, QuickstartError, names, parse_flags, script
from tests.examples.admin_api import granted_verbs, route_for

ROOT = Path(__file__).resolve().parents[2]
QS = Quickstart.from_readme()
Doc = dict[str, Any]


def applied_files() -> list[Path]:
    files: list[Path] = []
    for argv in QS.find("kubectl", "apply"):
        _, flags = parse_flags(argv[2:], with_value=("-f", "--filename", "-n", "--namespace"), without_value=("--server-side",))
        for name, value in flags:
            if name in ("-f", "--filename"):
                path = ROOT / str(value)
                assert path.exists(), f"kubectl apply -f {value}: no such file or directory"
                # Without -R, kubectl reads a directory's top level only, in lexical order.
                files.extend(sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".json")) if path.is_dir() else [path])
    return files


def applied() -> list[Doc]:
    return [d for p in applied_files() for d in yaml.safe_load_all(p.read_text()) if d]


def named(kind: str, name: str, namespace: str) -> Doc:
    found = [d for d in applied() if d["kind"] == kind and d["metadata"]["name"] == name and d["metadata"].get("namespace") == namespace]
    assert len(found) == 1, f"the quickstart applies no single {kind} {namespace}/{name}"
    return found[0]


def flag(flags: list[tuple[str, str | None]], *names: str) -> str | None:
    values = [v for n, v in flags if n in names]
    return values[-1] if values else None


def port_forward() -> tuple[str, str, dict[int, int]]:
    """(namespace, target, {local port: remote port}) of the quickstart's port-forward."""
    positionals, flags = parse_flags(QS.one("kubectl", "port-forward")[2:], with_value=("-n", "--namespace", "--address"))
    target, *ports = positionals
    pairs = {int(local): int(remote) for local, _, remote in (p.partition(":") for p in ports)}
    return str(flag(flags, "-n", "--namespace")), target, pairs


def to_port(curl: Curl) -> int:
    """The gateway port a curl reaches through the port-forward."""
    url = urlsplit(curl.url)
    assert url.hostname == "127.0.0.1", f"{curl.url}: the quickstart talks to the port-forward on 127.0.0.1"
    _, _, pairs = port_forward()
    assert url.port in pairs, f"{curl.url}: port {url.port} is not forwarded"
    return pairs[url.port]


def server() -> Any:
    namespace, name = wait_target()
    (found,) = [s for s in load_manifests(applied_files()).servers if (s.metadata.namespace, s.metadata.name) == (namespace, name)]
    return found


def compiled() -> Any:
    manifests = load_manifests(applied_files())
    return compile_strict(server(), manifests.mappings, manifests.connections)


def wait_target() -> tuple[str, str]:
    positionals, flags = parse_flags(QS.one("kubectl", "wait")[2:], with_value=("-n", "--namespace", "--for", "--timeout"))
    (target,) = positionals
    kind, _, name = target.partition("/")
    crd = yaml.safe_load((ROOT / "crds" / "portcullis.dev_virtualmcpservers.yaml").read_text())
    assert kind in crd["spec"]["names"]["shortNames"] + [crd["spec"]["names"]["plural"], crd["spec"]["names"]["singular"]]
    assert flag(flags, "--for") == f"condition={ConditionType.READY.value}"
    return str(flag(flags, "-n", "--namespace")), name


# --- the block ---------------------------------------------------------------------------------


def test_the_quickstart_is_one_shell_block_between_the_markers_in_the_cluster_section() -> None:
    block = script()
    assert block.strip() and not block.lstrip().startswith("#")
    assert QS.commands[0][:2] == ["docker", "build"]
    # The suite gets its cluster from the environment (the workflow's kind); making one is the reader's step before.
    assert not QS.find("kind", "create")


@pytest.mark.parametrize(
    "broken",
    [
        "no markers at all",
        f"### In a cluster\n{BEGIN}\n```sh\necho 1\n```\n{END}\n{BEGIN}\n",
        f"### In a cluster\n{BEGIN}\n```sh\necho 1\n```\nprose\n{END}\n",
        f"## Elsewhere\n{BEGIN}\n```sh\necho 1\n```\n{END}\n",
    ],
    ids=["missing", "twice", "not only a block", "outside the section"],
)
def test_a_quickstart_the_suite_could_not_run_verbatim_is_an_error(broken: str) -> None:
    with pytest.raises(QuickstartError):
        script(broken)


def test_an_unknown_flag_is_an_error_not_a_guess() -> None:
    with pytest.raises(QuickstartError, match="--wat"):
        parse_flags(["x", "--wat"], with_value=("-n",))


# --- image, chart, manifests -------------------------------------------------------------------


def test_one_image_tag_is_built_loaded_installed_and_run_by_the_example_upstream() -> None:
    positionals, flags = parse_flags(QS.one("docker", "build")[2:], with_value=("-t", "--tag", "-f", "--file"))
    assert positionals == ["."] and flag(flags, "-f", "--file") in (None, "Dockerfile")
    tag = str(flag(flags, "-t", "--tag"))
    assert QS.one("kind", "load", "docker-image")[3:] == [tag]
    assert environment.IMAGE == tag, "the suite's default PORTCULLIS_E2E_IMAGE must be the image the README builds"
    (upstream,) = [d for d in applied() if d["kind"] == "Deployment"]
    assert [c["image"] for c in upstream["spec"]["template"]["spec"]["containers"]] == [tag]
    assert installed_operator_image() == tag


def helm_install() -> tuple[list[str], list[tuple[str, str | None]]]:
    return parse_flags(
        QS.one("helm", "install")[2:],
        with_value=("-n", "--namespace", "--set", "--set-string", "--timeout", "--version", "-f", "--values"),
        without_value=("--create-namespace", "--wait", "--atomic"),
    )


def set_values() -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, value in helm_install()[1]:
        if name in ("--set", "--set-string"):
            key, _, raw = str(value).partition("=")
            *parents, leaf = key.split(".")
            node = values
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = raw
    return values


def installed_operator_image() -> str:
    (release, chart), _ = helm_install()
    with helm.Chart.load(ROOT / chart) as loaded:
        rendered = loaded.render(set_values(), name=release, namespace=environment.OPERATOR_NAMESPACE)
    docs = [d for path, text in rendered.items() if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return str(container["image"])


def test_every_helm_install_flag_is_known_and_every_set_value_is_a_chart_value() -> None:
    (release, chart), flags = helm_install()
    assert (ROOT / chart / "Chart.yaml").is_file(), f"{chart} is not a chart"
    assert flag(flags, "-n", "--namespace") == environment.OPERATOR_NAMESPACE
    assert ("--create-namespace", None) in flags
    defaults = yaml.safe_load((ROOT / chart / "values.yaml").read_text())

    def walk(given: dict[str, Any], known: dict[str, Any], path: str) -> None:
        for key, value in given.items():
            assert isinstance(known, dict) and key in known, f"--set {path}{key}: not a value of {chart}/values.yaml"
            if isinstance(value, dict):
                walk(value, known[key], f"{path}{key}.")

    walk(set_values(), defaults, "")


def test_every_applied_path_exists_and_the_namespace_comes_first() -> None:
    files = applied_files()
    assert files, "the quickstart applies nothing"
    first = next(d for d in yaml.safe_load_all(files[0].read_text()) if d)
    namespace, _ = wait_target()
    assert (first["kind"], first["metadata"]["name"]) == ("Namespace", namespace)


# --- the names the commands use are the objects they applied ----------------------------------


def test_the_wait_names_the_applied_server_and_its_ready_condition() -> None:
    namespace, name = wait_target()
    named("VirtualMCPServer", name, namespace)


def test_the_port_forward_reaches_the_servers_service_on_its_agent_and_admin_ports() -> None:
    namespace, target, pairs = port_forward()
    kind, _, name = target.partition("/")
    assert kind in ("svc", "service")
    applied_server = server()
    # As the API server would have it: with a uid, which the owner reference of the Service names.
    service = build_service(applied_server.model_copy(update={"metadata": applied_server.metadata.model_copy(update={"uid": "uid"})}))
    assert (service["metadata"]["namespace"], service["metadata"]["name"]) == (namespace, name)
    assert set(pairs.values()) == {MCP_PORT, ADMIN_PORT}
    assert set(pairs.values()) <= {p["port"] for p in service["spec"]["ports"]}


def service_account() -> tuple[str, str]:
    positionals, flags = parse_flags(QS.one("kubectl", "create", "token")[3:], with_value=("-n", "--namespace", "--duration"))
    (account,) = positionals
    namespace = str(flag(flags, "-n", "--namespace"))
    named("ServiceAccount", account, namespace)
    return account, namespace


def admin_calls() -> list[Curl]:
    return [c for c in QS.curls() if to_port(c) == ADMIN_PORT]


def test_each_admin_call_is_a_route_the_app_backend_is_granted_with_its_own_token() -> None:
    account, namespace = service_account()
    _, name = wait_target()
    granted = granted_verbs(applied(), account=account, namespace=namespace, server=name)
    calls = admin_calls()
    assert [c.method for c in calls] == ["PUT", "POST"], "store the credential, then mint"
    for call in calls:
        route = route_for(call.method, urlsplit(call.url).path)
        assert route.verb in granted, f"{call.method} {route.path} needs `{route.verb}`; {account} is granted {sorted(granted)}"
        assert call.header("Authorization") == f"Bearer $(kubectl create token {account} -n {namespace})"
        assert isinstance(json.loads(call.data or ""), dict)


def test_the_stored_credential_is_the_one_the_example_upstream_accepts_for_the_minted_user() -> None:
    put, mint = admin_calls()
    *_, user, _, connection = urlsplit(put.url).path.split("/")
    assert connection in compiled().user_connections()
    assert json.loads(mint.data or "")["user"] == user
    (upstream,) = [d for d in applied() if d["kind"] == "Deployment"]
    (container,) = upstream["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    accepted = dict(str(args[i + 1]).split("=", 1) for i, a in enumerate(args) if a == "--auth")
    assert accepted[user] == json.loads(put.data or "")["secret"]


def test_the_agent_calls_an_exposed_tool_on_the_agent_port_with_the_minted_token() -> None:
    (call,) = [c for c in QS.curls() if to_port(c) == MCP_PORT]
    assert urlsplit(call.url).path == "/mcp"
    assert call.header("Authorization") == "Bearer $TOKEN"
    assert "/v1/tokens" in QS.assignments["TOKEN"] and '["token"]' in QS.assignments["TOKEN"]
    body = json.loads(call.data or "")
    params = body["params"]
    assert body["method"] == call.header("Mcp-Method") == "tools/call"
    assert params["name"] == call.header("Mcp-Name")
    assert params["name"] in [t.name for t in compiled().tools]
    assert params["_meta"]["io.modelcontextprotocol/protocolVersion"] == call.header("MCP-Protocol-Version")
    assert set(map(str.strip, str(call.header("Accept")).split(","))) == {"application/json", "text/event-stream"}


# --- the workflow runs what the README says, where the README says ------------------------------


def test_the_kind_workflow_gives_the_suite_the_cluster_and_image_the_readme_assumes() -> None:
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "e2e-kind.yaml").read_text())
    (job,) = workflow["jobs"].values()
    kind_steps = [s for s in job["steps"] if str(s.get("uses", "")).startswith("helm/kind-action")]
    assert [s.get("with", {}).get("cluster_name") for s in kind_steps] == ["kind"], (
        "`kind load docker-image` without --name loads into the cluster named kind"
    )
    assert job["env"]["PORTCULLIS_E2E"] == "1"
    assert job["env"].get("PORTCULLIS_E2E_IMAGE", environment.IMAGE) == environment.IMAGE
    runs = "\n".join(str(s.get("run", "")) for s in job["steps"])
    assert "pytest tests/e2e" in runs
    assert "helm install" not in runs, "the README's commands install the chart; a second install would fail them"


def test_the_names_the_cluster_story_carries_on_with_are_the_quickstarts() -> None:
    put, _ = admin_calls()
    *_, user, _, connection = urlsplit(put.url).path.split("/")
    (call,) = [c for c in QS.curls() if to_port(c) == MCP_PORT]
    assert names(QS) == Names(
        namespace=wait_target()[0], server=wait_target()[1], account=service_account()[0], user=user,
        connection=connection, secret=json.loads(put.data or "")["secret"], tool=str(call.header("Mcp-Name")),
    )
