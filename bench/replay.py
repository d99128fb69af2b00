"""Trace replay: cache policies against each other and against the Belady and oracle limits.

    python -m bench.replay TRACE [--capacity 0.1,0.25,0.5] [--link B] [--policies ...]
                                 [--compute-ms MS] [--bandwidth BYTES_PER_S] [--expert-bytes N]
                                 [--json OUT] [--plot OUT.png]

The simulator model is described in bench/replay_sim.py. Hit rate, stalls and loads count
decode tokens only (the prompt pass warms the cache but is not scored); stalls are in layer
steps (one MoE layer's compute) per decoded token.

Time model: one layer step takes --compute-ms (a MoE layer's compute, measured on the
machine); the link moves --bandwidth bytes/s; an expert has --expert-bytes (default: the v2
header's expert_bytes). With all three the link in experts per layer step is derived as
bandwidth x compute / expert bytes (--link is then ignored); --link B is the case of a link
moving B experts per step. Reported per policy: hit rate, stalls and loads per token, bytes
per token (loads x expert bytes, when known) and simulated ms per token ((L + stalls) x
compute ms, when --compute-ms is given). Traces with look-ahead (moe-trace v2) feed it to
the policies as the engine does (``hint``), so the replayed ``auto`` is the engine's.
"""
from __future__ import annotations

from moeserve import runtime_env

runtime_env.apply()     # the engine's thread settings (one BLAS thread), before numpy loads

import argparse
import json
import math
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from bench.replay_limits import BeladyPolicy, Future, OraclePolicy
from bench.replay_sim import build_passes, simulate
from cache.eam import EAMCollection
from cache.policies import POLICY_NAMES, make_policy
from cache.policy import CachePolicy
from cache.trace import TraceFormatError, load_trace

LIMITS = ("belady", "oracle")
ALL = (*POLICY_NAMES, *LIMITS)


@dataclass(frozen=True)
class TimeModel:
    """Seconds and bytes behind the layer-step clock (any field may be unknown)."""

    compute_ms: Optional[float] = None       # one MoE layer's compute
    bandwidth: Optional[float] = None        # link bytes per second
    expert_bytes: Optional[int] = None       # one expert

    def __post_init__(self) -> None:
        for name in ("compute_ms", "bandwidth", "expert_bytes"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"TimeModel.{name} must be positive, got {v!r}")

    def link(self) -> Optional[float]:
        """Experts the link moves per layer step, when the model has all three numbers."""
        if self.compute_ms is None or self.bandwidth is None or self.expert_bytes is None:
            return None
        return self.bandwidth * self.compute_ms / 1e3 / self.expert_bytes


def policy_factory(name: str, L: int, E: int, k: int, collection_capacity: int = 120):
    def make(future: Future) -> CachePolicy:
        if name == "belady":
            return BeladyPolicy(L, E, k, future)
        if name == "oracle":
            return OraclePolicy(L, E, k, future)
        # a fresh, empty collection per run: it fills from the trace's own earlier requests
        return make_policy(name, L, E, k, EAMCollection(L, E, collection_capacity))
    return make


def run_replay(header: dict[str, Any], requests: Sequence[dict[str, Any]],
               capacities: Sequence[float], link: float,
               policies: Sequence[str], time: TimeModel = TimeModel()) -> list[dict[str, Any]]:
    """One row per capacity and policy; ``time`` adds bytes and ms per token (and, when
    complete, replaces ``link`` by the one it derives)."""
    L, E, k = header["num_layers"], header["num_experts"], header["top_k"]
    link = time.link() or link
    passes = build_passes(requests, L)
    results = []
    for cap in capacities:
        for name in policies:
            st = simulate(passes, L, E, cap, link, policy_factory(name, L, E, k))
            m = st.metrics()
            m["bytes_per_token"] = (None if time.expert_bytes is None
                                    else m["loads_per_token"] * time.expert_bytes)
            m["ms_per_token"] = (None if time.compute_ms is None
                                 else (L + m["stalls_per_token"]) * time.compute_ms)
            results.append({"capacity": cap, "link": link, "policy": name, **m})
    return results


