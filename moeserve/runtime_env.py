"""Environment defaults that must be in place before torch or numpy load: their thread pools
read them once. ``moeserve`` sets them in its own process (the engine process inherits them);
the benchmarks that model the engine's policies set them the same way. A value the user set wins.
"""
from __future__ import annotations

import os

DEFAULTS: dict[str, str] = {
    # compute threads that spin while they wait measured 3-5x slower per token than 1 thread on
    # a busy 2-core machine (8x model, batch 1); waiting passively, all cores did as well as 1
    "OMP_WAIT_POLICY": "PASSIVE",
    # numpy's BLAS serves the cache policies' matching (a few small products per pass): its own
    # thread pool beside torch's compute threads made a [120, 1920] x [1920, 8] product 43x
    # slower (5.6 vs 0.13 ms) on a busy 2-core machine
    "OPENBLAS_NUM_THREADS": "1",
}


def apply() -> None:
    """Sets every default the environment does not already choose."""
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)
