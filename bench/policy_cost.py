"""Per-layer cost of each cache policy at the shapes of real MoE models, on synthetic routing.

    python -m bench.policy_cost [--policies auto,lru] [--shapes 30x64x8] [--batches 1,8]
                                [--tokens 12] [--repeats 3] [--json OUT] [--plot OUT.png]

For every policy, shape (MoE layers x experts, top-k) and batch size, a small driver plays
decode steps through the policy exactly as the engine does (begin_step; per layer: hint,
observe, one ``victims`` call for the misses when full, on_access, prefetch of up to 4 experts, on_load /
on_evict) with a cache of 25% of the experts, loads completing instantly. Only the time spent
inside policy calls counts; ms_per_layer = that time / (decode steps x layers), after a prompt
pass and ``--warmup`` decode steps; each case is measured ``--repeats`` times (the policies in
turn, in alternating order) and reported as the median, with min and max. The collection of past matrices is filled with 120
synthetic requests first, as on a server that has been running a while.

Routing: per layer a Zipf(1.1) popularity over a random permutation of the experts, a
per-request preference (Dirichlet-like weights), and token-to-token reuse (a token keeps each of
the previous token's experts at a layer with probability 0.3): skewed, reused, and different
across requests, as in the traces of ../shared/traces.
"""
from __future__ import annotations

from moeserve import runtime_env

runtime_env.apply()     # the engine's thread settings (one BLAS thread), before numpy loads

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from bench.common import RESULTS, machine, median, table, write_json
from bench.e2e_plan import run_order
from cache.eam import EAMCollection
from cache.policies import POLICY_NAMES, make_policy
from cache.policy import CachePolicy, ExpertKey
from cache.routing import Routed

# (name, MoE layers, experts, top-k)
SHAPES: tuple[tuple[str, int, int, int], ...] = (
    ("Mixtral-8x7B", 32, 8, 2), ("DeepSeek-V2-Lite", 26, 64, 6), ("smollm2-moe-64x", 30, 64, 8),
    ("Qwen3-30B-A3B", 48, 128, 8), ("DeepSeek-V3", 58, 256, 8))
PREFETCH_LIMIT = 4
CAPACITY = 0.25
PROMPT_TOKENS = 16


@dataclass(frozen=True)
class Routing:
    """Synthetic router: per-layer popularity, per-request preference, temporal reuse."""

    layers: int
    experts: int
    top_k: int
    seed: int = 0

    def requests(self, n: int) -> list["RequestRouting"]:
        rng = np.random.default_rng(self.seed)
        L, E = self.layers, self.experts
        ranks = np.arange(1, E + 1, dtype=np.float64) ** -1.1
        base = np.stack([ranks[rng.permutation(E)] for _ in range(L)])            # [L, E]
        base /= base.sum(axis=1, keepdims=True)
        out = []
        for i in range(n):
            pref = rng.gamma(0.5, size=(L, E))
            pref /= pref.sum(axis=1, keepdims=True)
            logp = np.log(0.5 * base + 0.5 * pref)
            out.append(RequestRouting(logp, self.top_k, np.random.default_rng(self.seed + 1 + i)))
        return out


class RequestRouting:
    def __init__(self, logp: np.ndarray, top_k: int, rng: np.random.Generator) -> None:
        self.logp, self.k, self.rng = logp, top_k, rng
        self.prev: Optional[np.ndarray] = None

    def token(self) -> np.ndarray:
        """[L, k] distinct experts per layer for the next token."""
        logits = self.logp + self.rng.gumbel(size=self.logp.shape)
        if self.prev is not None:        # reuse: the previous token's experts get a boost
            keep = self.rng.random(self.prev.shape) < 0.3
            rows = np.nonzero(keep)[0]
            logits[rows, self.prev[keep]] += 50.0
        top = np.argpartition(-logits, self.k - 1, axis=1)[:, :self.k]
        self.prev = top
        return top


