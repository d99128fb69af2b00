"""Start-up checks of the trace files named by --trace-store and --record-trace.

A --trace-store file that is not a readable store for this model (corrupt, foreign, nested past
what json can parse) is moved aside as NAME.corrupt-<time>, bytes and mode untouched, and the
server starts with an empty collection: never fatal. Errors about --record-trace name the file.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

from cache.eam import _validate_store
from cache.trace import ActivationTracer

log = logging.getLogger("moeserve")


class TraceFileError(ValueError):
    """A trace file given on the command line cannot be used; the message names it."""


def check_trace_store(path: str, num_layers: int, num_experts: int) -> Optional[str]:
    """Leave ``path`` usable as a store: None if it is (or is absent), else where the old file
    was moved. Raises TraceFileError only when the path cannot be a file at all."""
    if not os.path.lexists(path):
        return None
    if os.path.isdir(path):
        raise TraceFileError(f"--trace-store {path}: is a directory, not a file")
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"))
        _validate_store(doc, num_layers, num_experts)
        return None
    except OSError as exc:
        raise TraceFileError(f"--trace-store {path}: cannot be read: {exc}") from None
    except (ValueError, RecursionError, TypeError) as exc:   # UnicodeDecodeError is a ValueError
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
    aside = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while os.path.lexists(aside):
        aside, n = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{n}", n + 1
    try:
        os.rename(path, aside)   # a rename keeps the bytes and the mode
    except OSError as exc:
        raise TraceFileError(f"--trace-store {path}: not a trace store ({why}) and it could not "
                             f"be moved aside: {exc}") from None
    log.warning("trace store %s is not a readable store for this model (%s): moved it aside to "
                "%s; starting with an empty collection", path, why, aside)
    return aside


def open_tracer(path: str, num_layers: int, num_experts: int, top_k: int,
                model: str, expert_bytes: Optional[int] = None) -> ActivationTracer:
    """ActivationTracer appending to ``path``; any problem with the file names it.
    ``expert_bytes`` goes into a new file's moe-trace v2 header."""
    try:
        return ActivationTracer(num_layers, num_experts, top_k, record_path=path, model=model,
                                expert_bytes=expert_bytes)
    except UnicodeDecodeError:
        raise TraceFileError(f"--record-trace {path}: not a moe-trace file (not UTF-8 text); "
                             "name a new file or an existing trace of this model") from None
    except (OSError, ValueError) as exc:
        msg = str(exc)
        raise TraceFileError(msg if path in msg else f"--record-trace {path}: {msg}") from None
