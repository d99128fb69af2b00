"""cache/prefetch_pacer.py: prefetches limited to what the link delivers in the horizon."""
from __future__ import annotations

import pytest

from cache.prefetch_pacer import PrefetchPacer

MB = 1 << 20


def test_before_measuring_the_io_threads_bound_it() -> None:
    p = PrefetchPacer(5 * MB, fallback=4)
    assert p.allowed(0) == 4 and p.allowed(3) == 1 and p.allowed(5) == 0


def test_measured_rates_give_the_bytes_of_the_horizon() -> None:
    p = PrefetchPacer(5 * MB, fallback=4, horizon=2)
    p.io_sample(0.1, 100 * MB)                    # 1000 MB/s while busy
    p.layer_started(0, 0.0)
    p.layer_started(1, 0.0)
    assert p.bandwidth == pytest.approx(1000 * MB)
    assert p.layer_seconds is not None and p.layer_seconds > 0
    p.layer_seconds = 0.01                        # 10 ms per layer: 2 x 10 MB fit = 4 experts
    assert p.allowed(0) == 4 and p.allowed(1) == 3 and p.allowed(4) == 0
    p.layer_seconds = 0.001                       # less than one read fits: one, when idle
    assert p.allowed(0) == 1 and p.allowed(1) == 0


def test_layer_time_leaves_out_stalls_and_small_samples_wait() -> None:
    p = PrefetchPacer(5 * MB, fallback=4)
    p.layer_started(3, 0.0)
    p.layer_started(4, 10.0)                      # the whole interval was a stall
    assert p.layer_seconds is None
    p.io_sample(0.001, MB)                        # under 4 experts' worth: no sample yet
    assert p.bandwidth is None
