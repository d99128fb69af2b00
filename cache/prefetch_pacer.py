"""How much to prefetch: no more than the disk can deliver before the layers it is for run.

A prefetch read that cannot finish before its layer is computed only delays the demand reads
behind it on the same disk, so the cache keeps the bytes outstanding (demand and prefetch reads
queued or running) under what the link delivers in ``horizon`` layer steps. Both rates are
measured online on the engine thread, never hard-coded: the link's bandwidth from the I/O pool's
busy time and bytes, the layer step from the time between MoE layers less the time stalled on
loads (the compute the reads can hide behind).
"""
from __future__ import annotations

import math
import time
from typing import Optional

HORIZON = 2          # layer steps ahead a prefetch may be for (the next layer and the one after)
ALPHA = 0.2          # weight of a new sample in the moving averages
MIN_SAMPLE = 4       # experts' worth of bytes in a bandwidth sample


class PrefetchPacer:
    """Moving averages of link bandwidth and layer compute time; ``allowed`` turns them into
    a number of prefetches that may be issued now."""

    def __init__(self, expert_bytes: int, fallback: int, horizon: int = HORIZON) -> None:
        """fallback: prefetches allowed before both rates are measured (the I/O threads)."""
        self.expert_bytes = expert_bytes
        self.fallback = fallback
        self.horizon = horizon
        self.bandwidth: Optional[float] = None      # bytes per second while reading
        self.layer_seconds: Optional[float] = None  # compute per MoE layer step
        self._io = (0.0, 0)
        self._last: Optional[tuple[int, float, float]] = None   # (layer, time, stall so far)

    def layer_started(self, layer: int, stalled_total: float) -> None:
        """At each MoE layer: ``stalled_total`` is the cache's stall seconds so far."""
        now = time.perf_counter()
        if self._last is not None and layer == self._last[0] + 1:
            dt = (now - self._last[1]) - (stalled_total - self._last[2])
            if dt > 0:
                self.layer_seconds = dt if self.layer_seconds is None else \
                    (1 - ALPHA) * self.layer_seconds + ALPHA * dt
        self._last = (layer, now, stalled_total)

    def io_sample(self, busy_seconds: float, bytes_read: int) -> None:
        """The I/O pool's cumulative (busy seconds, bytes); a sample once enough arrived."""
        db, dn = busy_seconds - self._io[0], bytes_read - self._io[1]
        if dn < MIN_SAMPLE * self.expert_bytes or db <= 0:
            return
        self._io = (busy_seconds, bytes_read)
        bw = dn / db
        self.bandwidth = bw if self.bandwidth is None else (1 - ALPHA) * self.bandwidth + ALPHA * bw

    def allowed(self, outstanding: int) -> int:
        """Prefetches to issue now, with ``outstanding`` reads (demand or prefetch) queued or
        running: what fits in ``horizon`` layer steps of the link beyond them; at least one
        when the link is idle (a guess then costs no demand read any time)."""
        if self.bandwidth is None or self.layer_seconds is None:
            return max(self.fallback - outstanding, 0)
        fits = self.bandwidth * self.layer_seconds * self.horizon / self.expert_bytes
        n = math.floor(fits) - outstanding
        return max(n, 1 if outstanding == 0 else 0)
