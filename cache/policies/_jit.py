"""numba's ``njit`` for the policies' compiled loops, or, where numba is missing (e.g. an offline
machine without its wheel), a stand-in that leaves the same code interpreted (with a warning)."""
from __future__ import annotations

import logging

try:
    from numba import njit
except ImportError:
    logging.getLogger(__name__).warning(
        "numba is not installed: the cache policies run their loops in plain Python (slow)")

    def njit(*args, **kwargs):  # type: ignore[no-redef]
        return args[0] if args and callable(args[0]) else (lambda f: f)

__all__ = ["njit"]