class Driver:
    """Plays steps through one policy and sums the time spent inside its calls."""

    def __init__(self, policy: CachePolicy, slots: int) -> None:
        self.p, self.slots = policy, slots
        self.resident: set[ExpertKey] = set()
        self.seconds = 0.0

    def _call(self, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        self.seconds += time.perf_counter() - t0
        return out

    def _load(self, keys: list[ExpertKey], pinned: set[ExpertKey], layer: int) -> list[ExpertKey]:
        """Make room for ``keys`` (one ``victims`` call, as the engine asks for a batch's
        misses at once) and load them; returns the ones that got a slot."""
        short = len(self.resident) + len(keys) - self.slots
        if short > 0:
            for v in self._call(self.p.victims, self.resident, pinned, layer, short):
                self.resident.discard(v)
                self._call(self.p.on_evict, v)
            keys = keys[:max(0, self.slots - len(self.resident))]
        for key in keys:
            self.resident.add(key)
            self._call(self.p.on_load, key)
        return keys

    def step(self, sids: Sequence[str], routing: Sequence[np.ndarray],
             hints: Optional[Sequence[np.ndarray]]) -> None:
        """routing[i]: [L, T_i * k] experts of request i; hints[i]: [L, E] look-ahead scores."""
        p = self.p
        self._call(p.begin_step, list(sids))
        L = p.num_layers
        for layer in range(L):
            if hints is not None and layer + 1 < L:
                # an [E] float32 array, as the engine's read_routing hands it over
                scores = np.mean([h[layer + 1] for h in hints], axis=0).astype(np.float32)
                self._call(p.hint, layer + 1, scores)
            routed = Routed([(sid, r[layer].tolist()) for sid, r in zip(sids, routing)],
                            sids if hints is None else ())      # hints only on decode steps
            self._call(p.observe, layer, routed)
            need = [(layer, e) for e in sorted({e for ids in routed.values() for e in ids})]
            pinned = set(need)
            self._load([key for key in need if key not in self.resident], pinned, layer)
            for key in need:
                self._call(p.on_access, key)
            want = self._call(p.prefetch, layer, self.resident, PREFETCH_LIMIT)
            self._load([key for key in want if key not in self.resident], pinned, layer)


def _hint(tok: np.ndarray, E: int) -> np.ndarray:
    """Look-ahead scores [L, E]: the token's own experts score high (a good next-layer router)."""
    h = np.full((tok.shape[0], E), 0.1 / E)
    np.put_along_axis(h, tok, 1.0, axis=1)
    return h / h.sum(axis=1, keepdims=True)


def measure(name: str, L: int, E: int, k: int, batch: int, tokens: int, warmup: int,
            seed: int = 0) -> float:
    """ms per layer of policy ``name`` (decode steps after a prompt pass and warm-up)."""
    gen = Routing(L, E, k, seed)
    coll = EAMCollection(L, E, 120)
    for req in gen.requests(120):            # history: what finished requests left behind
        m = np.zeros((L, E))
        for _ in range(16):
            np.add.at(m, (np.arange(L)[:, None], req.token()), 1.0)
        coll.insert(m)
    policy = make_policy(name, L, E, k, coll)
    drv = Driver(policy, max(1, round(CAPACITY * L * E)))
    reqs = gen.requests(batch + 120)[120:]
    sids = [f"r{i}" for i in range(batch)]
    prompt = [np.concatenate([r.token() for _ in range(PROMPT_TOKENS)], axis=1) for r in reqs]
    drv.step(sids, prompt, None)
    for i in range(warmup + tokens):
        if i == warmup:
            drv.seconds = 0.0
        toks = [r.token() for r in reqs]
        drv.step(sids, toks, [_hint(t, E) for t in toks])
    return drv.seconds * 1e3 / (tokens * L)


def plot(rows: Sequence[dict[str, Any]], out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(f"{r['layers']}x{r['experts']} top-{r['top_k']}" for r in rows))
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for name in dict.fromkeys(r["policy"] for r in rows):
            pts = [r["ms_per_layer"] for r in rows if r["policy"] == name and r["batch"] == b]
            ax.plot(shapes[:len(pts)], pts, marker="o", label=name)
        ax.axhline(0.1 if b == 1 else 0.3, color="gray", linestyle=":", label="goal")
        ax.set_yscale("log")
        ax.set_ylabel("ms per MoE layer (policy calls)")
        ax.set_title(f"batch {b}")
        ax.tick_params(axis="x", labelrotation=20)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _parse_shapes(text: str) -> list[tuple[int, int, int]]:
    out = []
    for part in text.split(","):
        try:
            L, E, k = (int(x) for x in part.strip().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: expected LAYERSxEXPERTSxTOPK items, got {part!r}")
        if not (L > 0 and E > 0 and 0 < k <= E):
            raise SystemExit(f"--shapes: {part!r} needs positive layers, experts and 0 < top-k <= experts")
        out.append((L, E, k))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.policy_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", default=",".join(POLICY_NAMES),
                    help=f"comma-separated, from {', '.join(POLICY_NAMES)}")
    ap.add_argument("--shapes", default=",".join(f"{L}x{E}x{k}" for _, L, E, k in SHAPES),
                    help="LAYERSxEXPERTSxTOPK, comma-separated (default: the five model shapes)")
    ap.add_argument("--batches", default="1,8", help="requests decoded together, comma-separated")
    ap.add_argument("--tokens", type=int, default=12, help="decode steps measured per case")
    ap.add_argument("--warmup", type=int, default=4, help="decode steps played before measuring")
    ap.add_argument("--repeats", type=int, default=3,
                    help="measurements per case (policies alternating); the table gives the median")
    ap.add_argument("--json", dest="json_out", metavar="OUT",
                    default=os.path.join(RESULTS, "policy_cost.json"), help="results JSON")
    ap.add_argument("--plot", metavar="OUT.png", default=None,
                    help="plot (default: the JSON path with .png)")
    args = ap.parse_args(argv)
    names = [p.strip() for p in args.policies.split(",") if p.strip()]
    bad = [p for p in names if p not in POLICY_NAMES]
    if bad or not names:
        raise SystemExit(f"--policies: unknown {', '.join(bad) or '(none)'}; "
                         f"choose from {', '.join(POLICY_NAMES)}")
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise SystemExit(f"--batches: expected comma-separated integers, got {args.batches!r}")
    if not batches or min(batches) < 1 or args.tokens < 1 or args.warmup < 0 or args.repeats < 1:
        raise SystemExit("--batches must be >= 1, --tokens >= 1, --warmup >= 0, --repeats >= 1")

    rows = []
    for L, E, k in _parse_shapes(args.shapes):
        for b in batches:
            runs: dict[str, list[float]] = {name: [] for name in names}
            for rep in range(args.repeats):
                for name in run_order(names, rep):
                    runs[name].append(measure(name, L, E, k, b, args.tokens, args.warmup))
            for name in names:
                ms = runs[name]
                mid, lo, hi = median(ms), min(ms), max(ms)
                rows.append({"policy": name, "layers": L, "experts": E, "top_k": k, "batch": b,
                             "ms_per_layer": mid, "ms_min": lo, "ms_max": hi, "runs": ms})
                print(f"  {name:13s} {L}x{E} top-{k} batch {b}: {mid:.3f} ms/layer ({lo:.3f}-{hi:.3f})",
                      flush=True)
    print(f"policy cost per MoE layer; {machine()}")
    print(table(rows, ["policy", "layers", "experts", "top_k", "batch", "ms_per_layer", "ms_min", "ms_max"]))
    write_json(os.path.abspath(args.json_out),
               {"machine": machine(), "capacity": CAPACITY, "prefetch_limit": PREFETCH_LIMIT,
                "tokens": args.tokens, "repeats": args.repeats, "results": rows})
    png = args.plot or os.path.splitext(args.json_out)[0] + ".png"
    plot(rows, png)
    print(f"wrote {args.json_out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
