"""Prefetch on the disk tier: `auto` with prefetch against `auto` without and `lru`, same run.

    python -m bench.prefetch [--preset smollm2-moe-64x] [--budget 25%] [--repeats 3]
                             [--prompts 3] [--max-tokens 16] [--json OUT]

One engine per system in this process (each with its own expert slots, O_DIRECT reads, so no
system warms another's page cache), the same MT-Bench prompts (chat template, greedy, EOS ignored)
decoded one at a time; each repeat runs the systems in alternating order. Per system: decode
ms/token (median, with every run), decode disk MB/token, hit rate, stall, prefetch precision
(used / issued) and recall (uses served by a prefetch / uses that were not resident before it);
per repeat the paired ratios, reported as median (min-max), and the stall-free ceiling: the
slower system's time without its stalls bounds what removing stalls can gain. Writes the JSON
and a PNG.

Simulator check (``--no-sim`` skips it): the same prompts once more on an all-resident engine that
records a moe-trace v2 (the routing does not depend on the cache) and times the compute; that
trace replayed (bench/replay_sim.py) at the same budget with the time model taken from this
machine (one layer step = the resident ms/token / MoE layers; the link = the disk's O_DIRECT
bandwidth, measured now; the header's expert bytes) gives simulated ms/token for `lru` and `auto`,
set against the measured ones (goal: within 20%).
"""
from __future__ import annotations

from moeserve import runtime_env

runtime_env.apply()     # moeserve's thread settings (as `moeserve serve` runs), before numpy and torch load

import argparse
import os
import statistics
import time
from typing import Any, Optional

from bench.common import RESULTS, bar_plot, heldout_prompts, machine, table, write_json

SYSTEMS = {"auto": ("auto", "on"), "auto-noprefetch": ("auto", "off"), "lru": ("lru", "off")}
KEYS = ("hits", "misses", "prefetch_issued", "prefetch_used", "prefetch_dropped", "bytes_disk",
        "stall_seconds")
RATIOS = (("auto-noprefetch", "auto"), ("lru", "auto"))     # (slower expected, faster): > 1 wins
SIMULATED = ("lru", "auto")     # the measured systems the replay also runs (same policy, prefetch)
SIM_TOLERANCE = 0.20


def decode_one(eng: Any, rid: str, ids: list[int], max_tokens: int) -> dict[str, float]:
    """Decode ``ids``; gaps between tokens and the cache counters' change after the first."""
    from engine.protocol import GenerateRequest, SamplingParams
    eng.add_request(GenerateRequest(rid, tuple(ids), SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True)))
    stamps: list[float] = []
    first: dict[str, float] = {}
    while eng.has_work():
        for d in eng.step():
            if d.error:
                raise RuntimeError(f"request {rid} failed: {d.error}")
            if d.token_ids:
                stamps.append(time.perf_counter())
                if len(stamps) == 1:
                    first = dict(eng.stats().cache)
    last = eng.stats().cache
    gaps = [(b - a) * 1000 for a, b in zip(stamps, stamps[1:])]
    out = {k: last.get(k, 0.0) - first.get(k, 0.0) for k in KEYS}
    out.update(tokens=len(gaps), ms=sum(gaps))
    return out


def summarize(runs: list[dict[str, float]]) -> dict[str, Any]:
    tot = {k: sum(r[k] for r in runs) for k in (*KEYS, "tokens", "ms")}
    t = max(tot["tokens"], 1)
    per_run = [r["ms"] / max(r["tokens"], 1) for r in runs]
    uses = tot["hits"] + tot["misses"]
    return {"ms_per_token": statistics.median(per_run), "runs_ms_per_token": per_run,
            "disk_mb_per_token": tot["bytes_disk"] / t / 1e6,
            "hit_rate": tot["hits"] / uses if uses else None,
            "stall_ms_per_token": tot["stall_seconds"] * 1000 / t,
            "prefetch_issued_per_token": tot["prefetch_issued"] / t,
            "prefetch_precision": tot["prefetch_used"] / tot["prefetch_issued"] if tot["prefetch_issued"] else None,
            "prefetch_recall": tot["prefetch_used"] / (tot["prefetch_used"] + tot["misses"])
            if tot["prefetch_issued"] else None}


