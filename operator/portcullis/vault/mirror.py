"""A watch-fed copy of some Secrets of one namespace, so that reading one costs no API request.

The gateway reads a user's credential Secret on every call. With one GET per call, 10 replicas
at 1,000 calls/s would send the shared control plane 10,000 GETs a second, and API Priority and
Fairness would throttle the gateway long before that. A `SecretMirror` is the informer pattern,
kept small: list the selected Secrets, then watch from the list's resourceVersion (the watch
machinery is `KubeClient.watch`, paced and reported by the caller's loop, as the config,
signing-key and revocation watches are). A 410 Gone lists again, since a watch restarted
without a version would never say what was deleted in between; any other failure is retried
with the loop's backoff, from a fresh list.

When a read may use the copy (`lookup`), and when it must not (it answers `MISS`, and the
caller GETs the object directly, as it did before there was a copy):

- before the first list has completed: never "absent" from an empty copy;
- when no stream has been open for `STALE_AFTER` seconds (the watch keeps failing, or the
  collection cannot be listed again): a deleted credential is then never served for longer
  than that bound from a copy nobody updates;
- for an object this process wrote (`wrote`), until the watch has delivered that write (or a
  list begun after it has completed): a replica reads its own writes at once.

Otherwise the copy lags the API server by the watch's latency (milliseconds here; measured in
benchmarks/api_load.py), which is then what bounds the cut-off of a deleted credential.

Selectors narrow the stream on a real API server; the same filter applied here keeps the copy
right on servers that ignore them (the kmock emulator does). Only what a reader needs of each
object is kept (name, resourceVersion, labels, annotations, data), not managedFields.
"""

from __future__ import annotations

import enum
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from portcullis.kube import JSONObject, KubeClient, KubeError, WatchGone, WatchObserver

STALE_AFTER = 30.0
"""Seconds without an open watch stream after which the copy is not used (reads GET directly)."""
WATCH_SECONDS = 60
"""Each watch stream's server-side timeout; a connection that dies silently is noticed within
this plus the client's read margin (30 s)."""
_MAX_MARKS = 1024


class Miss(enum.Enum):
    MISS = "miss"


MISS: Literal[Miss.MISS] = Miss.MISS
"""`lookup`'s answer when the copy must not be used for this read."""


class WatchLoop(Protocol):
    """What `run` needs of its caller's loop (`portcullis.gateway.loops.Loop` is one)."""

    sleep: Callable[[float], Awaitable[None]]
    clock: Callable[[], float]

    def failed(self, error: BaseException | str) -> None: ...

    def mark_synced(self) -> None: ...

    async def pause(self) -> None: ...


class StreamObserver(WatchObserver, Protocol):
    """A `WatchObserver` that can also forget a stream cut short (`gateway.loops.StreamWatch`)."""

    def abandon(self) -> None: ...


@dataclass
class _Mark:
    """An own write the copy has not seen yet: its resourceVersion, or None for a delete."""

    rv: str | None
    at: float


def _slim(obj: JSONObject) -> JSONObject:
    meta = obj.get("metadata") or {}
    return {
        "metadata": {k: meta[k] for k in ("name", "namespace", "resourceVersion", "labels", "annotations") if k in meta},
        "data": dict(obj.get("data") or {}),
    }


def _rv(obj: JSONObject | None) -> str | None:
    rv = ((obj or {}).get("metadata") or {}).get("resourceVersion")
    return rv if isinstance(rv, str) and rv else None


