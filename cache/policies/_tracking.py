"""Per-request activation matrices as a policy sees them through ``observe`` (shared helper).

A pass is a prompt pass when a request routes more than top_k experts on a layer (several
tokens); prompt and decode counts are kept apart, as in the tracer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

from cache.eam import EAMCollection, new_matrix


@dataclass
class RequestState:
    prompt: np.ndarray          # [L, E] token counts of prompt passes
    decode: np.ndarray          # [L, E] token counts of decode passes
    decode_passes: int = 0      # completed decode passes
    layers_seen: int = 0        # layers routed in the current pass
    in_prompt: bool = False     # the current pass is a prompt pass


class RequestTracker:
    """Tracks each live request's matrices and where its current pass is."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int) -> None:
        self.L, self.E, self.k = num_layers, num_experts, top_k
        self.live: dict[str, RequestState] = {}

    def begin_step(self, seq_ids: Sequence[str]) -> None:
        for sid in seq_ids:
            st = self.live.get(sid)
            if st is None:
                self.live[sid] = RequestState(new_matrix(self.L, self.E), new_matrix(self.L, self.E))
            else:
                st.layers_seen = 0

    def observe(self, layer: int, routed: Mapping[str, Sequence[int]]) -> None:
        for sid, experts in routed.items():
            st = self.live.get(sid)
            if st is None:     # observe without begin_step: start tracking anyway
                st = self.live[sid] = RequestState(new_matrix(self.L, self.E),
                                                   new_matrix(self.L, self.E))
            if layer == 0:
                st.in_prompt = len(experts) > self.k
            mat = st.prompt if st.in_prompt else st.decode
            np.add.at(mat[layer], np.asarray(experts, dtype=np.int64), 1.0)
            st.layers_seen = layer + 1
            if layer == self.L - 1 and not st.in_prompt:
                st.decode_passes += 1

    def query(self, sid: str) -> tuple[np.ndarray, Optional[int]]:
        """(matrix to match, layers to compare): decode counts once a decode pass is complete
        (all layers), else the current pass's layers."""
        st = self.live[sid]
        if st.decode_passes > 0:
            return st.decode, None
        if st.in_prompt or not st.decode.any():
            return st.prompt, (None if not st.in_prompt else max(1, st.layers_seen))
        return st.prompt + st.decode, max(1, st.layers_seen)

    def finish(self, sid: str, collection: Optional[EAMCollection]) -> None:
        """Drop the request; its decode matrix (prompt when it decoded nothing) joins the collection."""
        st = self.live.pop(sid, None)
        if st is None or collection is None:
            return
        collection.insert(st.decode if st.decode.any() else st.prompt)
