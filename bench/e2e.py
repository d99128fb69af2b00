"""End-to-end benchmark: an MoE larger than its memory cap, moeserve vs the tools people use instead.

    python -m bench.e2e [--quick] [--repeats 3] [--preset smollm2-moe-64x]

Scenarios (bench.e2e_plan): every system with all weights in RAM ("uncapped", the compute floors),
then each memory cap, enforced the same way for every system, moeserve included: a memory cgroup
(RSS and page cache) of a share of some format's expert bytes + the dense weights + --allowance-mib.
In each, every system runs the same prompts (first turns of MT-Bench 121-, chat template, greedy,
EOS ignored, --max-tokens each) one at a time, then --concurrency of them decoded together. A
system slower than --slow-ms per token stops after the first prompt; every ratio is then taken on
the prompts all systems ran. The whole set is repeated --repeats times in alternating order.
Writes bench/results/<name>.json (+ <name>-raw.json, every run, written as it goes), <name>.md
and <name>.png; prints the report.
"""
from __future__ import annotations

from moeserve import runtime_env

runtime_env.apply()     # moeserve's thread settings (as `moeserve serve` runs), before numpy and torch load

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

from bench.common import RESULTS, drop_page_cache, heldout_prompts, write_json
from bench.e2e_plan import DEFAULT_SCENARIOS, SYSTEMS, Scenario, ratio_pairs, run_order, scenarios
from bench.e2e_report import build, check_schema
from bench.e2e_sys import (MemoryCgroup, block_device_of, checkpoint_bytes, largest_shard,
                           parallel_read_bandwidth, sequential_read_bandwidth)
from bench.e2e_worker import MARK

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 prompts instead of 8 (never fewer repeats)")
    ap.add_argument("--preset", default="smollm2-moe-64x", help="default-model preset (built on first use)")
    ap.add_argument("--model", default=None, help="checkpoint dir instead of the preset")
    ap.add_argument("--scenario", action="append", default=None, metavar="NAME=SYS,SYS",
                    help=("a capped scenario <bf16|int8|int4>-<pct>% and its systems (repeatable); default: "
                          + "; ".join(f"{k}={','.join(v)}" for k, v in DEFAULT_SCENARIOS.items())
                          + f". Systems: {', '.join(SYSTEMS)}").replace("%", "%%"))   # argparse formats %
    ap.add_argument("--prompts", type=int, default=None, help="prompts per system (default 8, --quick 3)")
    ap.add_argument("--max-tokens", type=int, default=32, help="new tokens per request, every system")
    ap.add_argument("--concurrency", type=int, default=4, help="requests decoded together in phase 2")
    ap.add_argument("--repeats", type=int, default=3, help="runs of every system, in alternating order")
    ap.add_argument("--threads", type=int, default=1,
                    help="compute threads of every system (1: on a shared 2-core box, OpenMP threads "
                         "spin-waiting on each other made 2 threads ~5x slower than 1)")
    ap.add_argument("--allowance-mib", type=int, default=1024,
                    help="runtime memory (interpreter, KV cache, buffers) on top of the experts and dense weights")
    ap.add_argument("--slow-ms", type=float, default=1500.0,
                    help="a system whose first prompt decodes slower than this per token runs no more "
                         "prompts and no concurrent phase (0: never stop early)")
    ap.add_argument("--worker-timeout", type=float, default=900.0, help="seconds before a worker is killed")
    ap.add_argument("--name", default="e2e", help="result file names under bench/results/")
    ap.add_argument("--report-only", action="store_true",
                    help="measure nothing: rebuild the report from <name>-raw.json of an earlier run")
    args = ap.parse_args(argv)
    if args.repeats < 3:
        print(f"note: --repeats {args.repeats}: ratios from fewer than 3 runs are not headline numbers",
              file=sys.stderr)
    return args


