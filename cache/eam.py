"""Expert activation matrices (EAM) and the bounded collection of past matrices (EAMC).

An EAM is an L x E array of token counts: cell (i, j) counts the tokens MoE layer i routed to
expert j. The collection keeps at most ``capacity`` past request matrices; when full, a new
matrix replaces the stored one most similar to it (cosine), which keeps the set recent and
diverse (MoE-Infinity, section 4). Matching a running request's partial matrix against the
collection gives a predicted activation (pEAM) for every layer.

Stored as JSON (never pickle), written atomically; a missing, corrupt or mismatched store is
reported and replaced by an empty collection, never fatal.
"""
from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

STORE_FORMAT = "moe-eamc"
STORE_VERSION = 1


def new_matrix(num_layers: int, num_experts: int) -> np.ndarray:
    """An empty activation matrix [L, E] of token counts."""
    return np.zeros((num_layers, num_experts), dtype=np.float64)


def row_normalise(m: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (rows summing to 0 stay 0). [L, E] -> [L, E]."""
    s = m.sum(axis=1, keepdims=True)
    return np.divide(m, s, out=np.zeros_like(m, dtype=np.float64), where=s > 0)


class EAMCollection:
    """Bounded set of past activation matrices with cosine replacement and matching."""

    def __init__(self, num_layers: int, num_experts: int, capacity: int = 120) -> None:
        if capacity < 1:
            raise ValueError(f"EAMCollection: capacity must be >= 1, got {capacity}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.capacity = capacity
        # [capacity, L, E] row-normalised matrices; row-normalising before storage makes a long
        # request weigh the same as a short one when entries are summed into a prediction.
        # float32: half the bytes each match reads (the store keeps 6 decimals anyway).
        self._mats = np.zeros((capacity, num_layers, num_experts), dtype=np.float32)
        self._rn2 = np.zeros((capacity, num_layers))    # squared row norms: cosines need no pass
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def matrices(self) -> np.ndarray:
        """The stored (row-normalised) matrices, [n, L, E] float64 (a copy)."""
        return self._mats[:self._n].astype(np.float64)

    def _check(self, m: np.ndarray, what: str) -> np.ndarray:
        a = np.asarray(m, dtype=np.float64)
        if a.shape != (self.num_layers, self.num_experts):
            raise ValueError(f"EAMCollection.{what}: matrix shape {a.shape} != "
                             f"({self.num_layers}, {self.num_experts})")
        return a

    def _cosine(self, vecs: np.ndarray, rows: slice) -> np.ndarray:
        """Cosine of each of ``vecs`` [B, r*E] (flattened rows) with every stored entry over
        the same rows: [n, B]."""
        stored = self._mats[:self._n, rows].reshape(self._n, -1)   # [n, r*E]
        v = vecs.astype(np.float32)
        num = (stored @ v.T).astype(np.float64)                     # [n, B]
        norms = np.sqrt(self._rn2[:self._n, rows].sum(axis=1))
        den = np.multiply.outer(norms, np.sqrt(np.einsum("bi,bi->b", vecs, vecs)))
        return np.divide(num, den, out=np.zeros_like(num), where=den > 0)

    def insert(self, matrix: np.ndarray) -> Optional[int]:
        """Add a finished request's matrix; when full, it replaces the most similar entry.
        Returns the slot written, or None for an all-zero matrix (nothing to learn from)."""
        m = self._check(matrix, "insert")
        if not m.any():
            return None
        m = row_normalise(m)
        if self._n < self.capacity:
            slot = self._n
            self._n += 1
        else:
            slot = int(np.argmax(self._cosine(m.reshape(1, -1), slice(None))[:, 0]))
        self._mats[slot] = m
        stored = self._mats[slot].astype(np.float64)
        self._rn2[slot] = (stored * stored).sum(axis=1)
        return slot

    def match(self, partial: np.ndarray, layers_seen: Optional[int] = None,
              nearest: int = 3) -> Optional[np.ndarray]:
        """Predicted activation [L, E] for ``partial`` (the running request's counts).

        Compares the first ``layers_seen`` rows (all rows when None) flattened, by cosine, with
        the same rows of every stored entry; the ``nearest`` most similar entries are summed and
        the result normalised per row. None when the collection is empty or nothing matches.
        """
        p = self._check(partial, "match")
        if self._n == 0:
            return None
        upto = self.num_layers if layers_seen is None else max(1, min(layers_seen, self.num_layers))
        vec = row_normalise(p[:upto]).reshape(-1)
        if not vec.any():
            return None
        sims = self._cosine(vec[None, :], slice(0, upto))[:, 0]
        k = min(nearest, self._n)
        best = np.argpartition(-sims, k - 1)[:k] if k < self._n else np.arange(self._n)
        best = best[sims[best] > 0]
        if best.size == 0:
            return None
        return row_normalise(self._mats[best].sum(axis=0, dtype=np.float64))

    def match_full(self, partials: Sequence[np.ndarray], nearest: int = 3) -> list[Optional[np.ndarray]]:
        """``match(p, None, nearest)`` for each of ``partials``, with one pass over the stored
        entries for all of them (a batch of requests refreshes its predictions together)."""
        if self._n == 0 or not len(partials):
            return [None] * len(partials)
        vecs = np.stack([row_normalise(self._check(p, "match_full")).reshape(-1) for p in partials])
        sims = self._cosine(vecs, slice(None))                      # [n, B]
        k = min(nearest, self._n)
        out: list[Optional[np.ndarray]] = []
        for b in range(len(partials)):
            if not vecs[b].any():
                out.append(None)
                continue
            col = sims[:, b]
            best = np.argpartition(-col, k - 1)[:k] if k < self._n else np.arange(self._n)
            best = best[col[best] > 0]
            out.append(row_normalise(self._mats[best].sum(axis=0, dtype=np.float64))
                       if best.size else None)
        return out

    # --- persistence -------------------------------------------------------------------------

    def save(self, path: str) -> None:
        """Write the collection as JSON atomically (temp file in the same folder, fsync, rename)."""
        doc = {"format": STORE_FORMAT, "version": STORE_VERSION, "num_layers": self.num_layers,
               "num_experts": self.num_experts, "capacity": self.capacity,
               "matrices": [np.round(m.astype(np.float64), 6).tolist()
                            for m in self._mats[:self._n]]}
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".eamc-", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            try:        # a store the user made readable stays so (mkstemp creates 0600)
                os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
            except FileNotFoundError:
                pass
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    @classmethod
    def load(cls, path: str, num_layers: int, num_experts: int,
             capacity: int = 120) -> "EAMCollection":
        """The collection stored at ``path``; empty (with a warning) if it is missing,
        unreadable, corrupt or for another model shape. Keeps at most ``capacity`` entries."""
        coll = cls(num_layers, num_experts, capacity)
        if not os.path.exists(path):
            return coll
        try:
            with open(path, "r") as f:
                doc = json.load(f)
            mats = _validate_store(doc, num_layers, num_experts)
        except (OSError, ValueError) as exc:   # json.JSONDecodeError is a ValueError
            log.warning("trace store %s ignored (starting with an empty collection): %s", path, exc)
            return coll
        for m in mats[-capacity:]:
            coll.insert(m)
        return coll


def _validate_store(doc: object, num_layers: int, num_experts: int) -> Sequence[np.ndarray]:
    if not isinstance(doc, dict) or doc.get("format") != STORE_FORMAT:
        raise ValueError(f"not a {STORE_FORMAT} file")
    if doc.get("version") != STORE_VERSION:
        raise ValueError(f"version {doc.get('version')!r} is not {STORE_VERSION}")
    if (doc.get("num_layers"), doc.get("num_experts")) != (num_layers, num_experts):
        raise ValueError(f"stored for {doc.get('num_layers')} layers x {doc.get('num_experts')} "
                         f"experts, the model has {num_layers} x {num_experts}")
    raw = doc.get("matrices")
    if not isinstance(raw, list):
        raise ValueError("field 'matrices' is not a list")
    out = []
    for i, m in enumerate(raw):
        try:
            a = np.asarray(m, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"matrices[{i}] is not numeric: {exc}") from None
        if a.shape != (num_layers, num_experts) or not np.isfinite(a).all() or (a < 0).any():
            raise ValueError(f"matrices[{i}] has shape {a.shape} or invalid values")
        out.append(a)
    return out
