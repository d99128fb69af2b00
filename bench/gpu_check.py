"""`make gpu-check`: the GPU path measured on a real CUDA machine, in one run of a few minutes.

    python3 -m bench.gpu_check [--shapes default-64x,mixtral-like] [--formats none,int4] [--json OUT]

Made for the lent CUDA machines: they have torch (CUDA), transformers, safetensors, numpy, tqdm and
pytest but no network, so the models are built here from random weights (the 64-expert default
model's shape; a Mixtral-like shape with Mixtral-8x7B's hidden and expert sizes and fewer layers,
whose ~350 MB experts make the host-to-device link the bottleneck). It runs the `gpu`-marked tests,
measures host-to-device bandwidth (pageable and pinned), and decodes on each shape and expert format
with all experts in VRAM, with 25% in VRAM (the rest in host RAM) and with 25% in VRAM above a host
budget below the model (disk under host RAM), prefetch on and off, checking every run's greedy
tokens against the all-resident run, and with --cpu-experts auto (bf16/int8 experts; the CPU's
rounding is not the GPU's, so those runs report how many leading tokens agree). Every copy to the
device is timed on the GPU's clock, so each run reports the link's GB/s while copies ran. Prints
one table of runs and one of the issue's goals; the JSON is rewritten after every case, and cases
that would start past --time-limit are skipped and listed, so a lent machine's command limit
never takes the results with it.

Without CUDA it says so in one line and exits 0. ``--device cpu --shapes tiny`` runs the same code
on a CPU (a check of the script itself; the test suite does that).
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

from moeserve import runtime_env

runtime_env.apply()     # the engine's thread settings, before torch and numpy load

import torch

from bench.common import RESULTS, table, write_json

SHAPES: dict[str, dict[str, int]] = {
    # the default 64x model's layer shape with 8 of its 30 layers, so that ten engine starts and
    # an int4 conversion fit the device time (per-token figures scale with the layer count)
    "default-64x": dict(hidden=576, inter=1536, layers=8, experts=64, top_k=8, heads=9, kv_heads=3,
                        vocab=49152),
    "mixtral-like": dict(hidden=4096, inter=14336, layers=2, experts=8, top_k=2, heads=32, kv_heads=8,
                         vocab=32000),
    "tiny": dict(hidden=64, inter=96, layers=2, experts=8, top_k=2, heads=4, kv_heads=2, vocab=256),
}
# (name, expert budget, host budget, prefetch, cpu experts)
CASES = (("all in VRAM", "all", "all", "off", "off"),
         ("25% VRAM", "25%", "all", "off", "off"),
         ("25% VRAM + prefetch", "25%", "all", "on", "off"),
         ("25% VRAM + CPU experts", "25%", "all", "off", "auto"),
         ("25% VRAM, 50% host", "25%", "50%", "off", "off"),
         ("25% VRAM, 50% host + prefetch", "25%", "50%", "on", "off"),
         ("25% VRAM, 50% host + CPU experts", "25%", "50%", "off", "auto"))
CPU_EXPERT_FORMATS = ("none", "int8")
GPU_TESTS = ("tests/engine/test_kernels.py", "tests/cache/test_offload.py", "tests/cache/test_slots.py",
             "tests/cache/test_cpu_experts.py")


def write_checkpoint(path: str, s: dict[str, int], seed: int = 0) -> str:
    """A random bf16 Mixtral checkpoint of shape ``s``, one safetensors shard per layer."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    hd = s["hidden"] // s["heads"]

    def rand(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    weight_map: dict[str, str] = {}

    def shard(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    shard("dense.safetensors", {"model.embed_tokens.weight": rand(s["vocab"], s["hidden"]),
                                "lm_head.weight": rand(s["vocab"], s["hidden"]),
                                "model.norm.weight": torch.ones(s["hidden"], dtype=torch.bfloat16)})
    for i in range(s["layers"]):
        p = f"model.layers.{i}"
        t = {f"{p}.self_attn.q_proj.weight": rand(s["heads"] * hd, s["hidden"]),
             f"{p}.self_attn.k_proj.weight": rand(s["kv_heads"] * hd, s["hidden"]),
             f"{p}.self_attn.v_proj.weight": rand(s["kv_heads"] * hd, s["hidden"]),
             f"{p}.self_attn.o_proj.weight": rand(s["hidden"], s["heads"] * hd),
             f"{p}.input_layernorm.weight": torch.ones(s["hidden"], dtype=torch.bfloat16),
             f"{p}.post_attention_layernorm.weight": torch.ones(s["hidden"], dtype=torch.bfloat16),
             # a decisive router (random routing at std 0.02 would be near-uniform)
             f"{p}.block_sparse_moe.gate.weight": rand(s["experts"], s["hidden"], scale=0.5)}
        for e in range(s["experts"]):
            q = f"{p}.block_sparse_moe.experts.{e}"
            t[f"{q}.w1.weight"] = rand(s["inter"], s["hidden"])
            t[f"{q}.w3.weight"] = rand(s["inter"], s["hidden"])
            t[f"{q}.w2.weight"] = rand(s["hidden"], s["inter"])
        shard(f"layer-{i:03d}.safetensors", t)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": s["hidden"],
           "intermediate_size": s["inter"], "num_hidden_layers": s["layers"],
           "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"], "head_dim": hd,
           "num_local_experts": s["experts"], "num_experts_per_tok": s["top_k"], "vocab_size": s["vocab"],
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
           "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path


def h2d_bandwidth(device: torch.device, nbytes: int = 256 << 20, reps: int = 5) -> dict[str, float]:
    """Best-of-``reps`` host-to-device GB/s from pageable and from pinned memory."""
    out = {}
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for kind in ("pageable", "pinned"):
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=kind == "pinned")
        best = float("inf")
        for _ in range(reps):
            torch.cuda.synchronize(device)
            t = time.perf_counter()
            dst.copy_(src, non_blocking=kind == "pinned")
            torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t)
        out[f"h2d_{kind}_gb_s"] = nbytes / best / 1e9
    return out


