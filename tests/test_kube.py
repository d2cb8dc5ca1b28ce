from __future__ import annotations

import base64
import os
from pathlib import Path

import anyio
import pytest
import yaml

from portcullis.kube import KubeClient, KubeError
from tests.support.kmock_support import emulator

CM = "/api/v1/namespaces/acme/configmaps"


@pytest.mark.anyio
async def test_create_get_patch_delete_round_trip() -> None:
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        assert await client.get(f"{CM}/one") is None
        created = await client.create(CM, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "one"}, "data": {"a": "1"}})
        meta = created["metadata"]
        assert meta["namespace"] == "acme" and meta["uid"] and meta["creationTimestamp"]
        patched = await client.merge_patch(f"{CM}/one", {"data": {"a": None, "b": "2"}})
        assert patched["data"] == {"b": "2"}
        assert int(patched["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
        fetched = await client.get(f"{CM}/one")
        assert fetched is not None and fetched["data"] == {"b": "2"}
        assert await client.delete(f"{CM}/one") is True
        assert await client.delete(f"{CM}/one") is False


@pytest.mark.anyio
async def test_conflicts_and_stale_versions_raise_kube_error() -> None:
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "one"}}
        await client.create(CM, body)
        with pytest.raises(KubeError) as err:
            await client.create(CM, body)
        assert err.value.status == 409
        with pytest.raises(KubeError) as err:
            await client.merge_patch(f"{CM}/one", {"metadata": {"resourceVersion": "0"}, "data": {"x": "y"}})
        assert err.value.status == 409


@pytest.mark.anyio
async def test_watch_streams_existing_and_new_objects() -> None:
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        await client.create(CM, {"metadata": {"name": "before"}})
        seen: list[tuple[str, str]] = []
        with anyio.fail_after(5):
            async for kind, obj in client.watch(CM + "?fieldSelector=metadata.name%3Dbefore"):
                seen.append((kind, obj["metadata"]["name"]))
                if len(seen) == 1:
                    await client.merge_patch(f"{CM}/before", {"data": {"k": "v"}})
                elif len(seen) == 2:
                    await client.delete(f"{CM}/before")
                else:
                    break
        assert seen == [("ADDED", "before"), ("MODIFIED", "before"), ("DELETED", "before")]


@pytest.mark.anyio
async def test_watch_reconnects_after_a_gone_error() -> None:
    async with emulator() as k8s, KubeClient(str(k8s.url)) as client:
        await client.create(CM, {"metadata": {"name": "one"}})
        # The first watch request gets a 410 ERROR event and ends; later ones reach the emulator.
        gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}
        k8s["watch", "/api/v1/namespaces/acme/configmaps"][:1] << gone
        with anyio.fail_after(5):
            async for kind, obj in client.watch(CM, resource_version="5"):
                assert (kind, obj["metadata"]["name"]) == ("ADDED", "one")
                break
        watches = [r for r in k8s if r.params.get("watch") == "true"]
        assert [w.params.get("resourceVersion") for w in watches] == ["5", None]


@pytest.mark.anyio
async def test_the_token_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first")
    async with emulator() as k8s, KubeClient(str(k8s.url), token_file=str(token)) as client:
        await client.get(f"{CM}/x")
        token.write_text("second-longer")  # size changes even if the mtime granularity is coarse
        await client.get(f"{CM}/x")
        auths = [r.headers.get("Authorization") for r in k8s]
        assert auths == ["Bearer first", "Bearer second-longer"]


def test_in_cluster_reads_the_service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(RuntimeError):
        KubeClient.in_cluster(tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    (tmp_path / "token").write_text("t")
    (tmp_path / "ca.crt").write_text(_self_signed_pem(tmp_path))
    client = KubeClient.in_cluster(tmp_path)
    assert str(client.base_url) == "https://10.0.0.1:6443"
    assert client._headers()["Authorization"] == "Bearer t"


def test_from_kubeconfig_uses_the_current_context(tmp_path: Path) -> None:
    ca = _self_signed_pem(tmp_path)
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "b",
        "clusters": [
            {"name": "ca", "cluster": {"server": "https://a.example:6443", "insecure-skip-tls-verify": True}},
            {"name": "cb", "cluster": {"server": "https://b.example:6443",
                                       "certificate-authority-data": base64.b64encode(ca.encode()).decode()}},
        ],
        "users": [{"name": "ub", "user": {"token": "tok-b"}}],
        "contexts": [{"name": "a", "context": {"cluster": "ca", "user": "ub"}},
                     {"name": "b", "context": {"cluster": "cb", "user": "ub"}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    client = KubeClient.from_kubeconfig(path)
    assert str(client.base_url) == "https://b.example:6443"
    assert client._headers()["Authorization"] == "Bearer tok-b"
    assert str(KubeClient.from_kubeconfig(path, context="a").base_url) == "https://a.example:6443"


def _self_signed_pem(tmp_path: Path) -> str:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    assert os.fspath(tmp_path)
    return cert.public_bytes(serialization.Encoding.PEM).decode()
