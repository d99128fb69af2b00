"""The KV-cache slots, and the prompt prefix each free slot still holds (prefix caching).

A finished request's slot keeps its keys and values. A new request takes the free slot whose held
tokens share the longest prefix with its prompt, and its prompt pass starts after that prefix: a
chat turn re-sends the whole conversation, so only the new turn is read. A slot is taken for its
prefix only if that prefix covers at least half of the prompt the slot held (the reply after it
may be dropped from the next turn, as thinking models' templates drop their reasoning, or
regenerated). So a side request that shares a few template tokens with a conversation (a chat
front end's title or tag request) does not destroy that conversation's cache: it takes a slot
holding nothing, else the slot freed longest ago, so the most recent conversations stay cached.
This is llama.cpp's server (``cache_prompt``, a slot per conversation); vLLM's automatic prefix
caching shares blocks between running requests too, which a slot cache without paging cannot.

Linear-attention layers (Qwen3-Next) carry a recurrent state that cannot go back to an earlier
position: on such models a slot is reused when its held tokens are all a prefix of the prompt, or
up to the copy of its state saved during its prompt pass (engine/models/linear_state.py).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    a, b = tuple(a), tuple(b)
    n = min(len(a), len(b))
    if a[:n] == b[:n]:      # the usual case for a chat turn: one comparison in C
        return n
    lo, hi = 0, n           # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class SlotPool:
    """Free slots in release order (oldest first), each with the tokens its cache holds."""

    def __init__(self, slots: int, reuse: bool, whole_prefix_only: bool = False,
                 saved: Optional[Callable[[int], int]] = None) -> None:
        self.reuse = reuse
        self.whole_prefix_only = whole_prefix_only
        # whole_prefix_only: the position of a slot's saved linear state (-1: none), which a
        # prompt sharing the tokens up to there may also restart from
        self._saved = saved
        self._free: list[int] = list(range(slots))
        self._held: list[tuple[int, ...]] = [()] * slots
        self._held_prompt = [0] * slots      # how many of the held tokens were a prompt

    def __len__(self) -> int:
        return len(self._free)

    def reusable(self, slot: int, prompt: Sequence[int]) -> int:
        """Prompt tokens whose keys and values ``slot`` already holds and a pass may skip; the
        last prompt token is always computed, since its logits give the first output token."""
        held = self._held[slot]
        n = min(common_prefix(held, prompt), len(prompt) - 1)
        if not self.whole_prefix_only or n >= len(held):
            return n
        at = self._saved(slot) if self._saved is not None else -1
        return at if 0 < at <= n else 0

    def acquire(self, prompt: Sequence[int]) -> tuple[int, int]:
        """(slot, prompt tokens reused) for a new request; the pool must not be empty."""
        if not self._free:
            raise RuntimeError("no free KV-cache slot")
        # nothing worth reusing: a slot holding nothing, else the one freed longest ago
        best = next((s for s in self._free if not self._held[s]), self._free[0])
        reused = 0
        if self.reuse:
            for s in self._free:
                n = self.reusable(s, prompt)
                if n > reused and 2 * n >= self._held_prompt[s]:   # half its prompt at least
                    best, reused = s, n
        self._free.remove(best)
        self._held[best], self._held_prompt[best] = (), 0
        return best, reused

    def release(self, slot: int, held: Sequence[int], prompt: int) -> None:
        """Free ``slot``, whose cache holds the keys and values of ``held``, the first ``prompt``
        of them a prompt (empty: nothing usable, e.g. after a failed pass)."""
        self._held[slot] = tuple(held) if self.reuse else ()
        self._held_prompt[slot] = min(prompt, len(self._held[slot]))
        self._free.append(slot)

    def held(self, slot: int) -> tuple[int, ...]:
        return self._held[slot]
