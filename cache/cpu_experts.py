"""``--cpu-experts auto``: a missed expert whose copy is in pinned host RAM may be computed by the
CPU where it lies instead of being copied to the GPU (as Fiddler and llama.cpp's --cpu-moe do).

At batch 1 a cold expert serves one or two rows: copying it costs all its bytes over the link,
while the CPU reads those bytes once at its memory bandwidth and does a few FLOPs per byte. The
choice is made per expert and layer from measured costs:
    copy(e)      = expert bytes / link bandwidth (timed at start-up on one pinned slot)
    cpu(e, rows) = CPU seconds for that many rows (timed at start-up for one row, then a running
                   mean per row-count bucket from every CPU compute) + the rows' activations over
                   the link, both ways
and the CPU computes when cpu < copy. A bucket never measured is estimated from the nearest
smaller one scaled by the row count (pessimistic: CPU time grows less than linearly at a few
rows), so large prompt chunks copy. The expert stays where it is: the device tier is left to the
policy and its prefetches, and the host copy is held (no load may reuse its slot) until the layer
has consumed it.

The CPU's rounding differs from the GPU's, so with ``auto`` the output is no longer bit-identical
to all-resident execution. Formats: bf16 and int8 experts; int4 in the CUDA pack layout has no CPU
kernel, and ``auto`` is then off (logged).
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable, Optional

import torch

from cache.host_tier import HostTier
from cache.policy import ExpertKey
from cache.provider import HostExpert
from cache.quant import ExpertFormat, ExpertWeights
from cache.slots import SlotPool

log = logging.getLogger(__name__)

EWMA = 0.3             # weight of a new CPU timing in its bucket's running mean


def bucket(rows: int) -> int:
    """The power of two at or above ``rows``: CPU timings are kept per bucket."""
    return 1 << max(0, math.ceil(math.log2(max(rows, 1))))


class CpuCost:
    """The measured costs of the two ways to serve a missed expert (pure bookkeeping)."""

    def __init__(self, expert_bytes: int, row_bytes: int, link_bytes_per_s: float,
                 cpu_seconds_one_row: float) -> None:
        self.expert_bytes, self.row_bytes = expert_bytes, row_bytes
        self.link = link_bytes_per_s
        self.cpu: dict[int, float] = {1: cpu_seconds_one_row}     # bucket -> seconds

    def copy_seconds(self) -> float:
        return self.expert_bytes / self.link

    def cpu_seconds(self, rows: int) -> float:
        """CPU time for ``rows`` rows plus their activations over the link, there and back."""
        b = bucket(rows)
        known = max(k for k in self.cpu if k <= b)
        return self.cpu[known] * b / known + 2 * rows * self.row_bytes / self.link

    def prefer_cpu(self, rows: int) -> bool:
        return self.cpu_seconds(rows) < self.copy_seconds()

    def observe(self, rows: int, seconds: float) -> None:
        b = bucket(rows)
        old = self.cpu.get(b)
        self.cpu[b] = seconds if old is None else (1 - EWMA) * old + EWMA * seconds


class CpuExperts:
    """Decides, holds and releases the host copies of the experts a layer computes on the CPU."""

    def __init__(self, host: HostTier, cost: CpuCost) -> None:
        self.host, self.cost = host, cost
        self._held: set[ExpertKey] = set()

    @classmethod
    def create(cls, mode: str, fmt: ExpertFormat, host: Optional[HostTier], dev: SlotPool,
               compute: Callable[[torch.Tensor, ExpertWeights], torch.Tensor]
               ) -> Optional["CpuExperts"]:
        """The decider for ``mode`` ('auto' or 'off'), with the link and the CPU timed now on
        host slot 0 and device slot 0 (both still empty); None when off or not possible."""
        if mode == "off" or host is None or dev.num_slots == 0 or host.pool.num_slots == 0:
            return None
        if fmt.quantized and fmt.kind == "int4" and fmt.layout != "cpu":
            log.info("--cpu-experts auto: int4 experts in the %s pack layout have no CPU kernel; "
                     "every miss is copied to the device", fmt.layout)
            return None
        src, dst = host.pool.buffer(0), dev.buffer(0)
        src.zero_()                      # garbage bits could time as NaN/denormal arithmetic
        best_copy = best_cpu = float("inf")
        x = torch.zeros(1, fmt.hidden, dtype=fmt.dtype)
        for _ in range(3):
            torch.cuda.synchronize(dst.device)
            t = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize(dst.device)
            best_copy = min(best_copy, time.perf_counter() - t)
            t = time.perf_counter()
            compute(x, host.pool.views(0))
            best_cpu = min(best_cpu, time.perf_counter() - t)
        cost = CpuCost(fmt.slot_bytes, fmt.hidden * torch.finfo(fmt.dtype).bits // 8,
                       fmt.slot_bytes / best_copy, best_cpu)
        log.info("--cpu-experts auto: an expert copies in %.2f ms (%.1f GB/s), computes on the "
                 "CPU in %.2f ms for one row", best_copy * 1e3, cost.link / 1e9, best_cpu * 1e3)
        return cls(host, cost)

    def take(self, key: ExpertKey, rows: int) -> Optional[HostExpert]:
        """``key`` to compute on the CPU, its host copy held, when that is the cheaper way and
        the copy is there; None to copy it to the device as usual."""
        if not self.cost.prefer_cpu(rows):
            return None
        slot = self.host.lru.hold(key)
        if slot is None:
            return None
        self._held.add(key)
        return HostExpert(self.host.pool.views(slot), self.cost.observe)

    def release(self, key: ExpertKey) -> None:
        """The layer is done with ``key``'s host copy."""
        if key in self._held:
            self._held.discard(key)
            self.host.lru.release(key, keep=True)

    def release_all(self) -> None:
        for key in list(self._held):
            self.release(key)
