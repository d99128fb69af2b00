"""End-to-end benchmark (issue 6): an MoE larger than its expert budget, moeserve vs the usual tools.

    python -m bench.e2e [--quick] [--preset smollm2-moe-64x] [--systems resident,lru,...]

Prompts: first turns of MT-Bench ids 121-160 (chat template, greedy, EOS ignored, --max-tokens each),
one request at a time, then --concurrency at a time. Every system runs in its own worker process
(bench.e2e_worker) after the model files are dropped from the page cache; llama.cpp and accelerate
run inside a memory cgroup capped at moeserve's expert budget + the dense weights + --allowance-mib.
Writes bench/results/e2e.json, e2e.md (the table) and e2e.png; prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

from bench.common import RESULTS, bar_plot, drop_page_cache, heldout_prompts, machine, write_json
from bench.e2e_report import (MOESERVE_QUANT, SYSTEMS, cgroup_limit_bytes, check_schema, error_entry,
                              parse_fraction, physical_bounds, render, summarize, system_format, targets)
from bench.e2e_sys import (MemoryCgroup, checkpoint_bytes, largest_shard, sequential_read_bandwidth)
from bench.e2e_worker import MARK

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 prompts instead of 40")
    ap.add_argument("--preset", default="smollm2-moe-64x", help="default-model preset (built on first use)")
    ap.add_argument("--model", default=None, help="checkpoint dir instead of the preset")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ",".join(SYSTEMS)
                    + " (the -int8/-int4 moeserve rows get --budget of their own format's experts; "
                    "llama.cpp-q4_k_m/-q8_0 are capped like a quarter of moeserve's int4/int8 experts)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts (default 40, --quick 8)")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--concurrency", type=int, default=4, help="requests decoded together in phase 2")
    ap.add_argument("--budget", default="25%", help="moeserve expert budget, a share of all experts")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"),
                    help="compute dtype of every moeserve system and of accelerate (llama.cpp: BF16 GGUF)")
    ap.add_argument("--threads", type=int, default=1,
                    help="compute threads of every system (1: on a shared 2-core box, OpenMP threads "
                         "spin-waiting on each other made 2 threads ~5x slower than 1)")
    ap.add_argument("--allowance-mib", type=int, default=1024,
                    help="runtime memory (interpreter, KV cache, buffers) the capped baselines get on "
                         "top of the expert budget and the dense weights")
    ap.add_argument("--uncapped", default="", help="comma-separated baselines to run without the cgroup")
    ap.add_argument("--seconds-per-phase", type=float, default=240.0,
                    help="a system starts no new request in a phase after this long (at least one "
                         "request, or one group of --concurrency, is always measured; the table "
                         "says how many were)")
    ap.add_argument("--slow-tokens", type=int, default=8,
                    help="new tokens per request for accelerate, which needs seconds per token")
    ap.add_argument("--llama-tokens", type=int, default=16,
                    help="new tokens per request for llama.cpp (capped, it reads experts via page faults)")
    ap.add_argument("--worker-timeout", type=float, default=900.0, help="seconds before a worker is killed")
    ap.add_argument("--name", default="e2e", help="result file names under bench/results/")
    return ap.parse_args(argv)


def run_worker(spec: dict[str, Any], cap: Optional[int], timeout: float, log_path: str) -> dict[str, Any]:
    """Run one system's worker (inside a fresh memory cgroup when ``cap``); its raw measurements."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    cmd = [sys.executable, "-m", "bench.e2e_worker", f.name]
    extra: dict[str, Any] = {}
    try:
        with open(log_path, "w") as log:
            if cap is None:
                raw = _wait(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True,
                                             start_new_session=True), timeout)
            else:
                with MemoryCgroup(spec["system"].replace(".", "_"), cap) as cg:
                    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True,
                                            start_new_session=True, preexec_fn=cg.enter)
                    raw = _wait(proc, timeout)
                    extra = {"cgroup_limit_bytes": cap, "cgroup_peak_bytes": cg.peak_bytes()}
                    if raw.get("error") and cg.oom_kills():
                        raw["error"] += f" (the kernel OOM-killed it at the cgroup cap of {cap} bytes)"
    except (OSError, RuntimeError) as e:
        raw = {"error": f"could not run the worker: {type(e).__name__}: {e}"}
    finally:
        os.remove(f.name)
    raw.update(extra)
    return raw


