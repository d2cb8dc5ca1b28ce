"""A kmock ``KubernetesEmulator`` that fills in what a real API server adds to objects.

The stock emulator (kmock 0.8) stores objects exactly as posted. A real API server also sets
``metadata.namespace`` from the URL, ``uid``, ``creationTimestamp`` and a ``resourceVersion``
that changes on every write; clients (kopf's finalizer patches, optimistic deletes) rely on
those. This subclass adds them, and a few more real-server behaviours:

- ``metadata.generateName`` produces a name;
- a merge patch carrying ``metadata.resourceVersion`` is refused with 409 when stale;
- POSTs of ``*Review`` kinds (TokenReview, SubjectAccessReview) are not stored: the API server
  answers them without persisting, and tests answer them with a reaction, e.g.
  ``k8s['post /apis/authentication.k8s.io/v1/tokenreviews'] << handler``.

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
import kmock
from kmock._internal import enums, rendering

CORE_RESOURCES: dict[str, kmock.ResourceInfo] = {
    "v1/namespaces": kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs={"get", "list", "watch", "create", "patch", "delete"}),
    "v1/events": kmock.ResourceInfo(kind="Event", namespaced=True, verbs={"create", "list", "watch", "patch"}),
    "v1/configmaps": kmock.ResourceInfo(kind="ConfigMap", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}),
    "v1/secrets": kmock.ResourceInfo(kind="Secret", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}),
}


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """KubernetesEmulator plus the metadata a real API server maintains."""

    _versions: Any = attrs.field(factory=lambda: itertools.count(1), init=False)

    def next_resource_version(self) -> str:
        return str(next(self._versions))

    async def _handle(self, request: rendering.Request) -> Any:
        data = request.data
        if request.resource is not None and request.action == enums.action.CREATE and isinstance(data, dict):
            if str(data.get("kind", "")).endswith("Review"):
                # Answered, never stored: skip the emulator's bookkeeping, keep the reactions.
                return await kmock.RawHandler._handle(self, request)
            self._fill_created(request, data)
        elif request.resource is not None and request.action == enums.action.UPDATE and request.name is not None:
            self._fill_patched(request, data)
        return await super()._handle(request)

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