def decode(model_dir: str, device: str, fmt: str, case: tuple[str, str, str, str, str],
           prompt: tuple[int, ...], tokens: int) -> dict[str, Any]:
    """One engine at ``case``'s budgets: greedy tokens, decode ms/token, cache counters."""
    from configs import CacheConfig, EngineConfig
    from engine.engine import run_to_completion
    from engine.protocol import GenerateRequest, SamplingParams
    from moeserve.wiring import build_engine
    name, budget, host, prefetch, cpu = case
    eng = build_engine(EngineConfig(model=model_dir, device=device, max_batch=1, prefix_cache=False,
                                    quantize=None if fmt == "none" else fmt),
                       CacheConfig(expert_budget=budget, host_budget=host, prefetch=prefetch,
                                   cpu_experts=cpu),
                       progress=False)
    try:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        run_to_completion(eng, [GenerateRequest("warm", prompt, SamplingParams(max_tokens=2, temperature=0.0))])
        t = time.perf_counter()
        res = run_to_completion(eng, [GenerateRequest("m", prompt, params)])["m"]
        total = time.perf_counter() - t
        cache = eng.stats().cache
    finally:
        eng.close()
        del eng
        gc.collect()        # the provider and its I/O threads' work form a cycle: free its pinned
                            # chunks and device slots before the next case allocates its own
    ms = (total - res.first_token_seconds) / max(1, tokens - 1) * 1e3
    return {"case": name, "format": fmt, "expert_budget": budget, "host_budget": host,
            "prefetch": prefetch, "cpu_experts": cpu, "decode_ms_per_token": ms,
            "tokens": res.token_ids, "cache": dict(cache)}


def run_gpu_tests(timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", *GPU_TESTS]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd.append("--timeout=60")          # one hung test costs a minute, not the whole budget
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, timeout))
        tail = (p.stdout + p.stderr).strip().splitlines()[-1:]
        return {"returncode": p.returncode, "summary": tail[0] if tail else ""}
    except subprocess.TimeoutExpired:
        return {"returncode": None, "summary": f"timed out after {timeout:.0f} s"}


def h2d_rate(cache: dict[str, float]) -> Optional[float]:
    """GB/s of the host-to-device copies while at least one ran (GPU clock), or None."""
    busy = cache.get("h2d_busy_seconds", 0.0)
    return cache["bytes_h2d"] / busy / 1e9 if busy > 0 else None