class SecretMirror:
    """The Secrets of `namespace` carrying label `label` (``key=value``), or the one named `name`."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        *,
        label: str | None = None,
        name: str | None = None,
        stale_after: float = STALE_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.namespace = namespace
        self._label = tuple(label.split("=", 1)) if label else None
        self._name = name
        self.stale_after = stale_after
        self._clock = clock
        collection = f"/api/v1/namespaces/{namespace}/secrets"
        query = []
        if label:
            query.append("labelSelector=" + urllib.parse.quote(label, safe=""))
        if name:
            query.append("fieldSelector=" + urllib.parse.quote(f"metadata.name={name}", safe=""))
        self._path = collection + ("?" + "&".join(query) if query else "")
        self._objects: dict[str, JSONObject] = {}
        self._marks: dict[str, _Mark] = {}
        self._listed = False
        self._open = False
        self._as_of = 0.0
        self.lists = 0
        """Lists made (the first, then one after each 410 Gone or failure): for tests and status."""
        self.events = 0

    # -- reading ----------------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """The first list has completed."""
        return self._listed

    @property
    def streaming(self) -> bool:
        """A watch stream is open now."""
        return self._open

    def current(self) -> bool:
        """The copy may be used: listed, and a stream is open or was open less than `stale_after` ago."""
        return self._listed and (self._open or self._clock() - self._as_of < self.stale_after)

    def lookup(self, name: str) -> JSONObject | None | Literal[Miss.MISS]:
        """The object as last seen (None: it does not exist), or `MISS`: GET it directly."""
        if not self._listed:
            return MISS
        now = self._clock()
        if not self._open and now - self._as_of >= self.stale_after:
            return MISS
        if self._marks:
            mark = self._marks.get(name)
            if mark is not None:
                if now - mark.at < self.stale_after:
                    return MISS
                del self._marks[name]
        return self._objects.get(name)

    # -- own writes -------------------------------------------------------------------------------

    def wrote(self, name: str, obj: JSONObject | None) -> None:
        """This process wrote `name` (the write's answer; None: deleted): read it directly until the copy has it."""
        rv = _rv(obj)
        if obj is not None:
            seen = self._objects.get(name)
            if seen is not None and rv is not None and _rv(seen) == rv:
                return  # the watch was faster than the write's answer
        if len(self._marks) >= _MAX_MARKS:
            now = self._clock()
            self._marks = {n: m for n, m in self._marks.items() if now - m.at < self.stale_after}
        self._marks[name] = _Mark(rv, self._clock())

    # -- following the API server -----------------------------------------------------------------

    def _selects(self, obj: JSONObject) -> bool:
        meta = obj.get("metadata") or {}
        if self._name is not None and meta.get("name") != self._name:
            return False
        if self._label is not None:
            key, value = self._label
            if (meta.get("labels") or {}).get(key) != value:
                return False
        return True

    def _apply(self, kind: str, obj: JSONObject) -> None:
        name = (obj.get("metadata") or {}).get("name")
        if not isinstance(name, str):
            return
        self.events += 1
        if kind == "DELETED" or not self._selects(obj):
            self._objects.pop(name, None)  # deleted, or no longer selected (its label removed)
        elif kind in ("ADDED", "MODIFIED"):
            self._objects[name] = _slim(obj)
        mark = self._marks.get(name)
        if mark is not None and (name not in self._objects if mark.rv is None else _rv(obj) == mark.rv):
            del self._marks[name]  # the copy has caught up with our write

    async def _relist(self) -> str | None:
        started = self._clock()
        listing = await self._client.get(self._path)
        if listing is None:
            raise KubeError(404, "NotFound", f"{self._path} is not served")
        objects: dict[str, JSONObject] = {}
        for item in listing.get("items") or []:
            name = (item.get("metadata") or {}).get("name")
            if isinstance(name, str) and self._selects(item):
                objects[name] = _slim(item)
        self._objects = objects
        # A list begun after a write returns it (or something newer): those marks are settled.
        self._marks = {n: m for n, m in self._marks.items() if m.at > started}
        self._listed = True
        self._as_of = self._clock()
        self.lists += 1
        return _rv(listing)

    def _closed(self) -> None:
        if self._open:
            self._open = False
            self._as_of = self._clock()

    async def run(self, loop: WatchLoop, observer: StreamObserver | None = None) -> None:
        """List, then follow the watch, for ever (cancel to stop); failures are paced and reported on `loop`."""
        observed = _Observed(self, observer)
        gone_in_a_row = 0
        try:
            while True:
                events_before = self.events
                try:
                    rv = await self._relist()
                    loop.mark_synced()
                    async for kind, obj in self._client.watch(
                        self._path, rv, timeout_seconds=WATCH_SECONDS, observer=observed,
                        sleep=loop.sleep, clock=loop.clock, raise_gone=True,
                    ):
                        self._apply(kind, obj)
                except WatchGone:
                    self._closed()
                    observed.abandon()
                    # Routine (the version was compacted away): list again at once, unless the
                    # watch keeps answering Gone without delivering anything.
                    gone_in_a_row = gone_in_a_row + 1 if self.events == events_before else 1
                    if gone_in_a_row > 1:
                        await loop.pause()
                    continue
                except Exception as exc:
                    self._closed()
                    observed.abandon()
                    loop.failed(exc)
                await loop.pause()
        finally:
            self._closed()
            observed.abandon()


class _Observed:
    """Tells the mirror whether a stream is open, and passes everything on to the loop's observer."""

    def __init__(self, mirror: SecretMirror, inner: StreamObserver | None) -> None:
        self._mirror = mirror
        self._inner = inner

    def opened(self) -> None:
        self._mirror._open = True
        if self._inner is not None:
            self._inner.opened()

    def ended(self, failure: str | None) -> None:
        self._mirror._closed()
        if self._inner is not None:
            self._inner.ended(failure)

    def abandon(self) -> None:
        if self._inner is not None:
            self._inner.abandon()


__all__ = ["MISS", "STALE_AFTER", "Miss", "SecretMirror", "StreamObserver", "WatchLoop"]