def format_table(results: Sequence[dict[str, Any]]) -> str:
    cols = ("capacity", "link", "policy", "hit_rate", "stalls_per_token", "loads_per_token",
            "bytes_per_token", "ms_per_token", "prefetch_precision", "prefetch_recall")
    head = ("cap", "link", "policy", "hit", "stall/tok", "load/tok", "MB/tok", "ms/tok",
            "pf_prec", "pf_recall")

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return "inf" if math.isinf(v) else f"{v:.3f}"
        return str(v)

    rows = [[fmt(r[c] / 1e6 if c == "bytes_per_token" and r[c] is not None else r[c])
             for c in cols] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def plot(results: Sequence[dict[str, Any]], out: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["policy"] for r in results):
        pts = sorted((r["capacity"], r["hit_rate"]) for r in results if r["policy"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                linestyle="--" if name in LIMITS else "-", label=name)
    ax.set_xlabel("cache capacity (fraction of all experts)")
    ax.set_ylabel("hit rate (decode tokens)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _floats(text: str, flag: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: expected comma-separated numbers, got {text!r}")
    return vals


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", help="moe-trace v1 or v2 JSONL file")
    ap.add_argument("--capacity", default="0.1,0.25,0.5",
                    help="cache sizes as fractions of all experts, comma-separated")
    ap.add_argument("--link", default="1", help="experts the link moves per layer step ('inf': no limit)")
    ap.add_argument("--policies", default=",".join(ALL),
                    help=f"comma-separated, from {', '.join(ALL)}")
    ap.add_argument("--compute-ms", type=float, default=None,
                    help="one MoE layer's compute time in ms (gives simulated ms/token)")
    ap.add_argument("--bandwidth", type=float, default=None,
                    help="link bandwidth in bytes/s (with --compute-ms and expert bytes: derives --link)")
    ap.add_argument("--expert-bytes", type=int, default=None,
                    help="bytes of one expert (default: the v2 trace header's expert_bytes)")
    ap.add_argument("--json", dest="json_out", metavar="OUT", help="write the results as JSON")
    ap.add_argument("--plot", metavar="OUT.png", help="plot hit rate against capacity")
    args = ap.parse_args(argv)

    caps = _floats(args.capacity, "--capacity")
    if not caps or not all(0 < c <= 1 for c in caps):
        raise SystemExit(f"--capacity: fractions must lie in (0, 1], got {args.capacity!r}")
    link = _floats(args.link, "--link")
    if len(link) != 1 or not link[0] > 0:
        raise SystemExit(f"--link: expected one positive number or 'inf', got {args.link!r}")
    names = [p.strip() for p in args.policies.split(",") if p.strip()]
    bad = [p for p in names if p not in ALL]
    if bad or not names:
        raise SystemExit(f"--policies: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(ALL)}")
    try:
        header, requests = load_trace(args.trace)
    except TraceFormatError as exc:
        raise SystemExit(f"error: {exc}")

    try:
        tm = TimeModel(args.compute_ms, args.bandwidth, args.expert_bytes or header.get("expert_bytes"))
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")
    if args.bandwidth is not None and tm.link() is None:
        raise SystemExit("--bandwidth needs --compute-ms and the expert size (--expert-bytes or "
                         "a v2 trace header with expert_bytes)")
    results = run_replay(header, requests, caps, link[0], names, tm)
    print(f"{args.trace}: {len(requests)} requests, {header['num_layers']} layers x "
          f"{header['num_experts']} experts, top-{header['top_k']}")
    print(format_table(results))
    if args.json_out:
        with open(args.json_out, "w") as f:
            # strict JSON has no infinity: an unlimited link is written as null
            clean = [{**r, "link": None if math.isinf(r["link"]) else r["link"]} for r in results]
            json.dump({"trace": args.trace, "results": clean}, f, indent=1, allow_nan=False)
    if args.plot:
        plot(results, args.plot, f"{header.get('model') or args.trace}, link {args.link}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