def goals(runs: list[dict[str, Any]], pinned: Optional[float]) -> list[dict[str, Any]]:
    """The issue's goals, from the runs that finished: 25% in VRAM within 1.5x of all in VRAM on
    the default shape; host-to-device copies at >= 80% of the pinned bandwidth while the cache
    loads (per shape and format, all offloaded runs' bytes over their copy time); exact tokens."""
    out: list[dict[str, Any]] = []
    done = [r for r in runs if "decode_ms_per_token" in r]
    for shape, fmt in dict.fromkeys((r["shape"], r["format"]) for r in done):
        block = [r for r in done if (r["shape"], r["format"]) == (shape, fmt)]
        ms = {r["case"]: r["decode_ms_per_token"] for r in block}
        base = ms.get("all in VRAM")
        for case in ("25% VRAM + prefetch", "25% VRAM") if shape == "default-64x" else ():
            if base and case in ms:
                x = ms[case] / base
                out.append({"goal": f"{shape} {fmt}: {case} / all in VRAM <= 1.5x",
                            "value": f"{x:.2f}x", "met": x <= 1.5})
        offl = [r["cache"] for r in block if r["cache"].get("h2d_busy_seconds", 0) > 0]
        if offl and pinned:
            rate = sum(c["bytes_h2d"] for c in offl) / sum(c["h2d_busy_seconds"] for c in offl) / 1e9
            out.append({"goal": f"{shape} {fmt}: H2D while loading >= 80% of pinned {pinned:.1f} GB/s",
                        "value": f"{rate:.1f} GB/s ({rate / pinned:.0%})", "met": rate >= 0.8 * pinned})
    plain = [r for r in runs if r["cpu_experts"] == "off"]
    ran = [r for r in plain if not r.get("error", "").startswith("skipped")]
    n_ok = sum(bool(r.get("exact")) for r in ran)       # a run that failed is not exact
    out.append({"goal": "exact tokens in every run without CPU experts",
                "value": f"{n_ok} of {len(ran)} ({len(plain) - len(ran)} skipped)",
                "met": bool(ran) and n_ok == len(ran)})
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="default-64x,mixtral-like",
                    help=f"model shapes to build and run, in this order ({', '.join(SHAPES)})")
    ap.add_argument("--formats", default="none,int4", help="expert formats (none = bf16, int8, int4)")
    ap.add_argument("--tokens", type=int, default=16, help="greedy tokens per run")
    ap.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a dry run of the script)")
    ap.add_argument("--workdir", default=None, help="where models are built (default: a temp dir)")
    ap.add_argument("--skip-tests", action="store_true", help="do not run the gpu-marked tests")
    ap.add_argument("--time-limit", type=float, default=450.0,
                    help="seconds: a case that would start past this (by the last case's duration) is "
                         "skipped and listed as such, so the run ends with its results inside a lent "
                         "machine's 10-minute command limit; the JSON is rewritten after every case")
    ap.add_argument("--json", default=os.path.join(RESULTS, "gpu_check.json"), help="output JSON path")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device here (torch {torch.__version__}); nothing to check")
        return 0
    shapes = [s for s in args.shapes.split(",") if s]
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        ap.error(f"unknown shape(s) {bad}; choose from {', '.join(SHAPES)}")
    t_start = time.perf_counter()

    def left() -> float:
        return args.time_limit - (time.perf_counter() - t_start)

    json_path = os.path.abspath(args.json)
    work = args.workdir or tempfile.mkdtemp(prefix="moeserve-gpu-check-")
    os.environ.setdefault("MOESERVE_HOME", os.path.join(work, "home"))    # conversions land here
    out: dict[str, Any] = {"device": args.device, "torch": torch.__version__, "runs": [],
                           "numba": _numba_version(), "time_limit_s": args.time_limit}
    if out["numba"] is None:
        print("gpu-check: numba is missing: the auto policy runs interpreted and its per-token "
              "figures are not the product's (run `make gpu-wheels` on a machine with the registries)")
    if args.device == "cuda":
        dev = torch.device("cuda")
        out["gpu"] = torch.cuda.get_device_name(dev)
        out.update(h2d_bandwidth(dev))
        print(f"{out['gpu']}: H2D pageable {out['h2d_pageable_gb_s']:.1f} GB/s, "
              f"pinned {out['h2d_pinned_gb_s']:.1f} GB/s", flush=True)
    write_json(json_path, out)
    formats = [f for f in args.formats.split(",") if f]
    prompt = tuple(range(3, 40))
    tests_due = args.device == "cuda" and not args.skip_tests
    last = 0.0              # the last case took this long: is there time for the next one?
    for shape in shapes:
        if left() <= 0:
            out["runs"] += [_skipped(shape, f, c) for f in formats for c in _cases(f)]
            continue
        t = time.perf_counter()
        model_dir = write_checkpoint(os.path.join(work, shape), SHAPES[shape])
        print(f"{shape}: checkpoint built in {time.perf_counter() - t:.0f} s", flush=True)
        for fmt in formats:
            want: Optional[list[int]] = None
            for case in _cases(fmt):
                if last >= left():
                    r = _skipped(shape, fmt, case)
                else:
                    t = time.perf_counter()
                    r = _run_case(model_dir, args.device, fmt, case, prompt, args.tokens)
                    last = time.perf_counter() - t
                r["shape"] = shape
                if "tokens" in r:
                    want = r["tokens"] if want is None else want
                    r["exact"] = r["tokens"] == want
                    # the CPU's rounding differs from the GPU's: how far the tokens agree
                    r["same_prefix"] = next((i for i, (a, b) in enumerate(zip(r["tokens"], want))
                                             if a != b), len(want))
                    r["h2d_gb_s"] = h2d_rate(r["cache"])
                out["runs"].append(r)
                write_json(json_path, out)
                print(json.dumps({k: v for k, v in r.items() if k not in ("tokens", "cache")}), flush=True)
            if tests_due:       # after the first block, whose figures matter most
                tests_due = False
                out["gpu_tests"] = _tests(left())
                write_json(json_path, out)
    if tests_due:
        out["gpu_tests"] = _tests(left())
    pinned = out.get("h2d_pinned_gb_s")
    rows = [{"shape": r["shape"], "format": r["format"], "case": r["case"],
             "ms/token": r.get("decode_ms_per_token"), "exact": r.get("exact"),
             "same tokens": r.get("same_prefix"),
             "H2D GB/s": r.get("h2d_gb_s"),
             "% pinned": None if not (pinned and r.get("h2d_gb_s")) else f"{r['h2d_gb_s'] / pinned:.0%}",
             "cpu computed": r.get("cache", {}).get("cpu_computed"),
             "error": r.get("error", "")} for r in out["runs"]]
    print(table(rows, ["shape", "format", "case", "ms/token", "exact", "same tokens", "H2D GB/s",
                       "% pinned", "cpu computed", "error"]))
    out["goals"] = goals(out["runs"], pinned)
    print(table(out["goals"], ["goal", "value", "met"]))
    print("wrote", write_json(json_path, out))
    # bit-exact everywhere but with CPU experts, which must still run (no error); nothing skipped
    return 0 if all(r.get("exact", False) or (r.get("cpu_experts") == "auto" and "tokens" in r)
                    for r in out["runs"]) else 1


