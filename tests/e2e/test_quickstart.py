"""The README's cluster quickstart, run verbatim, and the story carried on from where it stops.

conftest.py runs the README's block (build, load, install, apply, wait, port-forward, store a
credential with curl, mint, call). Then, against the same `acme/summarizer`, as the README's app
backend (its ServiceAccount token, `kubectl create token`) and as an agent (the MCP SDK client):
store a credential through the admin API, mint, call a tool, see a hidden tool refused, change
the ToolMapping and see tools/list change with no pod restarted, scale to two replicas, revoke
and see every replica refuse, delete the server and see its children go (its vault stays).

Needs a cluster: see environment.py. The tests run in file order; each leaves the server in the
state the next one starts from, as a reader following the story would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import anyio
import pytest

from tests.e2e.environment import TIMEOUT, skip_reason

if (_reason := skip_reason()) is not None:
    pytest.skip(_reason, allow_module_level=True)

from kubernetes import client, config  # noqa: E402  (only imported when the suite runs)
from kubernetes.dynamic import DynamicClient  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402

from tests.e2e.quickstart import QuickstartRun, names  # noqa: E402
from tests.e2e.support import (  # noqa: E402
    API,
    admin,
    call_tool,
    condition,
    eventually,
    get,
    merge_patch,
    port_forward,
    refusal,
    resource,
    service_account_token,
    wait_for,
    wait_gone,
)
from tests.support.agent import MODES, Mode, agent  # noqa: E402

pytestmark = pytest.mark.cluster

N = names()
GATEWAY_PODS = f"app.kubernetes.io/name=portcullis-gateway,app.kubernetes.io/instance={N.server}"
Obj = dict[str, Any]


@pytest.fixture(scope="module")
def dyn(readme_quickstart: QuickstartRun) -> Iterator[DynamicClient]:
    config.load_kube_config()
    with client.ApiClient() as api_client:
        yield DynamicClient(api_client)


@pytest.fixture(scope="module")
def app_token(readme_quickstart: QuickstartRun) -> str:
    return service_account_token(N.account, N.namespace)


@pytest.fixture(scope="module")
def gateway(readme_quickstart: QuickstartRun) -> Iterator[dict[str, str]]:
    """The server's Service, port-forwarded: {"mcp": base URL, "admin": base URL}."""
    with port_forward(N.namespace, f"svc/{N.server}", 8080, 8081) as ports:
        yield {"mcp": f"http://127.0.0.1:{ports[8080]}", "admin": f"http://127.0.0.1:{ports[8081]}"}


def mint(gateway: dict[str, str], app_token: str, user: str = N.user) -> Obj:
    answer = admin(gateway["admin"], "POST", "/v1/tokens", app_token, {"user": user})
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def gateway_pods(dyn: DynamicClient) -> list[Obj]:
    listing = resource(dyn, "v1", "Pod").get(namespace=N.namespace, label_selector=GATEWAY_PODS).to_dict()
    return [p for p in listing["items"] if not p["metadata"].get("deletionTimestamp")]


def restarts(dyn: DynamicClient) -> dict[str, int]:
    """{pod uid: container restarts} of the gateway pods."""
    return {
        p["metadata"]["uid"]: sum(c.get("restartCount", 0) for c in (p.get("status") or {}).get("containerStatuses") or [])
        for p in gateway_pods(dyn)
    }


# --- what the README's commands did ------------------------------------------------------------


def test_the_readme_commands_ran_and_the_agents_first_call_answered(readme_quickstart: QuickstartRun) -> None:
    answers = []
    for line in readme_quickstart.transcript.splitlines():
        start = line.find('{"jsonrpc"')
        if start != -1:
            answers.append(json.loads(line[start:]))
    assert answers, f"no JSON-RPC answer in the quickstart's output ({readme_quickstart.log})"
    result = answers[-1]["result"]
    assert result["isError"] is False
    assert len(result["structuredContent"]["mails"]) == 2