def run_worker(spec: dict[str, Any], cap: Optional[int], timeout: float, log_path: str) -> dict[str, Any]:
    """Run one system's worker (inside a fresh memory cgroup when ``cap``); its raw measurements."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    cmd = [sys.executable, "-m", "bench.e2e_worker", f.name]
    extra: dict[str, Any] = {}
    try:
        with open(log_path, "a") as log:
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


def prepare_files(model_dir: str, names: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Checkpoint dir per moeserve format and GGUF per llama.cpp format (made once, then cached);
    the second dict names what could not be made and why (its rows become errors, never gaps)."""
    from convert.quantize import ensure_quantized
    files: dict[str, str] = {"none": model_dir}
    broken: dict[str, str] = {}
    for fmt in ("int8", "int4"):
        print(f"moeserve {fmt} checkpoint (converted on first use, then cached)", flush=True)
        files[fmt] = ensure_quantized(model_dir, fmt)
    for fmt in sorted({SYSTEMS[n].fmt for n in names if SYSTEMS[n].kind == "llama.cpp"}):
        try:
            from bench.e2e_gguf import ensure_gguf, ensure_llama_quantized
            print(f"llama.cpp {fmt} GGUF (llama.cpp's converter and quantizer, cached)", flush=True)
            files[f"gguf-{fmt}"] = ensure_gguf(model_dir) if fmt == "bf16" else ensure_llama_quantized(model_dir, fmt)
        except Exception as e:     # e.g. llama-cpp-python not installed: every such row says so
            broken[f"gguf-{fmt}"] = f"could not make the {fmt} GGUF: {type(e).__name__}: {e}"
    return files, broken


def spec_for(name: str, sc: Scenario, files: dict[str, str], prompts: list[list[int]],
             concurrent: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    s = SYSTEMS[name]
    spec: dict[str, Any] = dict(system=name, prompts=prompts, concurrent_prompts=concurrent,
                                max_tokens=args.max_tokens, threads=args.threads,
                                concurrency=args.concurrency, slow_ms=args.slow_ms,
                                model_dir=files["none" if s.kind != "moeserve" else s.fmt])
    if s.kind == "moeserve" and s.policy:
        spec["expert_budget"] = str(sc.expert_budget_bytes)
    if s.kind == "llama.cpp":
        spec["gguf"] = files[f"gguf-{s.fmt}"]
    if s.kind == "accelerate" and sc.memory_cap_bytes:
        spec["max_memory_bytes"] = sc.memory_cap_bytes - (args.allowance_mib << 20)
        spec["offload_dir"] = os.path.join(tempfile.gettempdir(), f"moeserve-e2e-offload-{os.getpid()}")
    return spec


def disk_bandwidth(path: str) -> float:
    return max(sequential_read_bandwidth(path), parallel_read_bandwidth(path))


def machine_info(model_dir: str, bandwidths: list[float]) -> dict[str, Any]:
    import platform

    import psutil
    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            info = f.read()
        cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), cpu)
        have = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
        flags = [x for x in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if x in have]
    dev, ra = block_device_of(largest_shard(model_dir))
    out: dict[str, Any] = {"cpu": f"{cpu} ({os.cpu_count()} CPUs; {' '.join(flags)})",
                           "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "block_device": dev,
                           "read_ahead_kb": ra, "disk_bandwidth_bytes_per_s": max(bandwidths),
                           "disk_bandwidth_samples": bandwidths, "llama_cpp_build": None}
    try:
        import llama_cpp
        out["llama_cpp_build"] = (f"CMAKE_ARGS={os.environ.get('LLAMA_CMAKE_ARGS', '(not recorded)')}; "
                                  f"{llama_cpp.llama_print_system_info().decode().strip()}")
    except ImportError:
        out["llama_cpp_build"] = "llama-cpp-python not installed (make bench-install)"
    return out


