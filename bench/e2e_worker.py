"""One system of the end-to-end benchmark, in its own process (so peak RSS and disk reads are its own).

    python -m bench.e2e_worker SPEC.json

SPEC: {"system": name (bench.e2e_plan.SYSTEMS), "model_dir": str, "prompts": [[ids]] (one at a
time), "concurrent_prompts": [[ids]] (decoded together),
"max_tokens": int, "threads": int, "concurrency": int, "slow_ms": float, "expert_budget": str|None,
plus "gguf" (llama.cpp) or "max_memory_bytes"/"offload_dir" (accelerate)}.
Prints one line ``E2E_RESULT {json}``: {"requests": [Request...], "concurrent": {...} | None,
"peak_rss_bytes", "error", "notes", "versions"}. Each request is measured apart in its prompt pass
(TTFT, prompt disk bytes) and its decode (gaps between tokens, decode disk bytes, cache counters).
A failure is reported in "error" (the process still exits 0 so the parent can tell it from a crash).
"""
from __future__ import annotations

from moeserve import runtime_env

runtime_env.apply()     # moeserve's thread settings (as `moeserve serve` runs), before numpy and torch load

import json
import sys
import time
import traceback
from typing import Any, Callable, Optional

from bench.e2e_plan import SYSTEMS
from bench.e2e_sys import peak_rss_bytes, read_bytes_of

MARK = "E2E_RESULT "
CACHE_KEYS = ("hits", "misses", "prefetch_issued", "prefetch_used", "bytes_disk", "stall_seconds")


class Probe:
    """Disk bytes (/proc/self/io) and cache counters at the moments a request changes phase."""

    def __init__(self, cache: Optional[Callable[[], dict[str, float]]] = None) -> None:
        self.cache = cache

    def __call__(self) -> dict[str, float]:
        out = {"disk": float(read_bytes_of())}
        if self.cache is not None:
            c = self.cache()
            out.update({k: float(c.get(k, 0.0)) for k in CACHE_KEYS})
        return out


def request_record(index: int, prompt_tokens: int, start: float, stamps: list[float],
                   p0: dict[str, float], p1: dict[str, float], p2: dict[str, float]) -> dict[str, Any]:
    """One request: probes p0 at submission, p1 at its first token, p2 after its last token."""
    rec: dict[str, Any] = {"prompt": index, "prompt_tokens": prompt_tokens,
                           "ttft_ms": (stamps[0] - start) * 1000,
                           "decode_ms": [(b - a) * 1000 for a, b in zip(stamps, stamps[1:])],
                           "prefill_disk_bytes": p1["disk"] - p0["disk"],
                           "decode_disk_bytes": p2["disk"] - p1["disk"]}
    for k in CACHE_KEYS:
        if k in p1:
            rec[f"decode_{k}"] = p2[k] - p1[k]
    return rec


def measure_sequential(prompts: list[list[int]], slow_ms: float, probe: Probe,
                       one: Callable[[list[int], Callable[[], None]], list[float]]) -> list[dict[str, Any]]:
    """Each prompt alone; ``one(ids, on_first)`` returns the token time stamps and calls on_first
    right after the first token. Past the first prompt, a system slower than slow_ms per decoded
    token stops (the report then compares every system on the prompts all of them ran)."""
    out: list[dict[str, Any]] = []
    for i, ids in enumerate(prompts):
        probes: list[dict[str, float]] = [probe()]
        start = time.perf_counter()
        stamps = one(ids, lambda: probes.append(probe()))
        probes.append(probe())
        if len(probes) != 3:
            raise RuntimeError(f"prompt {i}: the first-token probe ran {len(probes) - 2} times")
        rec = request_record(i, len(ids), start, stamps, *probes)
        out.append(rec)
        gaps = sorted(rec["decode_ms"])
        if slow_ms > 0 and gaps and gaps[len(gaps) // 2] > slow_ms:
            break
    return out


def run_moeserve(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from configs import CacheConfig, EngineConfig
    from engine.protocol import GenerateRequest, SamplingParams
    from moeserve.wiring import build_engine

    torch.set_num_threads(spec["threads"])
    system = SYSTEMS[spec["system"]]
    ccfg = CacheConfig() if system.policy is None else CacheConfig(
        expert_budget=spec["expert_budget"], policy=system.policy, prefetch=system.prefetch)
    ecfg = EngineConfig(model=spec["model_dir"], max_batch=spec["concurrency"], dtype=system.dtype,
                        threads=spec["threads"], prefix_cache=False)
    eng = build_engine(ecfg, ccfg, progress=False)
    try:
        offloaded = "hits" in eng.stats().cache
        if system.policy is not None and not offloaded:
            raise RuntimeError(f"moeserve.wiring.build_engine ignored {ccfg}: every expert is resident")
        probe = Probe((lambda: eng.stats().cache) if offloaded else None)
        params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True)
        counter = [0]

        def one(ids: list[int], on_first: Callable[[], None]) -> list[float]:
            counter[0] += 1
            eng.add_request(GenerateRequest(f"c1-{counter[0]}", tuple(ids), params))
            stamps: list[float] = []
            while eng.has_work():
                for d in eng.step():
                    if d.error:
                        raise RuntimeError(f"request {d.request_id} failed: {d.error}")
                    if d.token_ids and not stamps:
                        stamps.append(time.perf_counter())
                        on_first()
                        stamps += [stamps[0]] * (len(d.token_ids) - 1)
                    else:
                        stamps += [time.perf_counter()] * len(d.token_ids)
            return stamps

        requests = measure_sequential(spec["prompts"], spec["slow_ms"], probe, one)
        concurrent = None
        if fast_enough(requests, spec):
            reqs = [GenerateRequest(f"cc-{i}", tuple(ids), params)
                    for i, ids in enumerate(spec["concurrent_prompts"])]
            d0, start, tokens = probe()["disk"], time.perf_counter(), 0
            for r in reqs:                                   # max_batch=concurrency: decoded together
                eng.add_request(r)
            while eng.has_work():
                for d in eng.step():
                    if d.error:
                        raise RuntimeError(f"request {d.request_id} failed: {d.error}")
                    tokens += len(d.token_ids)
            concurrent = {"requests": len(reqs), "tokens": tokens, "seconds": time.perf_counter() - start,
                          "mode": "batched", "disk_bytes": probe()["disk"] - d0}
        stats = eng.stats().cache
        notes = (f"{stats.get('slots', 0):.0f} expert slots of {stats.get('slot_bytes', 0) / 1e6:.2f} MB, "
                 f"budget {spec['expert_budget']}" if offloaded else "every expert resident")
        return {"requests": requests, "concurrent": concurrent, "notes": notes}
    finally:
        eng.close()


def fast_enough(requests: list[dict[str, Any]], spec: dict[str, Any]) -> bool:
    """The concurrent phase runs unless the sequential phase stopped early for slowness."""
    return len(requests) == len(spec["prompts"])


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in ("torch", "transformers", "accelerate", "llama_cpp_python", "moeserve"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def run(spec: dict[str, Any]) -> dict[str, Any]:
    kind = SYSTEMS[spec["system"]].kind
    if kind == "moeserve":
        return run_moeserve(spec)
    from bench.e2e_baselines import run_accelerate, run_llama_cpp
    return run_accelerate(spec) if kind == "accelerate" else run_llama_cpp(spec)


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
    out["versions"] = versions()
    print(MARK + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