def _wait(proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)     # the worker's own session: nothing may keep running
        proc.communicate()
        return {"error": f"worker exceeded {timeout:.0f}s and was killed"}
    for line in out.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    sig = -proc.returncode if proc.returncode < 0 else None
    why = f"signal {signal.Signals(sig).name}" if sig else f"exit code {proc.returncode}"
    return {"error": f"worker died ({why}) without a result"}


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from configs import EngineConfig
    from moeserve.wiring import resolve_model_dir
    from server.tokenizer import TextTokenizer

    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in names if s not in SYSTEMS]
    if bad:
        raise SystemExit(f"unknown system(s) {bad}: choose from {', '.join(SYSTEMS)}")
    model_dir = resolve_model_dir(EngineConfig(model=args.model, default_preset=args.preset))
    n_prompts = args.prompts or (8 if args.quick else 40)
    tok = TextTokenizer(model_dir)
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) for t in heldout_prompts(n_prompts)]
    expert_bytes, dense_bytes = checkpoint_bytes(model_dir)
    cap = cgroup_limit_bytes(expert_bytes, parse_fraction(args.budget), dense_bytes, args.allowance_mib << 20)
    drop_page_cache([model_dir])
    bandwidth = sequential_read_bandwidth(largest_shard(model_dir))
    print(f"model {model_dir}: experts {expert_bytes / 1e9:.2f} GB, dense {dense_bytes / 1e9:.2f} GB; "
          f"budget {args.budget}; cap for baselines {cap / 1e9:.2f} GB; disk {bandwidth / 1e9:.2f} GB/s",
          flush=True)
    logs = os.path.join(RESULTS, f"{args.name}-logs")
    os.makedirs(logs, exist_ok=True)
    uncapped = {s.strip() for s in args.uncapped.split(",") if s.strip()}
    systems: dict[str, dict[str, Any]] = {}
    for name in names:
        spec: dict[str, Any] = dict(system=name, model_dir=model_dir, prompts_c1=prompts,
                                    prompts_c4=prompts, max_tokens=args.max_tokens, threads=args.threads,
                                    dtype=args.dtype, budget=args.budget,
                                    seconds_per_phase=args.seconds_per_phase,
                                    concurrency=args.concurrency)
        files = [model_dir]
        fmt = system_format(name)
        sys_cap = cap
        if name in MOESERVE_QUANT:
            from convert.quantize import ensure_quantized
            print(f"{name}: {fmt} checkpoint (converted on first use, then cached)", flush=True)
            spec["model_dir"] = ensure_quantized(model_dir, fmt)
            files = [spec["model_dir"]]
        if name == "accelerate":
            spec.update(max_tokens=args.slow_tokens, max_memory_bytes=int(expert_bytes * parse_fraction(
                args.budget)) + dense_bytes, offload_dir=os.path.join(tempfile.gettempdir(),
                                                                      f"moeserve-e2e-offload-{os.getpid()}"))
        if name.startswith("llama.cpp"):
            try:
                from bench.e2e_gguf import ensure_gguf, ensure_llama_quantized
                print(f"{name}: GGUF of the checkpoint (converted on first use, then cached)", flush=True)
                spec["gguf"] = ensure_gguf(model_dir) if fmt == "none" else \
                    ensure_llama_quantized(model_dir, fmt)
                if fmt != "none":       # capped like --budget of moeserve's int4/int8 experts
                    from convert.quantize import ensure_quantized
                    peer = {"q4_k_m": "int4", "q8_0": "int8"}[fmt]
                    q_experts, q_dense = checkpoint_bytes(ensure_quantized(model_dir, peer))
                    sys_cap = cgroup_limit_bytes(q_experts, parse_fraction(args.budget), q_dense,
                                                 args.allowance_mib << 20)
                spec["max_tokens"] = args.llama_tokens
                files.append(spec["gguf"])
            except Exception as e:
                systems[name] = error_entry(f"GGUF conversion failed: {type(e).__name__}: {e}")
                print(f"{name}: {systems[name]['error']}", flush=True)
                continue
        drop_page_cache(files)
        capped = name in ("accelerate", "llama.cpp", "llama.cpp-q8_0", "llama.cpp-q4_k_m")
        sys_cap = sys_cap if capped and name not in uncapped else None
        t0 = time.perf_counter()
        raw = run_worker(spec, sys_cap, args.worker_timeout, os.path.join(logs, f"{name}.log"))
        systems[name] = summarize(raw) if raw.get("decode_ms") else error_entry(raw["error"], {
            k: raw[k] for k in ("peak_rss_bytes", "cgroup_limit_bytes") if raw.get(k)})
        s = systems[name]
        print(f"{name}: {time.perf_counter() - t0:.0f}s, median {s['per_token_ms_median']} ms/token, "
              f"error {s['error']}", flush=True)
    result: dict[str, Any] = {
        "machine": machine(), "systems": systems, "model": model_dir,
        "setup": (f"Model {os.path.basename(model_dir)} ({expert_bytes / 1e9:.2f} GB experts + "
                  f"{dense_bytes / 1e9:.2f} GB dense, bf16 on disk); moeserve expert budget {args.budget}; "
                  f"compute dtype {args.dtype}; {args.threads} threads; {n_prompts} MT-Bench prompts "
                  f"(ids 121-), {args.max_tokens} greedy tokens each (accelerate: {args.slow_tokens}, "
                  f"llama.cpp: {args.llama_tokens}), "
                  f"then {args.concurrency} at a time; llama.cpp/accelerate capped by a memory cgroup "
                  f"at {cap / 1e9:.2f} GB (budget + dense + {args.allowance_mib} MiB)."),
    }
    result["bounds"] = physical_bounds(systems, bandwidth)
    result["targets"] = targets(systems)
    check_schema(result, names)
    text = render(result)
    path = write_json(f"{args.name}.json", result)
    with open(os.path.join(RESULTS, f"{args.name}.md"), "w") as f:
        f.write(text)
    ok = [n for n in names if systems[n].get("per_token_ms_median") is not None]
    if ok:
        bar_plot(os.path.join(RESULTS, f"{args.name}.png"), ok,
                 [systems[n]["per_token_ms_median"] for n in ok], "ms per token (median, 1 request)",
                 f"{os.path.basename(model_dir)}, expert budget {args.budget}")
    print(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
