"""The operator's only way to write to Kubernetes: get, create, merge-patch, delete.

It rides on kopf's own API client (`kopf._cogs.clients.api`), which is a private module
of kopf: the price is one import to watch on kopf upgrades; the gain is that every
request uses the credentials kopf logged in with, re-authenticates on 401 and retries
5xx with kopf's backoffs, on a real cluster and against an emulator alike, with no
second client to configure. Nothing else in Portcullis touches that module.

Writes are create (POST) and JSON merge patch: no server-side apply and no PUT, so the
same requests work on kmock (which ignores apply and has no PUT) and on a cluster.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from kopf._cogs.clients import api, errors

from portcullis.api.resources import API_VERSION

JsonObject = dict[str, Any]
# kind, namespace, name: which object a resourceVersion belongs to.
ObjectKey = tuple[str, str | None, str]

MERGE_PATCH = {"Content-Type": "application/merge-patch+json"}

# apiVersion, kind -> (plural, namespaced). Only what the operator touches.
RESOURCES: dict[tuple[str, str], tuple[str, bool]] = {
    ("v1", "ConfigMap"): ("configmaps", True),
    ("v1", "Secret"): ("secrets", True),
    ("v1", "Service"): ("services", True),
    ("v1", "ServiceAccount"): ("serviceaccounts", True),
    ("apps/v1", "Deployment"): ("deployments", True),
    ("rbac.authorization.k8s.io/v1", "Role"): ("roles", True),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("rolebindings", True),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): ("clusterrolebindings", False),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): ("horizontalpodautoscalers", True),
    ("policy/v1", "PodDisruptionBudget"): ("poddisruptionbudgets", True),
    (API_VERSION, "VirtualMCPServer"): ("virtualmcpservers", True),
    (API_VERSION, "ToolMapping"): ("toolmappings", True),
    (API_VERSION, "MCPConnection"): ("mcpconnections", True),
}


@dataclass(frozen=True)
class Ref:
    """Which object: enough to build its URL."""

    api_version: str
    kind: str
    name: str
    namespace: str | None = None

    @classmethod
    def of(cls, obj: JsonObject) -> Ref:
        meta = obj["metadata"]
        return cls(obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace"))

    def url(self, *, subresource: str | None = None, collection: bool = False) -> str:
        plural, namespaced = RESOURCES[(self.api_version, self.kind)]
        root = f"/api/{self.api_version}" if "/" not in self.api_version else f"/apis/{self.api_version}"
        if namespaced:
            if not self.namespace:
                raise ValueError(f"{self.kind} {self.name!r} is namespaced but has no namespace")
            root += f"/namespaces/{self.namespace}"
        path = f"{root}/{plural}"
        if not collection:
            path += f"/{self.name}"
            if subresource:
                path += f"/{subresource}"
        return path

    def __str__(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind} {where}{self.name}"


class Cluster(Protocol):
    """What the reconciler needs of the API server; one real implementation, kopf-backed."""

    async def get(self, ref: Ref) -> JsonObject | None: ...
    async def create(self, obj: JsonObject) -> JsonObject: ...
    async def patch(self, ref: Ref, patch: JsonObject, *, subresource: str | None = None) -> JsonObject | None: ...
    async def delete(self, ref: Ref) -> bool: ...


class Observer(Protocol):
    def saw(self, obj: JsonObject) -> None: ...
    def forget(self, key: ObjectKey) -> None: ...


def object_key(obj: Mapping[str, Any]) -> ObjectKey:
    meta = obj.get("metadata") or {}
    return (str(obj.get("kind")), meta.get("namespace"), str(meta.get("name")))


class KopfCluster:
    """`Cluster` over kopf's authenticated session; `settings` are the operator's settings.

    `observe`, when given, is shown every object this client reads or writes (and the key
    of every object it deletes), so watch events can be told apart: a version the operator
    already acted on (the echo of its own write, a state a reconcile compared) or news.
    """

    def __init__(
        self,
        settings: Any,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
        observe: Observer | None = None,
    ):
        self._settings = settings
        self._logger = logger
        self._observe = observe

    def _saw(self, obj: JsonObject | None) -> None:
        if self._observe is not None and isinstance(obj, dict):
            self._observe.saw(obj)

    async def _call(self, method: str, url: str, *, payload: object = None, headers: dict[str, str] | None = None) -> Any:
        response = await api.request(
            method, url, payload=payload, headers=headers, settings=self._settings, logger=self._logger
        )
        async with response:
            text = await response.text()
        return json.loads(text) if text else None

    async def get(self, ref: Ref) -> JsonObject | None:
        try:
            result: JsonObject = await self._call("get", ref.url())
        except errors.APINotFoundError:
            return None
        self._saw(result)
        return result

    async def create(self, obj: JsonObject) -> JsonObject:
        ref = Ref.of(obj)
        result: JsonObject = await self._call("post", ref.url(collection=True), payload=obj)
        self._saw(result)
        self._logger.info(f"Created {ref}")
        return result

    async def patch(self, ref: Ref, patch: JsonObject, *, subresource: str | None = None) -> JsonObject | None:
        try:
            result: JsonObject = await self._call(
                "patch", ref.url(subresource=subresource), payload=patch, headers=MERGE_PATCH
            )
        except errors.APINotFoundError:
            return None
        self._saw(result)
        self._logger.info(f"Patched {ref}{'/' + subresource if subresource else ''}")
        return result

    async def delete(self, ref: Ref) -> bool:
        if self._observe is not None:
            self._observe.forget((ref.kind, ref.namespace, ref.name))
        try:
            await self._call("delete", ref.url())
        except errors.APINotFoundError:
            return False
        self._logger.info(f"Deleted {ref}")
        return True


def is_conflict(exc: BaseException) -> bool:
    return isinstance(exc, errors.APIConflictError)
