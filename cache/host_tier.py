"""The CUDA host tier: pinned host slots between the disk and the device slots.

An LRU of its own below the policy-managed device tier: a device load takes the expert's host
copy when there is one (no disk read), else a host slot (the least recently used copy no load
is using) that the disk fills first.

The tiers are inclusive: a host copy stays when its expert moves to the device, so a device
eviction needs no copy back (PCIe time and a host slot found at the worst moment), and the host
tier holds what the device holds when it has the room. Its LRU order is the last use on either
tier: every device access of an expert (a hit or a completed load) and its device eviction make
its host copy the most recent, so the host keeps the copies of the experts the device is using
and of the ones it has just let go (the next to come back), and gives up the copies that went
unused longest. Copies to the device run on two dedicated streams, demand
loads on a high-priority one; a device slot's ``free`` event orders the copy after the compute
on its old occupant, its ``ready`` event orders compute after the copy. Each copy is timed on the
GPU's own clock (its ``start`` and ``ready`` events), so the link's throughput while copies run
can be told apart from the time it sits idle (``BusyTime``).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Optional, Sequence

import torch

from cache.io_pool import LoadJob
from cache.policy import ExpertKey
from cache.quant import ExpertFormat
from cache.slots import SlotPool, auto_host_budget
from configs.cache import parse_budget


def resolve_host_budget(text: str, total: int) -> int:
    """--host-budget in bytes; 'auto' from the RAM available now (cache.slots.auto_host_budget)."""
    if str(text).strip().lower() != "auto":
        return parse_budget(text, total, "host_budget")
    import psutil
    vm = psutil.virtual_memory()
    return auto_host_budget(total, vm.available, vm.total)


class HostLRU:
    """Which expert each host slot holds, least recently used first; slots a load is using
    are never handed out again until it is reported (pure bookkeeping over a SlotPool)."""

    def __init__(self, pool: SlotPool) -> None:
        self.pool = pool
        self._lru: "OrderedDict[ExpertKey, int]" = OrderedDict()   # key -> host slot
        self._busy: set[ExpertKey] = set()                         # host copies a load is using

    def __len__(self) -> int:
        return len(self._lru)

    def reserve(self, key: ExpertKey) -> Optional[tuple[int, bool]]:
        """(host slot holding or receiving ``key``, whether it must come from disk); None when
        every host slot is in use by a load."""
        if key in self._lru:
            self._lru.move_to_end(key)
            self._busy.add(key)
            return self._lru[key], False
        slot = self.pool.acquire()
        if slot is None:
            old = next((k for k in self._lru if k not in self._busy), None)
            if old is None:
                return None
            slot = self._lru.pop(old)
        self._lru[key] = slot
        self._busy.add(key)
        return slot, True

    def can_reserve(self, key: ExpertKey) -> bool:
        """Whether ``reserve(key)`` would get a host slot now (every busy key has a copy, so a
        copy no load is using exists exactly when there are more copies than busy keys)."""
        return key in self._lru or self.pool.free_count > 0 or len(self._busy) < len(self._lru)

    def hold(self, key: ExpertKey) -> Optional[int]:
        """The host slot of ``key``'s copy, held like a load's (never handed out) until
        ``release``; None when there is no copy or a load is using it (it may be filling)."""
        if key not in self._lru or key in self._busy:
            return None
        self._lru.move_to_end(key)
        self._busy.add(key)
        return self._lru[key]

    def touch(self, key: ExpertKey) -> None:
        """``key`` was used on the device, or just left it: its host copy (if any) is the most
        recent."""
        if key in self._lru:
            self._lru.move_to_end(key)

    def release(self, key: ExpertKey, keep: bool) -> None:
        """The load using ``key``'s host copy is over; ``keep`` False drops the copy (a failed read)."""
        self._busy.discard(key)
        if not keep and key in self._lru:
            self.pool.release(self._lru.pop(key))


class BusyTime:
    """Seconds covered by at least one of a stream of [start, end) spans: copies on the two
    streams overlap, so their durations cannot simply be summed. The union is exact while a span
    arrives fewer than ``keep`` merged spans late; an older one counts only its part after them."""

    def __init__(self, keep: int = 64) -> None:
        self.keep = keep
        self._spans: list[tuple[float, float]] = []     # disjoint, by start
        self._folded = 0.0                              # seconds of spans merged away
        self._floor = -math.inf                         # where the folded spans end

    def add(self, start: float, end: float) -> None:
        start = max(start, self._floor)
        if end <= start:
            return
        merged: list[tuple[float, float]] = []
        for s, e in sorted(self._spans + [(start, end)]):
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        while len(merged) > self.keep:
            s, e = merged.pop(0)
            self._folded += e - s
            self._floor = e
        self._spans = merged

    @property
    def seconds(self) -> float:
        return self._folded + sum(e - s for s, e in self._spans)


