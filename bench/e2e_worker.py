"""One system of the end-to-end benchmark, in its own process (so peak RSS and disk reads are its own).

    python -m bench.e2e_worker SPEC.json

SPEC: {"system": name, "model_dir": str, "prompts_c1": [[ids]], "prompts_c4": [[ids]],
"max_tokens": int, "threads": int, "dtype": "bf16"|"fp32", "budget": "25%", plus per-system keys}.
Prints one line ``E2E_RESULT {json}`` with the raw measurements bench.e2e_report.summarize reads;
a failure is reported in "error" (the process still exits 0 so the parent can tell it from a crash).
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from typing import Any

from bench.e2e_sys import peak_rss_bytes, read_bytes_of

MARK = "E2E_RESULT "
# (policy, prefetch) of each moeserve system; None: all experts resident
# auto runs as a user gets it: --prefetch auto (off on a CPU machine, where experts come from disk)
MOESERVE_SYSTEMS: dict[str, Any] = {"resident": None, "lru": ("lru", "off"),
                                    "moe-infinity": ("moe-infinity", "on"), "auto": ("auto", "auto"),
                                    "resident-int8": None, "auto-int8": ("auto", "auto"),
                                    "resident-int4": None, "auto-int4": ("auto", "auto")}


def run_moeserve(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from configs import CacheConfig, EngineConfig
    from engine.protocol import GenerateRequest, SamplingParams
    from moeserve.wiring import build_engine

    torch.set_num_threads(spec["threads"])
    mode = MOESERVE_SYSTEMS[spec["system"]]
    ccfg = CacheConfig() if mode is None else CacheConfig(
        expert_budget=spec["budget"], policy=mode[0], prefetch=mode[1])
    ecfg = EngineConfig(model=spec["model_dir"], max_batch=spec["concurrency"], dtype=spec["dtype"], threads=spec["threads"])
    eng = build_engine(ecfg, ccfg, progress=False)
    try:
        cache0 = dict(eng.stats().cache)
        if mode is not None and "hits" not in cache0:
            raise RuntimeError(f"moeserve.wiring.build_engine ignored {ccfg}: its provider "
                               f"({type(eng.provider).__name__}) keeps every expert resident")
        params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True)
        out: dict[str, Any] = {"decode_ms": [], "ttft_ms": [], "generated_tokens": 0}
        io0 = read_bytes_of()
        limit = spec["seconds_per_phase"]
        phase0 = time.perf_counter()
        for i, ids in enumerate(spec["prompts_c1"]):     # one request at a time
            if i and time.perf_counter() - phase0 > limit:
                break
            out["prompts_c1"] = i + 1
            eng.add_request(GenerateRequest(f"c1-{i}", tuple(ids), params))
            start, stamps = time.perf_counter(), []
            while eng.has_work():
                for d in eng.step():
                    if d.error:
                        raise RuntimeError(f"request {d.request_id} failed: {d.error}")
                    stamps += [time.perf_counter()] * len(d.token_ids)
            out["ttft_ms"].append((stamps[0] - start) * 1000)
            out["decode_ms"] += [(b - a) * 1000 for a, b in zip(stamps, stamps[1:])]
            out["generated_tokens"] += len(stamps)
        reqs = [GenerateRequest(f"c4-{i}", tuple(ids), params) for i, ids in enumerate(spec["prompts_c4"])]
        start, c4 = time.perf_counter(), 0
        conc = spec["concurrency"]
        for r in reqs[:conc]:                            # max_batch=conc: they decode together
            eng.add_request(r)
        added = min(conc, len(reqs))
        while eng.has_work():
            for d in eng.step():
                if d.error:
                    raise RuntimeError(f"request {d.request_id} failed: {d.error}")
                c4 += len(d.token_ids)
                # continuous batching: a finished request's slot goes to the next prompt
                if d.finished and added < len(reqs) and time.perf_counter() - start <= limit:
                    eng.add_request(reqs[added])
                    added += 1
        out["prompts_c4"] = added
        out.update(c4_seconds=time.perf_counter() - start, c4_tokens=c4)
        out["generated_tokens"] += c4
        out["disk_read_bytes"] = read_bytes_of() - io0
        cache1 = dict(eng.stats().cache)
        if mode is not None:
            for k in ("hits", "misses", "stall_seconds"):
                out[k] = cache1.get(k, 0.0) - cache0.get(k, 0.0)
            out["cache_disk_bytes"] = cache1.get("bytes_disk", 0.0) - cache0.get("bytes_disk", 0.0)
        return out
    finally:
        eng.close()


def run(spec: dict[str, Any]) -> dict[str, Any]:
    name = spec["system"]
    if name in MOESERVE_SYSTEMS:
        out = run_moeserve(spec)
    elif name == "accelerate":
        from bench.e2e_baselines import run_accelerate
        out = run_accelerate(spec)
    elif name.startswith("llama.cpp"):
        from bench.e2e_baselines import run_llama_cpp
        out = run_llama_cpp(spec)
    else:
        raise ValueError(f"unknown system {name!r}")
    out.setdefault("tokens_per_request", spec["max_tokens"])
    out.setdefault("prompts_c1", len(spec["prompts_c1"]))
    out.setdefault("prompts_c4", len(spec["prompts_c4"]))
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        spec = json.load(f)
    t0 = time.perf_counter()
    try:
        out = run(spec)
        out["error"] = None
    except Exception as e:  # reported in the JSON: the table shows why a system has no numbers
        traceback.print_exc()
        out = {"error": f"{type(e).__name__}: {e}"}
    out["peak_rss_bytes"] = peak_rss_bytes()
    out["wall_seconds"] = time.perf_counter() - t0
    out["dtype"] = spec.get("dtype")
    print(MARK + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