def _cases(fmt: str) -> list[tuple[str, str, str, str, str]]:
    """The cases run for expert format ``fmt``: int4 experts in the CUDA pack layout have no CPU
    kernel, so --cpu-experts auto is left out for them."""
    return [c for c in CASES if c[4] == "off" or fmt in CPU_EXPERT_FORMATS]


def _tests(seconds: float) -> dict[str, Any]:
    """The gpu-marked tests, in at most 240 s and what the time limit leaves."""
    if seconds < 30:
        res: dict[str, Any] = {"returncode": None, "summary": "skipped: --time-limit reached"}
    else:
        res = run_gpu_tests(timeout=min(240.0, seconds))
    print("gpu tests:", res["summary"], flush=True)
    return res


def _run_case(model_dir: str, device: str, fmt: str, case: tuple[str, str, str, str, str],
              prompt: tuple[int, ...], tokens: int) -> dict[str, Any]:
    try:
        return decode(model_dir, device, fmt, case, prompt, tokens)
    except Exception as e:                        # report it, go on with the others
        return {"case": case[0], "format": fmt, "cpu_experts": case[4],
                "error": f"{type(e).__name__}: {e}"}


def _skipped(shape: str, fmt: str, case: tuple[str, str, str, str, str]) -> dict[str, Any]:
    return {"shape": shape, "case": case[0], "format": fmt, "cpu_experts": case[4],
            "error": "skipped: --time-limit reached"}


def _numba_version() -> Optional[str]:
    """numba's version, or None without it (the auto policy's loops then run interpreted)."""
    try:
        import numba
    except ImportError:
        return None
    return str(numba.__version__)


if __name__ == "__main__":
    sys.exit(main())
