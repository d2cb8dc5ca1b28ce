"""A small async Kubernetes REST client on aiohttp, shared by the gateway and the vault.

The gateway needs a handful of verbs on a few objects (read a Secret, merge-patch a ConfigMap,
watch one, post a TokenReview), on its hot path and in every replica. The official ``kubernetes``
client is synchronous and heavy to import; kopf belongs to the controller only. So this is the
minimum: JSON in, JSON out, Kubernetes ``Status`` failures as ``KubeError``.

Credentials: a bearer token (fixed, or read from a file and re-read whenever the file changes,
because projected ServiceAccount tokens rotate in place), or a client certificate from a
kubeconfig. TLS is verified against the given CA unless a kubeconfig says otherwise.

``watch`` is a reconnecting stream of ``(type, object)``: it resumes from the last
resourceVersion it saw; when the server says that version is gone (410) it restarts without one,
which replays the current objects as ADDED, so consumers must treat ADDED as an upsert. Only a
stream that served a while is reopened at once; after a failure, or a stream that ended soon
after it opened, the pause grows, so a server or proxy that closes every stream is not hammered.
"""

from __future__ import annotations

import base64
import json
import os
import random
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, cast

import aiohttp
import anyio
import yaml
from yarl import URL

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MERGE_PATCH = "application/merge-patch+json"
# Backoff jitter from a generator of our own, not the application's module-level one.
_jitter = random.Random()
# The first pause before reopening a watch that failed or ended at once; it doubles from here.
_MIN_BACKOFF = 0.2

JSONObject = dict[str, Any]


class KubeError(Exception):
    """A failed API call, as the server's ``Status`` described it."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class WatchGone(KubeError):
    """The watch's resourceVersion is too old (410 Gone): list again, then watch from the list's version."""

    def __init__(self) -> None:
        super().__init__(410, "Gone", "the watch's resourceVersion is no longer available; list again")


class _TokenFile:
    """A token file read again only when its (mtime, size, inode) changes: one stat per request."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        self._token = ""

    def read(self) -> str:
        st = os.stat(self._path)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            with open(self._path, encoding="utf-8") as f:
                self._token = f.read().strip()
            self._stamp = stamp
        return self._token


