"""Fixed pools of expert slots, allocated once at start-up: one contiguous buffer per expert.

A tier's byte budget becomes ``budget // slot_bytes`` slots in a single [slots, slot_bytes]
allocation (pinned host slots: a few power-of-two chunks, see ``pinned_plan``), so a tier move is
one read or one copy into a row, nothing is allocated per token, and the bytes held can never
exceed the budget.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from cache.quant import ExpertFormat, ExpertWeights

ALIGN = 4096                  # O_DIRECT offset/length/address alignment (covers 512 B sectors too)


def aligned_empty(nbytes: int, align: int = ALIGN) -> torch.Tensor:
    """A uint8 CPU tensor of ``nbytes`` whose data pointer is a multiple of ``align``."""
    raw = torch.empty(nbytes + align, dtype=torch.uint8)
    shift = (-raw.data_ptr()) % align
    return raw[shift:shift + nbytes]


class BudgetError(ValueError):
    """A tier's budget cannot hold what the model needs; the message names the budget field."""


def slot_count(budget: int, expert_bytes: int, minimum: int, field: str) -> int:
    """Slots a ``budget`` of bytes pays for; at least ``minimum`` (one layer's top-k experts)."""
    n = budget // expert_bytes
    if n < minimum:
        raise BudgetError(f"{field}={budget} bytes holds {n} experts of {expert_bytes} bytes; "
                          f"at least {minimum} are needed (one layer's top-k), i.e. "
                          f"{field} >= {minimum * expert_bytes} bytes")
    return n


def pinned_plan(budget: int, slot_bytes: int, need: int) -> list[tuple[int, int]]:
    """Pinned host chunks for ``need`` slots within ``budget`` bytes: (chunk bytes, slots) each.
    PyTorch's pinned (caching host) allocator rounds every allocation up to a power of two, so
    one allocation of the budget could pin up to twice it; every chunk here is a power of two,
    the largest that both the rest of the budget and the slots still needed allow, so the memory
    really pinned never exceeds the budget and each chunk wastes less than one slot. A budget that
    covers all ``need`` slots ('all', or 'auto' when every expert fits) gets every slot: then the
    chunks may pin up to one slot per chunk more than the slots' bytes (a budget of exactly their
    bytes would otherwise leave the last one or two out)."""
    out: list[tuple[int, int]] = []
    left, want = budget, need
    if budget >= need * slot_bytes:
        left = 2 * need * slot_bytes          # each chunk is over half slots: this always suffices
    one = 1 << (slot_bytes - 1).bit_length()          # the smallest power of two holding a slot
    while want > 0 and left >= slot_bytes:
        p = 1 << (min(left, want * slot_bytes).bit_length() - 1)   # <= the rest of both
        if p < slot_bytes:          # the last slot needs a chunk of its own, if it is paid for
            if one > left:
                break
            p = one
        n = min(p // slot_bytes, want)
        out.append((p, n))
        left, want = left - p, want - n
    return out


def auto_host_budget(total: int, available: int, ram: int) -> int:
    """--host-budget auto: every expert if they fit in the RAM available now less a reserve for
    the OS and the rest of the process (10% of RAM, at least 4 GiB), else that much (the disk
    tier lies beneath it)."""
    reserve = max(4 << 30, ram // 10)
    return max(0, min(total, available - reserve))


class SlotPool:
    """``num_slots`` expert buffers of ``fmt.slot_bytes`` bytes on ``device``, in one allocation.

    On CPU the storage starts on a 4 KiB boundary and quantized slots are 4 KiB multiples, so an
    O_DIRECT read lands straight in a slot. Pinned (page-locked) when ``pin`` is set, so
    host-to-device copies can run asynchronously. Only the engine thread acquires and releases;
    I/O threads write into slots they were given.
    """

    def __init__(self, num_slots: int, fmt: ExpertFormat, device: torch.device,
                 pin: bool = False, chunks: Optional[Sequence[tuple[int, int]]] = None) -> None:
        """chunks: allocate the slots in these (bytes, slots) pieces (pinned_plan) instead of
        one [num_slots, slot_bytes] allocation; num_slots is then their total."""
        if chunks is not None:
            num_slots = sum(n for _, n in chunks)
        if num_slots < 1:
            raise BudgetError(f"a slot pool needs at least one slot, got {num_slots}")
        self.fmt = fmt
        self.slot_bytes = fmt.slot_bytes
        sb = self.slot_bytes
        pieces = chunks if chunks is not None else [(num_slots * sb, num_slots)]
        self._chunks: list[torch.Tensor] = []
        self._rows: list[torch.Tensor] = []       # row s: slot s's flat uint8 [slot_bytes]
        for nbytes, n in pieces:
            if n * sb > nbytes:
                raise ValueError(f"a chunk of {nbytes} bytes cannot hold {n} slots of {sb}")
            if device.type == "cpu" and not pin:
                flat = aligned_empty(nbytes)
            else:
                flat = torch.empty(nbytes, dtype=torch.uint8, device=device,
                                   pin_memory=pin and device.type == "cpu")
            self._chunks.append(flat)
            self._rows += list(flat[:n * sb].view(n, sb))
        self._views = [fmt.views(row) for row in self._rows]
        self._free = list(range(num_slots - 1, -1, -1))   # pop() hands out slot 0 first
        self._taken = [False] * num_slots

    @property
    def num_slots(self) -> int:
        return len(self._rows)

    @property
    def allocated_bytes(self) -> int:
        """Bytes of slot storage this pool holds (besides < 4 KiB of alignment slack on CPU)."""
        return sum(c.numel() for c in self._chunks)

    def is_pinned(self) -> bool:
        return all(c.is_pinned() for c in self._chunks)

    @property
    def free_count(self) -> int:
        return len(self._free)

    def acquire(self) -> Optional[int]:
        """A free slot index, or None when every slot is taken."""
        if not self._free:
            return None
        slot = self._free.pop()
        self._taken[slot] = True
        return slot

    def release(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or not self._taken[slot]:
            raise ValueError(f"slot {slot} is not an acquired slot of this pool")
        self._taken[slot] = False
        self._free.append(slot)

    def buffer(self, slot: int) -> torch.Tensor:
        """The flat uint8 [slot_bytes] buffer of ``slot``."""
        return self._rows[slot]

    def views(self, slot: int) -> ExpertWeights:
        """gate / up / down views of ``slot`` in the pool's format (made once at start-up)."""
        return self._views[slot]
