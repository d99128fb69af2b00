"""A watched sequence's share of a pass's cache events (cache/step_events.py) as the
TokenExperts that travel to the server, and the merge of a prompt's chunks into one."""
from __future__ import annotations

from typing import Optional

from cache.step_events import HIT, MISS, PREFETCHED, StepEvents
from engine.protocol import TokenExperts

_RANK = {HIT: 0, PREFETCHED: 1, MISS: 2}   # a merged prompt reports the costliest status seen


def share(events: StepEvents, seq_id: str, phase: str) -> TokenExperts:
    """``seq_id``'s rows of the pass: the experts they chose, with the pass's cache events."""
    routed = tuple(tuple((e, n, code) for e, (n, code) in sorted(layer.items()))
                   for layer in events.routed[seq_id])
    return TokenExperts(phase, routed, events.resident, tuple(events.evicted),
                        tuple(events.prefetched), events.bytes_read, events.stall_seconds,
                        len(events.rows.seq_ids))


def merge(a: Optional[TokenExperts], b: TokenExperts) -> TokenExperts:
    """Two passes of one prompt as one: counts summed, the later resident set, events joined."""
    if a is None:
        return b
    routed = []
    for la, lb in zip(a.routed, b.routed):
        per: dict[int, list] = {e: [n, c] for e, n, c in la}
        for e, n, c in lb:
            entry = per.setdefault(e, [0, c])
            entry[0] += n
            if _RANK[c] > _RANK[entry[1]]:
                entry[1] = c
        routed.append(tuple((e, n, c) for e, (n, c) in sorted(per.items())))
    return TokenExperts(b.phase, tuple(routed), b.resident, a.evicted + b.evicted,
                        a.prefetched + b.prefetched, a.bytes_read + b.bytes_read,
                        a.stall_seconds + b.stall_seconds, max(a.batch, b.batch))
