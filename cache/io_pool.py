"""Background expert loads: a pool of I/O threads fed by a priority queue.

The engine thread decides everything (which expert, which slot, what to evict) and submits a
``LoadJob``; an I/O thread only fills the buffers it names and reports the job back on the
completion queue. Demand loads jump ahead of queued prefetches; a prefetch that becomes needed is
promoted by queueing it again at demand priority (whichever copy a thread takes first runs it).
"""
from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from cache.provider import ExpertSource

DEMAND, PREFETCH, STOP = 1, 2, 0      # queue priorities: lower runs first


@dataclass(eq=False)
class LoadJob:
    """One expert moving into a device-tier slot (through a host slot on CUDA)."""

    key: tuple[int, int]
    src: ExpertSource
    slot: int                            # device-tier slot to fill
    demand: bool                         # False: a prefetch
    host_slot: Optional[int] = None      # CUDA: the pinned host slot it passes through
    from_disk: bool = True               # CUDA: False when the host tier already holds it
    free_event: Any = None               # CUDA: compute finished with the slot's old occupant
    ready_event: Any = None              # CUDA: the copy into the device slot is done
    bytes_disk: int = 0
    bytes_h2d: int = 0
    error: Optional[BaseException] = None
    claimed: bool = False                # set by the thread that runs it (under the pool lock)


class IOPool:
    """``threads`` workers running ``work(job, staging)``; each owns one staging buffer."""

    def __init__(self, threads: int, work: Callable[[LoadJob, torch.Tensor], None],
                 new_staging: Callable[[], torch.Tensor],
                 device: Optional[torch.device] = None) -> None:
        self.completions: "queue.Queue[LoadJob]" = queue.Queue()
        self._queue: "queue.PriorityQueue[tuple[int, int, Optional[LoadJob]]]" = queue.PriorityQueue()
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._work = work
        self._device = device
        self._threads = [threading.Thread(target=self._run, args=(new_staging(),),
                                          name=f"moeserve-io-{i}", daemon=True)
                         for i in range(threads)]
        self._closed = False
        for t in self._threads:
            t.start()

    def submit(self, job: LoadJob) -> None:
        self._queue.put((DEMAND if job.demand else PREFETCH, next(self._seq), job))

    def promote(self, job: LoadJob) -> None:
        """A queued prefetch is needed now: queue it again ahead of every prefetch."""
        with self._lock:
            if job.claimed:
                return
            job.demand = True
        self._queue.put((DEMAND, next(self._seq), job))

    def _run(self, staging: torch.Tensor) -> None:
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        while True:
            _, _, job = self._queue.get()
            if job is None:
                return
            with self._lock:
                if job.claimed:          # the other copy of a promoted job already ran
                    continue
                job.claimed = True
            try:
                self._work(job, staging)
            except BaseException as e:   # reported to the engine thread, which raises it
                job.error = e
            self.completions.put(job)

    def close(self) -> None:
        """Stop the workers: reads in progress finish, queued jobs are dropped."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._queue.put((STOP, next(self._seq), None))
        for t in self._threads:
            t.join()
