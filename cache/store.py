"""Keeps the collection of past activation matrices on disk (``--trace-store``).

The collection lives inside the policy and changes as requests finish; saving it after every
request would cost a JSON write per request, so it is saved at most every ``every_s`` seconds
and once more at shutdown. Writes are atomic (EAMCollection.save), so a crash never leaves a
half-written store; a failed write (full disk) is logged and retried later, never fatal.
"""
from __future__ import annotations

import logging
import time

from cache.eam import EAMCollection

log = logging.getLogger("moeserve.cache")


class CollectionStore:
    def __init__(self, collection: EAMCollection, path: str, every_s: float = 30.0) -> None:
        self.collection = collection
        self.path = path
        self.every_s = every_s
        self._dirty = False
        self._last = time.monotonic()

    def request_finished(self) -> None:
        self._dirty = True
        if time.monotonic() - self._last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if not self._dirty:
            return
        self._last = time.monotonic()
        try:
            self.collection.save(self.path)
        except OSError as exc:
            log.warning("could not save the trace store %s (will retry): %s", self.path, exc)
            return
        self._dirty = False
        log.debug("saved %d activation matrices to %s", len(self.collection), self.path)
