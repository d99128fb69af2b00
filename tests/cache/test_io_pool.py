"""cache/io_pool.py: demand loads overtake queued prefetches; promoted jobs run once; errors
come back on the completion queue; close() stops the threads."""
from __future__ import annotations

import threading

import torch

from cache.io_pool import IOPool, LoadJob
from cache.provider import ExpertSource, TensorRef

_REF = TensorRef("unused", 0, (1, 1), "F32")
_SRC = ExpertSource(0, 0, _REF, _REF, _REF)


def _pool(threads: int = 1):
    started = threading.Event()
    release = threading.Event()
    ran: list[tuple[int, int]] = []

    def work(job: LoadJob, staging: torch.Tensor) -> None:
        if job.key == (9, 9):                 # the first job holds the only thread
            started.set()
            release.wait(timeout=30)
        if job.key == (6, 6):
            raise OSError("disk on fire")
        ran.append(job.key)

    pool = IOPool(threads, work, lambda: torch.empty(1, dtype=torch.uint8))
    return pool, started, release, ran


def _job(key: tuple[int, int], demand: bool) -> LoadJob:
    return LoadJob(key, _SRC, 0, demand)


def _collect(pool: IOPool, n: int) -> list[LoadJob]:
    return [pool.completions.get(timeout=30) for _ in range(n)]


def test_demand_overtakes_queued_prefetches() -> None:
    pool, started, release, ran = _pool()
    try:
        pool.submit(_job((9, 9), True))
        started.wait(timeout=30)
        for e in range(3):
            pool.submit(_job((1, e), False))
        pool.submit(_job((0, 5), True))
        release.set()
        _collect(pool, 5)
        assert ran == [(9, 9), (0, 5), (1, 0), (1, 1), (1, 2)]
    finally:
        release.set()
        pool.close()


def test_promoted_prefetch_runs_once_and_first() -> None:
    pool, started, release, ran = _pool()
    try:
        pool.submit(_job((9, 9), True))
        started.wait(timeout=30)
        jobs = [_job((1, e), False) for e in range(3)]
        for j in jobs:
            pool.submit(j)
        pool.promote(jobs[2])
        assert jobs[2].demand
        release.set()
        done = _collect(pool, 4)
        assert ran == [(9, 9), (1, 2), (1, 0), (1, 1)]
        assert len(done) == 4 and pool.completions.empty()
    finally:
        release.set()
        pool.close()


def test_errors_are_reported_not_raised() -> None:
    pool, _, release, _ = _pool()
    release.set()
    try:
        pool.submit(_job((6, 6), True))
        (job,) = _collect(pool, 1)
        assert isinstance(job.error, OSError) and "disk on fire" in str(job.error)
    finally:
        pool.close()


def test_close_joins_threads() -> None:
    pool, _, release, _ = _pool(threads=3)
    release.set()
    threads = list(pool._threads)
    assert all(t.is_alive() for t in threads)
    pool.close()
    assert not any(t.is_alive() for t in threads)


def test_cancelled_job_never_runs_and_a_started_one_cannot_be_cancelled() -> None:
    pool, started, release, ran = _pool()
    try:
        first = _job((9, 9), True)
        pool.submit(first)
        started.wait(timeout=30)
        queued = [_job((1, e), False) for e in range(2)]
        for j in queued:
            pool.submit(j)
        assert not pool.cancel(first)          # running: it completes normally
        assert pool.cancel(queued[0])
        release.set()
        done = _collect(pool, 2)
        assert ran == [(9, 9), (1, 1)] and {j.key for j in done} == {(9, 9), (1, 1)}
        assert pool.completions.empty()
    finally:
        release.set()
        pool.close()


def test_io_counters_count_busy_time_and_bytes() -> None:
    def work(job: LoadJob, staging: torch.Tensor) -> None:
        job.bytes_disk = 1000
    pool = IOPool(2, work, lambda: torch.empty(1, dtype=torch.uint8))
    try:
        assert pool.io_counters() == (0.0, 0)
        for e in range(4):
            pool.submit(_job((0, e), True))
        _collect(pool, 4)
        busy, nbytes = pool.io_counters()
        assert nbytes == 4000 and busy > 0
    finally:
        pool.close()


def test_prefetches_run_one_at_a_time_and_demand_passes_them() -> None:
    release = threading.Event()
    lock = threading.Lock()
    running, peak, started = [0], [0], threading.Event()

    def work(job: LoadJob, staging: torch.Tensor) -> None:
        if job.demand:
            return
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        started.set()
        release.wait(timeout=30)
        with lock:
            running[0] -= 1

    pool = IOPool(3, work, lambda: torch.empty(1, dtype=torch.uint8))
    try:
        for e in range(3):
            pool.submit(_job((1, e), False))
        started.wait(timeout=30)
        pool.submit(_job((0, 0), True))
        first = pool.completions.get(timeout=30)   # while a guess holds the disk
        assert first.key == (0, 0)
        release.set()
        assert {j.key for j in _collect(pool, 3)} == {(1, 0), (1, 1), (1, 2)}
        assert peak[0] == 1
    finally:
        release.set()
        pool.close()


def test_cuda_workers_set_the_device_by_index_and_a_failed_setup_fails_jobs(monkeypatch) -> None:
    """`--device cuda` is an index-less torch.device, which torch.cuda.set_device refuses: the
    pool passes the current device's index. A worker whose setup fails reports every job it
    takes as failed (the engine raises), never dies silently (the engine would wait forever)."""
    calls: list[object] = []

    def set_device(d: object) -> None:
        calls.append(d)
        raise RuntimeError("CUDA driver gone")

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    ran: list[tuple[int, int]] = []
    pool = IOPool(2, lambda job, staging: ran.append(job.key),
                  lambda: torch.empty(1, dtype=torch.uint8), device=torch.device("cuda"))
    try:
        pool.submit(_job((0, 1), True))
        pool.submit(_job((0, 2), False))
        done = _collect(pool, 2)
    finally:
        pool.close()
    assert calls == [3, 3]
    assert ran == [] and all(isinstance(j.error, RuntimeError) and "driver gone" in str(j.error)
                             for j in done)