def test_the_server_is_ready_with_its_url_and_two_of_the_upstreams_tools(dyn: DynamicClient) -> None:
    server = wait_for(
        dyn, API, "VirtualMCPServer", namespace=N.namespace, name=N.server,
        until=lambda o: condition(o, "Ready") == "True" and (o.get("status") or {}).get("toolsSummary", "?/?").split("/")[1] != "?",
        what=f"{N.namespace}/{N.server} Ready, with the upstream's tool count",
    )
    assert server["status"]["url"] == f"http://{N.server}.{N.namespace}.svc:8080/mcp"
    assert server["status"]["toolsSummary"] == "2/35"  # what the README says `kubectl get portcullis` shows


# --- the app backend and the agent -------------------------------------------------------------


def test_a_credential_stored_through_the_admin_api_lets_that_user_mint_and_no_other(
    gateway: dict[str, str], app_token: str
) -> None:
    path = f"/v1/users/{N.user}/connections/{N.connection}"
    stored = admin(gateway["admin"], "PUT", path, app_token, {"secret": N.secret})
    assert stored.status_code == 204, stored.text
    assert admin(gateway["admin"], "PUT", path, "not-a-token", {"secret": N.secret}).status_code == 403
    token = mint(gateway, app_token)
    assert (token["user"], token["audience"]) == (N.user, f"http://{N.server}.{N.namespace}.svc:8080/mcp")
    refused = admin(gateway["admin"], "POST", "/v1/tokens", app_token, {"user": "bob@example.com"})
    assert refused.status_code == 409
    assert refused.json()["missing"] == [N.connection]


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_the_agent_calls_an_exposed_tool_and_a_hidden_one_is_refused(
    gateway: dict[str, str], app_token: str, mode: Mode
) -> None:
    token = mint(gateway, app_token)["token"]
    async with agent(gateway["mcp"] + "/mcp", token, mode) as session:
        assert sorted(t.name for t in (await session.list_tools()).tools) == ["inbox_fetch_mails", "search_mails"]
        result = await session.call_tool(N.tool, {"limit": 2})
        assert not result.is_error
        assert len((result.structured_content or {})["mails"]) == 2
        with pytest.raises(MCPError, match="Unknown tool: send_mail"):
            await session.call_tool("send_mail", {"to": ["x@example.com"], "subject": "s", "body": "b"})


async def exposed_tools(url: str, token: str) -> list[str]:
    async with agent(url, token, "2026-07-28") as session:
        return sorted(t.name for t in (await session.list_tools()).tools)


@pytest.mark.anyio
async def test_a_mapping_change_reaches_tools_list_without_restarting_a_pod(
    dyn: DynamicClient, gateway: dict[str, str], app_token: str
) -> None:
    before = restarts(dyn)
    generation = get(dyn, "apps/v1", "Deployment", N.server, N.namespace)["metadata"]["generation"]
    merge_patch(dyn, API, "ToolMapping", "summarizer-inbox", N.namespace, {"spec": {"tools": [
        {"name": "fetch_mails", "as": "inbox_fetch_mails", "description": "Fetch the user's recent mails (subject, sender, snippet)."},
        {"name": "search_mails"},
        {"name": "whoami"},
    ]}})
    token = mint(gateway, app_token)["token"]
    with anyio.fail_after(TIMEOUT):
        while "whoami" not in (tools := await exposed_tools(gateway["mcp"] + "/mcp", token)):
            await anyio.sleep(0.5)  # pacing between bounded polls; the deadline is the fail_after
    assert tools == ["inbox_fetch_mails", "search_mails", "whoami"]
    async with agent(gateway["mcp"] + "/mcp", token, "2026-07-28") as session:
        seen = await session.call_tool("whoami", {})
    # The upstream saw the user's own credential, from the vault, and knows whose it is.
    assert seen.structured_content == {"user": N.user, "authenticated": True}
    assert restarts(dyn) == before, "a mapping change must not restart or replace a gateway pod"
    assert get(dyn, "apps/v1", "Deployment", N.server, N.namespace)["metadata"]["generation"] == generation


