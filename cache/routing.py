"""One MoE layer's routing split per request: computed once per layer by the provider (or the
tracer, which needs the same split) and handed to the tracer's caller and the policy.

Pure Python (no torch): policies import it.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Optional, Sequence


class StepRows(NamedTuple):
    """The engine's description of the rows of one forward pass: sequence i owns the next
    num_tokens[i] rows of every [T, ...] tensor; prefill[i] tells a prompt pass from a decode."""

    seq_ids: tuple[str, ...]
    num_tokens: tuple[int, ...]
    prefill: tuple[bool, ...]


class Routed(dict):
    """seq_id -> the expert ids its rows chose on one layer (repeats count), in row order;
    ``prompt``: the requests whose rows in this pass are prompt tokens. A plain mapping for
    code that only needs the split; policies read ``prompt`` instead of guessing a prompt pass
    from the number of ids."""

    def __init__(self, items: Iterable[tuple[str, list[int]]] = (),
                 prompt: Iterable[str] = ()) -> None:
        super().__init__(items)
        self.prompt: frozenset[str] = frozenset(prompt)


def split_routing(rows: Optional[StepRows], ids: Sequence[Sequence[int]]) -> Routed:
    """Split a layer's [T][k] routing by the step's rows. Without a matching description (a
    caller that never called begin_step) every row counts as one anonymous decode request."""
    if rows is None or sum(rows.num_tokens) != len(ids):
        return Routed([("", [int(e) for row in ids for e in row])])
    out = []
    start = 0
    for seq, n in zip(rows.seq_ids, rows.num_tokens):
        out.append((seq, [int(e) for row in ids[start:start + n] for e in row]))
        start += n
    return Routed(out, (s for s, pre in zip(rows.seq_ids, rows.prefill) if pre))


def prompt_pass(routed: object, seq_id: str, n_ids: int, top_k: int) -> bool:
    """Whether ``seq_id``'s routing is a prompt pass: from the split when it says so, else
    guessed as more ids than one token routes (plain mappings, e.g. a hand-written replay)."""
    prompt = getattr(routed, "prompt", None)
    if prompt is not None:
        return seq_id in prompt
    return n_ids > top_k