class KubeClient:
    """Async JSON access to one Kubernetes API server."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        ca_file: str | None = None,
        *,
        token_file: str | None = None,
        ca_data: str | None = None,
        client_cert: tuple[str, str] | None = None,
        insecure: bool = False,
    ) -> None:
        self.base_url = URL(base_url.rstrip("/"))
        self._token = token
        self._token_file = _TokenFile(token_file) if token_file else None
        self._ssl: ssl.SSLContext | bool
        if self.base_url.scheme == "https":
            if insecure:
                self._ssl = False
            else:
                context = ssl.create_default_context(cafile=ca_file, cadata=ca_data)
                if client_cert is not None:
                    context.load_cert_chain(*client_cert)
                self._ssl = context
        else:
            self._ssl = True  # plain http (tests, kubectl proxy): nothing to verify
        self._session: aiohttp.ClientSession | None = None

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def in_cluster(cls, service_account_dir: Path = SERVICE_ACCOUNT_DIR) -> KubeClient:
        """The pod's own ServiceAccount: token and CA from the mounted directory."""
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise RuntimeError("not running in a cluster: KUBERNETES_SERVICE_HOST is not set")
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        return cls(
            f"https://{host}:{port}",
            ca_file=str(service_account_dir / "ca.crt"),
            token_file=str(service_account_dir / "token"),
        )

    @classmethod
    def from_kubeconfig(cls, path: str | Path | None = None, *, context: str | None = None) -> KubeClient:
        """The current (or named) context of a kubeconfig: token, token file or client cert.

        ``path`` defaults to the first file in $KUBECONFIG, then ~/.kube/config. Exec and
        auth-provider plugins are not supported; kind and most CI clusters use client certs.
        """
        if path is None:
            env = os.environ.get("KUBECONFIG", "")
            path = env.split(os.pathsep)[0] if env else Path.home() / ".kube" / "config"
        path = Path(path)
        config = yaml.safe_load(path.read_text("utf-8")) or {}

        def named(section: str, name: str) -> dict[str, Any]:
            for item in config.get(section) or []:
                if item.get("name") == name:
                    return cast(dict[str, Any], item.get(section[:-1]) or {})
            raise ValueError(f"kubeconfig {path}: no {section[:-1]} named {name!r}")

        ctx = named("contexts", context or config.get("current-context") or "")
        cluster = named("clusters", ctx["cluster"])
        user = named("users", ctx["user"]) if ctx.get("user") else {}

        def relative(p: str) -> str:
            return str(path.parent / p) if not os.path.isabs(p) else p

        ca_file = relative(cluster["certificate-authority"]) if cluster.get("certificate-authority") else None
        ca_data = (
            base64.b64decode(cluster["certificate-authority-data"]).decode("ascii")
            if cluster.get("certificate-authority-data") else None
        )
        client_cert: tuple[str, str] | None = None
        cert_dir: tempfile.TemporaryDirectory[str] | None = None
        try:
            if user.get("client-certificate-data") or user.get("client-certificate"):
                # ssl only loads client certs from files: write inline data to a private
                # temp dir for the duration of loading, then remove it.
                cert_dir = tempfile.TemporaryDirectory(prefix="portcullis-kube-")
                client_cert = (
                    _file_or_data(user, "client-certificate", relative, cert_dir.name),
                    _file_or_data(user, "client-key", relative, cert_dir.name),
                )
            token_file = relative(user["tokenFile"]) if user.get("tokenFile") else None
            return cls(
                cluster["server"],
                token=user.get("token"),
                ca_file=ca_file,
                token_file=token_file,
                ca_data=ca_data,
                client_cert=client_cert,
                insecure=bool(cluster.get("insecure-skip-tls-verify")),
            )
        finally:
            if cert_dir is not None:
                cert_dir.cleanup()

    # -- lifecycle ----------------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- requests -----------------------------------------------------------------------------

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = self._token_file.read() if self._token_file is not None else self._token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def _url(self, path: str) -> URL:
        if not path.startswith("/"):
            raise ValueError(f"API paths start with '/': {path!r}")
        return URL(str(self.base_url) + path, encoded=False)

    async def _request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, content_type: str = "application/json"
    ) -> JSONObject:
        data = json.dumps(body).encode("utf-8") if body is not None else None
        async with self._client().request(
            method, self._url(path), data=data, headers=self._headers(content_type if data is not None else None)
        ) as resp:
            raw = await resp.read()
            if resp.status >= 400:
                raise _error(resp.status, raw)
            return cast(JSONObject, json.loads(raw)) if raw else {}

    async def get(self, path: str) -> JSONObject | None:
        """The object at ``path``, or None if it does not exist."""
        try:
            return await self._request("GET", path)
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    async def create(self, path: str, body: Mapping[str, Any]) -> JSONObject:
        """POST a new object to its collection ``path``; 409 if it exists."""
        return await self._request("POST", path, body)

    async def post(self, path: str, body: Mapping[str, Any]) -> JSONObject:
        """POST to an endpoint that is not a stored collection (TokenReview, SubjectAccessReview)."""
        return await self._request("POST", path, body)

    async def merge_patch(self, path: str, body: Mapping[str, Any]) -> JSONObject:
        """RFC 7386 merge patch: dicts merge, ``None`` removes a key."""
        return await self._request("PATCH", path, body, MERGE_PATCH)

    async def delete(self, path: str, *, resource_version: str | None = None) -> bool:
        """Delete the object; False if it did not exist. With ``resource_version``, only that version."""
        body: JSONObject | None = None
        if resource_version is not None:
            body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"resourceVersion": resource_version}}
        try:
            await self._request("DELETE", path, body)
        except KubeError as e:
            if e.status == 404:
                return False
            raise
        return True

    async def watch(
        self,
        path: str,
        resource_version: str | None = None,
        *,
        timeout_seconds: int = 300,
        max_backoff: float = 30.0,
        stable_after: float = 10.0,
        observer: WatchObserver | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        clock: Callable[[], float] = time.monotonic,
        raise_gone: bool = False,
    ) -> AsyncIterator[tuple[str, JSONObject]]:
        """Events of the collection at ``path`` (which may carry a fieldSelector), forever.

        A stream that served ``stable_after`` seconds and ended (the usual end is the server's
        ``timeoutSeconds``) is reopened at once. Anything else, a failure or a stream that
        ended, or was answered 410 Gone, sooner after it opened, is reopened only after a
        jittered pause that doubles, up to ``max_backoff``, for as long as that goes on: a
        server or proxy that closes every stream at once is not hammered. 401/403/404 are
        raised, since retrying cannot fix them. ``observer`` is told how each stream goes.

        With ``raise_gone``, 410 Gone raises `WatchGone` instead of restarting without a version:
        a consumer that mirrors a whole collection must list again, since a restart replays only
        what exists and so never tells it what was deleted in between.
        """
        rv = resource_version
        backoff = 0.0
        while True:
            url = self._url(path)
            params = dict(url.query)
            params.update({"watch": "true", "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout_seconds)})
            if rv:
                params["resourceVersion"] = rv
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=timeout_seconds + 30)
            opened_at: float | None = None
            failure: str | None = None
            gone = False
            try:
                async with self._client().get(
                    url.with_query(params), headers=self._headers(), timeout=timeout
                ) as resp:
                    if resp.status == 410:
                        if raise_gone:
                            raise WatchGone()
                        rv = None  # our version is too old: start over, which replays what exists
                    elif resp.status >= 400:
                        error = _error(resp.status, await resp.read())
                        if resp.status in (401, 403, 404):
                            raise error
                        failure = str(error)
                    else:
                        opened_at = clock()
                        if observer is not None:
                            observer.opened()
                        async for line in _lines(resp.content):
                            if not line.strip():
                                continue
                            event = json.loads(line)
                            kind, obj = event.get("type", ""), event.get("object") or {}
                            if kind == "ERROR":
                                if obj.get("code") == 410:
                                    rv = None
                                    gone = raise_gone
                                else:
                                    failure = f"watch error: {obj.get('message', '')}"
                                break
                            new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                            if new_rv:
                                rv = new_rv
                            if kind == "BOOKMARK":
                                continue
                            yield kind, obj
            except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
                failure = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if observer is not None and (opened_at is not None or failure is not None):
                observer.ended(failure)
            if gone:
                raise WatchGone()
            if opened_at is not None and clock() - opened_at >= stable_after:
                backoff = 0.0  # it served: pacing starts over
                if failure is None:
                    continue
            backoff = min(max_backoff, max(_MIN_BACKOFF, backoff * 2))
            await sleep(backoff * _jitter.uniform(0.5, 1.0))


class WatchObserver(Protocol):
    """Told how each of ``KubeClient.watch``'s streams goes (the watch paces itself)."""

    def opened(self) -> None:
        """A stream is open (HTTP 200)."""

    def ended(self, failure: str | None) -> None:
        """A stream, or an attempt to open one, is over: ``failure`` says what went wrong, if anything."""


async def _lines(stream: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """Newline-delimited chunks, including a last unterminated one.

    Split here rather than with readline: one event (a large Secret) can exceed its limit.
    """
    buffer = b""
    async for chunk in stream.iter_any():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line
    if buffer:
        yield buffer


def _error(status: int, raw: bytes) -> KubeError:
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("kind") == "Status":
        return KubeError(status, str(body.get("reason") or ""), str(body.get("message") or ""))
    return KubeError(status, "", raw[:200].decode("utf-8", "replace"))


def _file_or_data(user: Mapping[str, Any], field: str, relative: Any, directory: str) -> str:
    if user.get(f"{field}-data"):
        target = Path(directory) / field
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(base64.b64decode(user[f"{field}-data"]))
        return str(target)
    return cast(str, relative(user[field]))