def measure(plan: list[Scenario], files: dict[str, str], broken: dict[str, str], prompts: list[list[int]],
            concurrent: list[list[int]], shard: str, args: argparse.Namespace
            ) -> tuple[dict[str, dict[str, list[dict[str, Any]]]], list[float]]:
    """Every repeat of every scenario's systems, in alternating order; saved after each run."""
    drop_page_cache([files["none"]])
    bandwidths = [disk_bandwidth(shard)]
    logs = os.path.join(RESULTS, f"{args.name}-logs")
    os.makedirs(logs, exist_ok=True)
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {sc.name: {n: [] for n in sc.systems} for sc in plan}
    for rep in range(args.repeats):
        for sc in run_order(plan, rep):
            for name in run_order(sc.systems, rep):
                t0 = time.perf_counter()
                why = _broken(name, broken)
                if why:
                    run = {"error": why}
                else:
                    fmt = SYSTEMS[name].fmt
                    drop_page_cache([p for k, p in files.items() if k in ("none", fmt, f"gguf-{fmt}")])
                    run = run_worker(spec_for(name, sc, files, prompts, concurrent, args), sc.memory_cap_bytes,
                                     args.worker_timeout, os.path.join(logs, f"{sc.name}-{name}.log"))
                run["repeat"] = rep
                raw[sc.name][name].append(run)
                write_json(f"{args.name}-raw.json", {"runs": raw, "disk_bandwidths": bandwidths})
                got = sorted(g for q in run.get("requests", []) for g in q["decode_ms"])
                print(f"[{rep + 1}/{args.repeats}] {sc.name}/{name}: {time.perf_counter() - t0:.0f}s, "
                      f"{len(run.get('requests', []))} prompts, decode median "
                      f"{got[len(got) // 2] if got else float('nan'):.1f} ms/token, error {run.get('error')}",
                      flush=True)
    bandwidths.append(disk_bandwidth(shard))
    write_json(f"{args.name}-raw.json", {"runs": raw, "disk_bandwidths": bandwidths})
    return raw, bandwidths


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from configs import EngineConfig
    from moeserve.wiring import resolve_model_dir
    from server.tokenizer import TextTokenizer

    pairs = [s.partition("=") for s in args.scenario or ()]
    chosen = {k: tuple(x.strip() for x in v.split(",") if x.strip()) for k, _, v in pairs} or DEFAULT_SCENARIOS
    bad = [n for names in chosen.values() for n in names if n not in SYSTEMS]
    if bad:
        raise SystemExit(f"unknown system(s) {bad}: choose from {', '.join(SYSTEMS)}")
    model_dir = resolve_model_dir(EngineConfig(model=args.model, default_preset=args.preset))
    tok = TextTokenizer(model_dir)
    n_prompts = args.prompts or (3 if args.quick else 8)
    texts = heldout_prompts(max(n_prompts, args.concurrency))
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) for t in texts]
    concurrent = prompts[:args.concurrency]
    prompts = prompts[:n_prompts]
    files, broken = prepare_files(model_dir, {n for v in chosen.values() for n in v})
    sizes = {fmt: checkpoint_bytes(files[fmt]) for fmt in ("none", "int8", "int4")}
    plan = scenarios(sizes, args.allowance_mib << 20, chosen)
    ratios = ratio_pairs(plan)
    shard = largest_shard(model_dir)
    for sc in plan:
        print(f"scenario {sc.name}: {sc.why}; systems {', '.join(sc.systems)}", flush=True)
    if args.report_only:
        with open(os.path.join(RESULTS, f"{args.name}-raw.json")) as f:
            saved = json.load(f)
        raw, bandwidths = saved["runs"], saved["disk_bandwidths"]
    else:
        raw, bandwidths = measure(plan, files, broken, prompts, concurrent, shard, args)
    result: dict[str, Any] = {"machine": machine_info(model_dir, bandwidths), "model": model_dir}
    result["setup"] = (f"Model {os.path.basename(model_dir)}: experts {sizes['none'][0] / 1e9:.2f} GB bf16, "
                       f"{sizes['int8'][0] / 1e9:.2f} GB int8, {sizes['int4'][0] / 1e9:.2f} GB int4; dense "
                       f"{sizes['none'][1] / 1e9:.2f} GB. {n_prompts} MT-Bench prompts (ids 121-), "
                       f"{args.max_tokens} greedy tokens each, then {args.concurrency} decoded together; "
                       f"{args.threads} thread(s); {args.repeats} repeats in alternating order; systems "
                       f"slower than {args.slow_ms:.0f} ms/token measured on the first prompt only.")
    result["versions"] = {k: v for sc in raw.values() for runs in sc.values() for r in runs
                          for k, v in (r.get("versions") or {}).items()}
    result["machine"]["versions"] = result["versions"]
    result.update(build(plan, raw, ratios, max(bandwidths)))
    check_schema(result)
    from bench.e2e_render import plot, render
    text = render(result)
    path = write_json(f"{args.name}.json", result)
    with open(os.path.join(RESULTS, f"{args.name}.md"), "w") as f:
        f.write(text)
    plot(os.path.join(RESULTS, f"{args.name}.png"), result)
    print(text)
    print(f"wrote {path}")
    return 0


def _broken(name: str, broken: dict[str, str]) -> Optional[str]:
    s = SYSTEMS[name]
    return broken.get(f"gguf-{s.fmt}") if s.kind == "llama.cpp" else None


if __name__ == "__main__":
    raise SystemExit(main())
