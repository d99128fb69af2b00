"""Shared benchmark plumbing: prompts, result files, tables, plots, memory and page-cache helpers."""
from __future__ import annotations

import json
import os
import platform
import socket
import statistics
from typing import Any, Optional, Sequence

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server(serve_args: Sequence[str], port: int, log_path: Optional[str] = None,
                 deadline_s: float = 1800) -> Any:
    """`moeserve serve --port PORT *serve_args` from this checkout; returns the process once its
    /health answers 200 (its output to ``log_path`` when given). Exits naming the failure."""
    import subprocess
    import sys
    import time

    import httpx
    args = [sys.executable, "-m", "moeserve.cli", "serve", "--port", str(port), *serve_args]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = open(log_path, "w") if log_path else None
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out,
                            stderr=subprocess.STDOUT if out else None)
    where = f"; see {log_path}" if log_path else ""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}{where}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)   # readiness poll, bounded by the deadline
    proc.kill()
    raise SystemExit("the server did not become ready")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> str:
    import psutil
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {platform.system()}")


def heldout_prompts(n: int) -> list[str]:
    """First turns of MT-Bench ids 121-160 (never the default model's calibration text)."""
    from convert.mtbench import HELDOUT_IDS, load_questions
    qs = sorted((q for q in load_questions() if q.question_id in HELDOUT_IDS), key=lambda q: q.question_id)
    return [q.turns[0] for q in qs[:n]]


def percentile(xs: Sequence[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    """Markdown table of ``rows`` restricted to ``cols``."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def dense_variant(fmt: str) -> tuple[str, str]:
    """A benchmark's moeserve format, e.g. 'int4:32+dense' -> ('int4:32', its --dense-quantize:
    'int4' with '+dense', else 'off')."""
    spec, _, extra = fmt.partition("+")
    return spec, "int4" if extra == "dense" else "off"


def write_json(name: str, data: Any) -> str:
    """Writes ``data`` to ``name`` under RESULTS (an absolute path stands for itself), replaced
    whole: never left half-written. Returns the path."""
    path = os.path.join(RESULTS, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
    return path


def bar_plot(path: str, labels: list[str], values: list[float], ylabel: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(4, len(labels) * 1.2), 3.5))
    ax.bar(labels, values, color="tab:blue")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def drop_page_cache(paths: Sequence[str]) -> None:
    """posix_fadvise(DONTNEED) every file under ``paths`` so no run starts warm from another's reads."""
    for root in paths:
        files = [root] if os.path.isfile(root) else [
            os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