def test_scaling_to_two_replicas_adds_a_gateway_and_a_disruption_budget(dyn: DynamicClient) -> None:
    merge_patch(dyn, API, "VirtualMCPServer", N.server, N.namespace, {"spec": {"replicas": 2}})
    wait_for(
        dyn, "apps/v1", "Deployment", namespace=N.namespace, name=N.server,
        until=lambda d: (d.get("spec") or {}).get("replicas") == 2 and (d.get("status") or {}).get("readyReplicas") == 2
        and (d.get("status") or {}).get("updatedReplicas") == 2,
        what="two ready gateway replicas",
    )
    budget = wait_for(
        dyn, "policy/v1", "PodDisruptionBudget", namespace=N.namespace, name=N.server, until=lambda o: True,
        what="the PodDisruptionBudget of a server with two replicas",
    )
    assert budget["spec"]["maxUnavailable"] == 1
    assert condition(get(dyn, API, "VirtualMCPServer", N.server, N.namespace), "Ready") == "True"


def test_a_revocation_reaches_every_replica(dyn: DynamicClient, gateway: dict[str, str], app_token: str) -> None:
    pods = [p["metadata"]["name"] for p in gateway_pods(dyn)]
    assert len(pods) == 2
    first, second = mint(gateway, app_token), mint(gateway, app_token)
    with ExitStack() as stack:
        replicas = {pod: f"http://127.0.0.1:{stack.enter_context(port_forward(N.namespace, f'pod/{pod}', 8080))[8080]}" for pod in pods}

        def answers(token: str) -> dict[str, str | None]:
            return {pod: refusal(call_tool(base, token, N.tool, {"limit": 1})) for pod, base in replicas.items()}

        assert answers(first["token"]) == answers(second["token"]) == dict.fromkeys(pods)
        # One token, by jti, posted to whichever replica the Service picks: every replica refuses it.
        revoked = admin(gateway["admin"], "POST", "/v1/revocations", app_token, {"jti": first["jti"]})
        assert revoked.status_code == 200, revoked.text
        eventually(lambda: answers(first["token"]) == dict.fromkeys(pods, "revoked"), "every replica to refuse the revoked token")
        assert answers(second["token"]) == dict.fromkeys(pods)
        # Every token of the user issued so far; one minted afterwards works everywhere.
        revoked = admin(gateway["admin"], "POST", "/v1/revocations", app_token, {"user": N.user})
        assert revoked.status_code == 200, revoked.text
        eventually(lambda: answers(second["token"]) == dict.fromkeys(pods, "revoked"), "every replica to refuse the user's tokens")
        assert answers(mint(gateway, app_token)["token"]) == dict.fromkeys(pods)


CHILDREN = [
    ("apps/v1", "Deployment", N.server),
    ("v1", "Service", N.server),
    ("v1", "ConfigMap", f"{N.server}-config"),
    ("v1", "ConfigMap", f"{N.server}-revocations"),
    ("v1", "Secret", f"{N.server}-signing-keys"),
    ("v1", "ServiceAccount", f"{N.server}-gateway"),
    ("rbac.authorization.k8s.io/v1", "Role", f"{N.server}-gateway"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding", f"{N.server}-gateway"),
    ("rbac.authorization.k8s.io/v1", "Role", f"{N.server}-vault"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding", f"{N.server}-vault"),
    ("policy/v1", "PodDisruptionBudget", N.server),
]


def test_deleting_the_server_removes_its_children_and_keeps_the_tenants_vault(dyn: DynamicClient) -> None:
    binding = ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", f"portcullis:{N.namespace}:{N.server}:auth-delegator")
    for api_version, kind, name in CHILDREN:
        get(dyn, api_version, kind, name, N.namespace)
    get(dyn, binding[0], binding[1], binding[2])
    resource(dyn, API, "VirtualMCPServer").delete(name=N.server, namespace=N.namespace)
    wait_gone(dyn, API, "VirtualMCPServer", N.server, N.namespace)
    for api_version, kind, name in CHILDREN:  # owner references: the garbage collector
        wait_gone(dyn, api_version, kind, name, N.namespace)
    wait_gone(dyn, binding[0], binding[1], binding[2])  # cluster-scoped: the operator's finalizer
    eventually(lambda: not gateway_pods(dyn) or None, "the gateway pods to go")
    # The users' sealed credentials and the tenant's keys belong to the tenant, not to one server.
    secrets = {s["metadata"]["name"] for s in resource(dyn, "v1", "Secret").get(namespace=N.namespace).to_dict()["items"]}
    assert {"portcullis-tenant-key", "portcullis-audit-key"} <= secrets
    assert any(s.startswith("portcullis-cred-") for s in secrets)