def mean_ms(runs: list[dict[str, float]]) -> float:
    """ms per decoded token over all of a repeat's prompts (the stall counter's denominator)."""
    return sum(r["ms"] for r in runs) / max(sum(r["tokens"] for r in runs), 1)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smollm2-moe-64x", help="default-model preset (built on first use)")
    ap.add_argument("--model", default=None, help="checkpoint dir instead of the preset")
    ap.add_argument("--budget", default="25%", help="--expert-budget of every system")
    ap.add_argument("--repeats", type=int, default=3, help="runs of every system, alternating order")
    ap.add_argument("--prompts", type=int, default=3, help="MT-Bench prompts per run")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens decoded per prompt")
    ap.add_argument("--threads", type=int, default=1, help="compute threads (as bench.e2e)")
    ap.add_argument("--json", default=os.path.join(RESULTS, "prefetch.json"), help="output JSON")
    ap.add_argument("--no-sim", dest="sim", action="store_false",
                    help="skip the simulator check (replay of a trace of these prompts)")
    a = ap.parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from configs import CacheConfig, EngineConfig
    from convert.default_model import ensure_default_model
    from moeserve.wiring import build_engine
    torch.set_num_threads(a.threads)
    model = a.model or ensure_default_model(a.preset)
    tok = AutoTokenizer.from_pretrained(model)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       return_dict=True)["input_ids"] for p in heldout_prompts(a.prompts)]
    engines = {name: build_engine(EngineConfig(model=model, max_batch=1, threads=a.threads, prefix_cache=False),
                                  CacheConfig(expert_budget=a.budget, policy=pol, prefetch=pf), progress=False)
               for name, (pol, pf) in SYSTEMS.items()}
    runs: dict[str, list[list[dict[str, float]]]] = {n: [] for n in SYSTEMS}
    try:
        for r in range(a.repeats):
            order = list(SYSTEMS) if r % 2 == 0 else list(reversed(SYSTEMS))
            for name in order:
                runs[name].append([decode_one(engines[name], f"{name}-{r}-{i}", ids, a.max_tokens)
                                   for i, ids in enumerate(prompts)])
                print(f"repeat {r + 1}/{a.repeats} {name}: "
                      f"{summarize(runs[name][-1])['ms_per_token']:.1f} ms/token", flush=True)
    finally:
        for e in engines.values():
            e.close()
    rows = [{"system": n, **summarize([x for run in runs[n] for x in run])} for n in SYSTEMS]
    for row, n in zip(rows, SYSTEMS):
        row["runs_ms_per_token"] = [summarize(run)["ms_per_token"] for run in runs[n]]
        row["ms_per_token"] = statistics.median(row["runs_ms_per_token"])
    ratios = []
    for slow, fast in RATIOS:
        per = [summarize(s)["ms_per_token"] / summarize(f)["ms_per_token"] for s, f in zip(runs[slow], runs[fast])]
        byt = [summarize(f)["disk_mb_per_token"] / summarize(s)["disk_mb_per_token"]
               for s, f in zip(runs[slow], runs[fast])]
        # a bound on any speedup that removes stalls only: the slower system without its stalls
        ceil = [mean_ms(s) / (mean_ms(s) - summarize(s)["stall_ms_per_token"]) for s in runs[slow]]
        ratios.append({"ratio": f"{fast} speedup over {slow}", "median": statistics.median(per),
                       "min": min(per), "max": max(per), "runs": per,
                       "disk_bytes_ratio_median": statistics.median(byt),
                       "stall_free_ceiling": statistics.median(ceil)})
    sim = sim_check(model, prompts, a, {r["system"]: r["ms_per_token"] for r in rows}) if a.sim else None
    fmt = lambda v: "n/a" if v is None else (f"{v:.3g}" if isinstance(v, float) else v)   # noqa: E731
    print(table([{k: fmt(v) for k, v in r.items() if k != "runs_ms_per_token"} for r in rows],
                ["system", "ms_per_token", "disk_mb_per_token", "hit_rate", "stall_ms_per_token",
                 "prefetch_issued_per_token", "prefetch_precision", "prefetch_recall"]))
    print(table([{k: fmt(v) for k, v in r.items() if k != "runs"} for r in ratios],
                ["ratio", "median", "min", "max", "disk_bytes_ratio_median", "stall_free_ceiling"]))
    out = write_json(a.json, {"machine": machine(), "model": os.path.basename(model.rstrip("/")),
                              "budget": a.budget, "repeats": a.repeats, "prompts": a.prompts,
                              "max_tokens": a.max_tokens, "threads": a.threads, "results": rows,
                              "ratios": ratios, "simulator_check": sim})
    bar_plot(os.path.splitext(out)[0] + ".png", [r["system"] for r in rows],
             [r["ms_per_token"] for r in rows], "decode ms/token (median of repeats)",
             f"prefetch on the disk tier, {a.budget} of the experts in RAM")
    if sim is not None:
        print(f"simulator check: layer step {sim['compute_ms']:.2f} ms, disk {sim['bandwidth'] / 1e9:.2f} GB/s, "
              f"{sim['expert_bytes'] / 1e6:.2f} MB/expert (link {sim['link']:.3f} experts/step)")
        print(table([{k: fmt(v) for k, v in r.items()} for r in sim["systems"]],
                    ["system", "measured_ms_per_token", "simulated_ms_per_token", "error", "within_20pct"]))
    print(f"wrote {out}")
    return 0


