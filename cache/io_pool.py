"""Background expert loads: a pool of I/O threads fed by a priority queue.

The engine thread decides everything (which expert, which slot, what to evict) and submits a
``LoadJob``; an I/O thread only fills the buffers it names and reports the job back on the
completion queue. Demand loads jump ahead of queued prefetches, and prefetches run one at a time
on one thread; a prefetch that becomes needed is promoted by queueing it again as a demand load
(whichever copy a thread takes first runs it); one that is no longer wanted before a thread took
it is cancelled (its entry is skipped).
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from cache.provider import ExpertSource

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
    h2d_span: Optional[tuple[float, float]] = None   # CUDA: the copy's [start, end), GPU clock, s
    error: Optional[BaseException] = None
    claimed: bool = False                # set by the thread that runs it (under the pool lock)


class IOPool:
    """``threads`` workers running ``work(job, staging)``; each owns one staging buffer.

    Demand jobs run on any worker, first come first served. Prefetches run on one worker only,
    one at a time and only when no demand job waits: a read in progress cannot be interrupted,
    so the disk never serves more than one guess while a needed expert waits behind it."""

    def __init__(self, threads: int, work: Callable[[LoadJob, torch.Tensor], None],
                 new_staging: Callable[[], torch.Tensor],
                 device: Optional[torch.device] = None) -> None:
        self.completions: "queue.Queue[LoadJob]" = queue.Queue()
        self._demand: deque[LoadJob] = deque()
        self._prefetch: deque[LoadJob] = deque()     # in issue order: most urgent first
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._work = work
        # the CUDA device by index, taken on the engine thread: set_device refuses an index-less
        # torch.device("cuda"), which is what `--device cuda` resolves to
        self._cuda_index: Optional[int] = None
        if device is not None and device.type == "cuda":
            self._cuda_index = device.index if device.index is not None else torch.cuda.current_device()
        self._threads = [threading.Thread(target=self._run, args=(new_staging(), i == 0),
                                          name=f"moeserve-io-{i}", daemon=True)
                         for i in range(threads)]
        self._closed = False
        self._running = 0                    # jobs being worked on now
        self._busy_since = 0.0               # when the pool last went from idle to busy
        self._busy = 0.0                     # seconds with at least one job running, so far
        self._bytes = 0                      # disk bytes of finished jobs
        for t in self._threads:
            t.start()

    def io_counters(self) -> tuple[float, int]:
        """(seconds with a read running, disk bytes read): their ratio is the bandwidth the
        pool reached while it had work, whatever the number of threads."""
        with self._lock:
            busy = self._busy + (time.perf_counter() - self._busy_since if self._running else 0.0)
            return busy, self._bytes

    def submit(self, job: LoadJob) -> None:
        with self._cv:
            (self._demand if job.demand else self._prefetch).append(job)
            self._cv.notify_all()

    def promote(self, job: LoadJob) -> None:
        """A queued prefetch is needed now: queue it again ahead of every prefetch."""
        with self._cv:
            if job.claimed:
                return
            job.demand = True
            self._demand.append(job)
            self._cv.notify_all()

    def cancel(self, job: LoadJob) -> bool:
        """Withdraw a job no thread has started (its queue entry is then skipped); False when
        one already runs it (it will complete normally)."""
        with self._lock:
            if job.claimed:
                return False
            job.claimed = True
        return True

    def _next(self, prefetches: bool) -> Optional[LoadJob]:
        """The next job this worker may run (claimed), or None once closed."""
        with self._cv:
            while not self._closed:
                for q in ((self._demand, self._prefetch) if prefetches else (self._demand,)):
                    while q:
                        job = q.popleft()
                        if not job.claimed:      # else: promoted and run already, or cancelled
                            job.claimed = True
                            if not self._running:
                                self._busy_since = time.perf_counter()
                            self._running += 1
                            return job
                self._cv.wait()
            return None

    def _run(self, staging: torch.Tensor, prefetches: bool) -> None:
        setup: Optional[BaseException] = None
        try:
            if self._cuda_index is not None:
                torch.cuda.set_device(self._cuda_index)
        except BaseException as e:       # every job this worker takes fails with it: a worker
            setup = e                    # that died here would leave the engine waiting forever
        if prefetches and len(self._threads) > 1:
            _lower_priority()
        while True:
            job = self._next(prefetches)
            if job is None:
                return
            try:
                if setup is not None:
                    raise setup
                self._work(job, staging)
            except BaseException as e:   # reported to the engine thread, which raises it
                job.error = e
            with self._lock:
                self._running -= 1
                self._bytes += job.bytes_disk
                if not self._running:
                    self._busy += time.perf_counter() - self._busy_since
            self.completions.put(job)

    def close(self) -> None:
        """Stop the workers: reads in progress finish, queued jobs are dropped."""
        if self._closed:
            return
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join()


PREFETCH_NICE = 10    # the prefetch thread's nice: a guess never takes a core from compute


def _lower_priority() -> None:
    """Lower this thread's CPU priority (Linux: nice is per thread). Each load costs ~0.8 ms of
    CPU (the read and the copy out of the staging buffer); on a busy 2-core machine the
    prefetch thread's share came out of the compute thread's, and ms per token did not drop
    although stalls fell 2.5x."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PREFETCH_NICE)
    except (AttributeError, OSError):
        pass          # not Linux, or not permitted: same priority as compute
