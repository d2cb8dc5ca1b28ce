"""A kmock ``KubernetesEmulator`` that fills in what a real API server adds to objects.

The stock emulator (kmock 0.8) stores objects exactly as posted. A real API server also sets
``metadata.namespace`` from the URL, ``uid``, ``creationTimestamp`` and a ``resourceVersion``
that changes on every write; clients (kopf's finalizer patches, optimistic deletes) rely on
those. This subclass adds them, and a few more real-server behaviours:

- ``metadata.generateName`` produces a name;
- a merge patch carrying ``metadata.resourceVersion`` is refused with 409 when stale;
- a JSON patch whose ``test`` operation fails is refused with 422, as the API server does
  (kmock answers 500). kopf guards its finalizer patches with a ``test`` of resourceVersion
  and, on 422, tries again with a fresh body; on 500 it retries the stale patch forever;
- POSTs of ``*Review`` kinds (TokenReview, SubjectAccessReview) are not stored: the API server
  answers them without persisting, and tests answer them with a reaction, e.g.
  ``k8s['post /apis/authentication.k8s.io/v1/tokenreviews'] << handler``.

It also makes a request cost the same however many came before. kmock picks a reaction by
asking, for each of its ~14 built-in reactions, whether the new request is "in" the
reaction's view, and answers that by re-filtering the whole request log: every request
costs O(log length x reactions). Measured here (a bare GET of one ConfigMap): 10 ms after
100 requests, 61 ms after 1,000, 175 ms after 2,000, which is what made the operator look
slow in the emulator. `_FastDispatch` answers the same question for plain filter chains
(filters and priorities down to the emulator itself, which is every built-in reaction and
every ``k8s['...'] << x`` a test adds) by applying the chain's criteria to that one
request; anything else (slices, groups, exclusions, streams) takes kmock's own path.
The request log is kept whole, so tests can still assert on it.

Likewise for objects: kmock finds the object of a GET, PATCH, DELETE or POST by scanning
every stored object (O(objects) per request: at 500 servers, about 8,000 objects, its
`_serve_*` handlers were most of the emulator's CPU and made the operator wait). The
emulator here looks the one object up by its (resource, namespace, name) key, which is how
kmock stores it; requests without a name (lists, watches) keep kmock's scan.

Use ``emulator()`` for a started emulator and HTTP server on 127.0.0.1, with the core resources
declared (kmock only serves declared resources).
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import secrets
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

import attrs
import jsonpatch
import kmock
from kmock._internal import apps, dsl, enums, rendering

CORE_RESOURCES: dict[str, kmock.ResourceInfo] = {
    "v1/namespaces": kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs={"get", "list", "watch", "create", "patch", "delete"}),
    "v1/events": kmock.ResourceInfo(kind="Event", namespaced=True, verbs={"create", "list", "watch", "patch"}),
    "v1/configmaps": kmock.ResourceInfo(kind="ConfigMap", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}),
    "v1/secrets": kmock.ResourceInfo(kind="Secret", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}),
}


class _FastDispatch(apps.RawHandler):
    """kmock's reaction dispatch with an O(1) membership test for plain filter chains.

    Sits between the emulator and kmock's `RawHandler` in the MRO, so the emulator's own
    `_handle` (object storage) still runs first and then dispatches through this one.
    """

    __slots__ = ()

    def _sees(self, view: dsl.View, request: rendering.Request) -> bool:
        # The request was appended to this root's log before dispatch, so for a chain of
        # filters and priorities ending at this root, "in the view" means "passes every filter".
        node = view
        while True:
            if node is self:
                return True
            if type(node) is dsl.Filter:
                if not node.criteria(request):
                    return False
                node = node._source
            elif type(node) is dsl.Priority:
                node = node._source
            else:
                return request in view  # kmock's own (log-scanning) answer

    async def _handle(self, request: rendering.Request) -> Any:
        # Same order as kmock: highest priority first, padded to equal length; the first
        # live reaction that sees the request answers it.
        priorities = [payload.priorities for payload in self._payloads]
        width = max((len(p) for p in priorities), default=0)
        padded = [tuple(-p for p in prio) + (0,) * (width - len(prio)) for prio in priorities]
        for index in sorted(range(len(padded)), key=lambda i: padded[i]):
            payload = self._payloads[index]
            if payload._disabled.is_set() or not self._sees(payload._source, request):
                continue
            try:
                return await payload(request)
            except rendering.ReactionMismatchError:  # mismatched or depleted: never again
                payload._disabled.set()
            except NotImplementedError:  # matched but has nothing to answer with
                pass
        raise NotImplementedError(f"no reaction matches {request.method} {request.url}")


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator, _FastDispatch):
    """KubernetesEmulator plus the metadata a real API server maintains."""

    _versions: Any = attrs.field(factory=lambda: itertools.count(1), init=False)

    def next_resource_version(self) -> str:
        return str(next(self._versions))

    def _stored(self, request: rendering.Request, name: str | None) -> Any:
        """The stored object `request` addresses (kmock's strict match, by key), or None."""
        try:
            return self.objects[request.resource, request.namespace, name]  # type: ignore[index]
        except KeyError:
            return None

    async def _serve_fetch(self, request: rendering.Request) -> Any:
        if request.name is None:
            return await super()._serve_fetch(request)
        async with self._lock:
            obj = self._stored(request, request.name)
        if obj is None or obj.deleted:
            raise kmock.KubernetesObjectNotFoundError()
        return obj.raw

    async def _serve_create(self, request: rendering.Request) -> Any:
        # Created in `KubernetesEmulator._handle` under the URL's namespace (or the body's).
        meta = request.data.get("metadata", {}) if isinstance(request.data, dict) else {}
        namespace = request.namespace or meta.get("namespace")
        async with self._lock:
            try:
                obj = self.objects[request.resource, namespace, request.name or meta.get("name")]  # type: ignore[index]
            except KeyError:
                obj = None
        if obj is None:
            return await super()._serve_create(request)
        return obj.raw

    async def _serve_update(self, request: rendering.Request) -> Any:
        if request.name is None:
            return await super()._serve_update(request)
        async with self._lock:
            obj = self._stored(request, request.name)
        assert obj is not None  # updated in _handle(), which answers 404 for a missing object
        return obj.last.raw

    async def _serve_delete(self, request: rendering.Request) -> Any:
        if request.name is None:
            return await super()._serve_delete(request)
        async with self._lock:
            obj = self._stored(request, request.name)
        assert obj is not None  # deleted in _handle(), which answers 404 for a missing object
        return obj.last.raw

    def request_log(self) -> list[rendering.Request]:
        """The log of every request served, oldest first: the live list, not a copy (read only)."""
        requests: list[rendering.Request] = self._requests
        return requests

    async def _handle(self, request: rendering.Request) -> Any:
        data = request.data
        if request.resource is not None and request.action == enums.action.CREATE and isinstance(data, dict):
            if str(data.get("kind", "")).endswith("Review"):
                # Answered, never stored: skip the emulator's bookkeeping, keep the reactions.
                return await kmock.RawHandler._handle(self, request)
            self._fill_created(request, data)
        elif request.resource is not None and request.action == enums.action.UPDATE and request.name is not None:
            self._fill_patched(request, data)
        try:
            return await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as exc:
            raise _TestFailed() from exc

    def _fill_created(self, request: rendering.Request, data: dict[str, Any]) -> None:
        meta = data.setdefault("metadata", {})
        if request.namespace is not None:
            meta["namespace"] = request.namespace
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["resourceVersion"] = self.next_resource_version()
        meta.setdefault("generation", 1)

    def _fill_patched(self, request: rendering.Request, data: Any) -> None:
        assert request.resource is not None and request.name is not None  # checked by the caller
        key = (request.resource, request.namespace, request.name)
        current = self.objects[key] if key in self.objects else None
        if current is None or current.deleted:
            return  # the emulator answers 404 itself
        current_rv = (current.get("metadata") or {}).get("resourceVersion")
        new_rv = self.next_resource_version()
        if isinstance(data, dict):
            wanted = (data.get("metadata") or {}).get("resourceVersion")
            if wanted is not None and wanted != current_rv:
                raise _Conflict()
            if "spec" in data:
                meta_now = current.get("metadata") or {}
                data.setdefault("metadata", {})["generation"] = int(meta_now.get("generation", 1)) + 1
            data.setdefault("metadata", {})["resourceVersion"] = new_rv
        elif isinstance(data, list):
            # Appended last, so a "test" op earlier in the patch still sees the old version.
            op = "replace" if current_rv is not None else "add"
            data.append({"op": op, "path": "/metadata/resourceVersion", "value": new_rv})


@attrs.frozen
class _Conflict(kmock.KubernetesError):
    status: int = 409
    reason: str = "Conflict"
    message: str = "the object has been modified; please apply your changes to the latest version"


@attrs.frozen
class _TestFailed(kmock.KubernetesError):
    status: int = 422
    reason: str = "Invalid"
    message: str = "the JSON patch test operation failed: the object has changed"


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def declare(k8s: kmock.KubernetesEmulator, resources: dict[str, kmock.ResourceInfo]) -> None:
    """Declare resources so the emulator serves them (kmock serves nothing undeclared)."""
    for key, info in resources.items():
        k8s.resources[key] = info


@contextlib.asynccontextmanager
async def emulator(extra: Iterable[tuple[str, kmock.ResourceInfo]] = ()) -> AsyncIterator[Emulator]:
    """A running emulator on 127.0.0.1 with the core resources (and ``extra``) declared.

    ``str(k8s.url)`` is the base URL to give a client.
    """
    async with Emulator() as k8s, kmock.Server(k8s):
        declare(k8s, CORE_RESOURCES | dict(extra))
        yield k8s


__all__ = ["CORE_RESOURCES", "Emulator", "declare", "emulator"]