def sim_check(model: str, prompts: list[list[int]], a: argparse.Namespace,
              measured: dict[str, float]) -> dict[str, Any]:
    """Replays a trace of ``prompts`` with this machine's time model against the measured ms/token."""
    import tempfile

    from bench.e2e_sys import largest_shard, parallel_read_bandwidth, sequential_read_bandwidth
    from bench.replay import TimeModel, run_replay
    from cache.trace import load_trace
    from configs import CacheConfig, EngineConfig
    from configs.cache import parse_budget
    from moeserve.wiring import build_engine
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.jsonl")
        eng = build_engine(EngineConfig(model=model, max_batch=1, threads=a.threads, prefix_cache=False),
                           CacheConfig(expert_budget="all", record_trace=path), progress=False)
        try:
            runs = [decode_one(eng, f"sim-{i}", ids, a.max_tokens) for i, ids in enumerate(prompts)]
        finally:
            eng.close()
        header, requests = load_trace(path)
    L, E = header["num_layers"], header["num_experts"]
    eb = int(header["expert_bytes"])
    shard = largest_shard(model)
    bw = max(sequential_read_bandwidth(shard), parallel_read_bandwidth(shard))
    compute_ms = mean_ms(runs) / L
    capacity = parse_budget(a.budget, L * E * eb) / (L * E * eb)
    tm = TimeModel(compute_ms=compute_ms, bandwidth=bw, expert_bytes=eb)
    systems = []
    for r in run_replay(header, requests, [capacity], 1.0, list(SIMULATED), tm):
        got, sim = measured[r["policy"]], r["ms_per_token"]
        err = sim / got - 1.0
        systems.append({"system": r["policy"], "measured_ms_per_token": got, "simulated_ms_per_token": sim,
                        "simulated_hit_rate": r["hit_rate"], "error": err,
                        "within_20pct": abs(err) <= SIM_TOLERANCE})
    return {"compute_ms": compute_ms, "bandwidth": bw, "expert_bytes": eb, "capacity": capacity,
            "link": tm.link(), "resident_ms_per_token": mean_ms(runs), "systems": systems}


if __name__ == "__main__":
    raise SystemExit(main())
