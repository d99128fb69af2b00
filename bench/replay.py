"""Trace replay: cache policies against each other and against the Belady and oracle limits.

    python -m bench.replay TRACE [--capacity 0.1,0.25,0.5] [--link B] [--policies ...]
                                 [--json OUT] [--plot OUT.png]

The simulator model is described in bench/replay_sim.py. Hit rate, stalls and loads count
decode tokens only (the prompt pass warms the cache but is not scored); stalls are in layer
steps (one MoE layer's compute) per decoded token.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Optional, Sequence

from bench.replay_limits import BeladyPolicy, Future, OraclePolicy
from bench.replay_sim import build_passes, simulate
from cache.eam import EAMCollection
from cache.policies import POLICY_NAMES, make_policy
from cache.policy import CachePolicy
from cache.trace import TraceFormatError, load_trace

LIMITS = ("belady", "oracle")
ALL = (*POLICY_NAMES, *LIMITS)


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
               policies: Sequence[str]) -> list[dict[str, Any]]:
    L, E, k = header["num_layers"], header["num_experts"], header["top_k"]
    passes = build_passes(requests, L)
    results = []
    for cap in capacities:
        for name in policies:
            st = simulate(passes, L, E, cap, link, policy_factory(name, L, E, k))
            results.append({"capacity": cap, "link": link, "policy": name, **st.metrics()})
    return results


def format_table(results: Sequence[dict[str, Any]]) -> str:
    cols = ("capacity", "link", "policy", "hit_rate", "stalls_per_token", "loads_per_token",
            "prefetch_precision", "prefetch_recall")
    head = ("cap", "link", "policy", "hit", "stall/tok", "load/tok", "pf_prec", "pf_recall")

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return "inf" if math.isinf(v) else f"{v:.3f}"
        return str(v)

    rows = [[fmt(r[c]) for c in cols] for r in results]
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
    ap.add_argument("trace", help="moe-trace v1 JSONL file")
    ap.add_argument("--capacity", default="0.1,0.25,0.5",
                    help="cache sizes as fractions of all experts, comma-separated")
    ap.add_argument("--link", default="1", help="experts the link moves per layer step ('inf': no limit)")
    ap.add_argument("--policies", default=",".join(ALL),
                    help=f"comma-separated, from {', '.join(ALL)}")
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

    results = run_replay(header, requests, caps, link[0], names)
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