class HostTier:
    def __init__(self, chunks: Sequence[tuple[int, int]], fmt: ExpertFormat,
                 device: torch.device, device_slots: int) -> None:
        """chunks: the pinned allocations, (bytes, slots) each (cache.slots.pinned_plan)."""
        self.device = device
        self.pool = SlotPool(0, fmt, torch.device("cpu"), pin=True, chunks=chunks)
        self.lru = HostLRU(self.pool)
        # demand copies on a high-priority stream, so they do not queue behind a prefetch copy
        self._stream = torch.cuda.Stream(device)
        self._demand_stream = torch.cuda.Stream(device, priority=-1)
        # one pair per device slot: a slot has at most one load in flight; blocking events, so
        # an I/O thread waiting for its copy sleeps instead of spinning on a CPU core
        self._free = [torch.cuda.Event() for _ in range(device_slots)]
        self._start = [torch.cuda.Event(enable_timing=True) for _ in range(device_slots)]
        self._ready = [torch.cuda.Event(enable_timing=True, blocking=True)
                       for _ in range(device_slots)]
        self._t0 = torch.cuda.Event(enable_timing=True)    # the origin of the copies' spans
        self._t0.record(torch.cuda.current_stream(device))
        self._t0.synchronize()
        self.copying = BusyTime()        # GPU-clock seconds with a host-to-device copy running

    # ---- engine thread ----------------------------------------------------------------------
    def can_prepare(self, key: ExpertKey) -> bool:
        """Whether a load of ``key`` would get a host slot now: asked before a device slot is
        freed for it, so no device copy is evicted for a load that cannot start."""
        return self.lru.can_reserve(key)

    def prepare(self, job: LoadJob) -> bool:
        """Give ``job`` (device slot already chosen) its host slot and events; False when every
        host slot is in use by a load."""
        got = self.lru.reserve(job.key)
        if got is None:
            return False
        job.host_slot, job.from_disk = got
        job.free_event, job.ready_event = self._free[job.slot], self._ready[job.slot]
        job.free_event.record(torch.cuda.current_stream(self.device))
        return True

    def finished(self, job: LoadJob) -> None:
        """``job`` was reported back: its host copy is free to reuse (dropped if the read failed)."""
        self.lru.release(job.key, keep=job.error is None or not job.from_disk)
        if job.h2d_span is not None:
            self.copying.add(*job.h2d_span)

    def withdrawn(self, job: LoadJob) -> None:
        """``job`` was cancelled before it ran: its host slot holds the expert only if it did
        before (a disk read that never happened filled nothing)."""
        self.lru.release(job.key, keep=not job.from_disk)

    def used(self, key: ExpertKey) -> None:
        """A device access of ``key`` or its device eviction (see the module docstring)."""
        self.lru.touch(key)

    def wait_ready(self, device_slot: int) -> None:
        """Compute queued from now on waits for the copy into ``device_slot``."""
        torch.cuda.current_stream(self.device).wait_event(self._ready[device_slot])

    def stats(self, expert_bytes: int) -> dict[str, float]:
        return {"host_slots": float(self.pool.num_slots),
                "host_resident_bytes": float(len(self.lru) * expert_bytes),
                "host_allocated_bytes": float(self.pool.allocated_bytes),
                "h2d_busy_seconds": self.copying.seconds}

    # ---- I/O thread -------------------------------------------------------------------------
    def fill(self, job: LoadJob, device_buf: torch.Tensor,
             read: Callable[[torch.Tensor], int]) -> None:
        """Read into the host slot when needed (``read`` returns the disk bytes), then copy to
        the device slot; returns once the copy is done, since the host slot may be reused as
        soon as the job is reported."""
        host_buf = self.pool.buffer(job.host_slot)
        if job.from_disk:
            job.bytes_disk = read(host_buf)
        stream = self._demand_stream if job.demand else self._stream
        start = self._start[job.slot]
        with torch.cuda.stream(stream):
            stream.wait_event(job.free_event)             # old occupant's compute is done
            start.record(stream)                          # and the copies queued before this one
            device_buf.copy_(host_buf, non_blocking=True)
            job.ready_event.record(stream)
        job.ready_event.synchronize()
        job.h2d_span = (self._t0.elapsed_time(start) / 1e3,                 # ms -> s
                        self._t0.elapsed_time(job.ready_event) / 1e3)
