"""Expert read bandwidth on this machine: O_DIRECT vs buffered (pages dropped) vs page-cache reads,
with 1 and several reads in flight, and host->device copies on CUDA.

    python -m bench.cache_io [--dir DIR] [--experts 64] [--inter 1536] [--hidden 576] [--json OUT]

Writes a synthetic Mixtral-layout checkpoint (bf16, the default model's expert shape unless told
otherwise) under DIR (default: a temporary directory under bench/results, on the disk the
checkpoints live on), reads every expert through cache.disk.ExpertReader into float slot buffers
exactly as the cache does, and prints a table (GB/s counts checkpoint bytes delivered).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from bench.common import RESULTS, drop_page_cache, machine, table
from cache.disk import ExpertReader
from cache.provider import ExpertSource
from cache.safetensors_file import read_header


def write_checkpoint(directory: str, experts: int, inter: int, hidden: int,
                     dtype: torch.dtype) -> list[ExpertSource]:
    """One MoE layer of ``experts`` experts (w1/w3/w2 per expert), fsynced, pages dropped."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for e in range(experts):
        pre = f"model.layers.0.block_sparse_moe.experts.{e}"
        tensors[f"{pre}.w1.weight"] = torch.randn(inter, hidden, generator=g).to(dtype)
        tensors[f"{pre}.w3.weight"] = torch.randn(inter, hidden, generator=g).to(dtype)
        tensors[f"{pre}.w2.weight"] = torch.randn(hidden, inter, generator=g).to(dtype)
    path = os.path.join(directory, "model.safetensors")
    save_file(tensors, path)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    index = read_header(path)
    return [ExpertSource(0, e, *(index[f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight"]
                                 for w in ("w1", "w3", "w2"))) for e in range(experts)]


def measure_reads(sources: list[ExpertSource], mode: str, threads: int, slot_dtype: torch.dtype,
                  passes: int) -> dict[str, Any]:
    """Read every expert ``passes`` times with ``threads`` reads in flight."""
    reader = ExpertReader(direct=(mode == "direct"), drop_pages=(mode != "page-cache"))
    for s in sources:
        reader.plan(s)
    n = 3 * sources[0].gate.shape[0] * sources[0].gate.shape[1]
    bufs = [(reader.new_staging(), torch.empty(n, dtype=slot_dtype)) for _ in range(threads)]
    path = sources[0].gate.path
    if mode == "page-cache":
        with open(path, "rb") as f:                         # warm the cache first
            while f.read(64 << 20):
                pass
    else:
        drop_page_cache([path])

    def work(i: int) -> int:
        staging, out = bufs[i]
        return sum(reader.read_into(s, out, staging) for s in sources[i::threads])

    seconds: list[float] = []
    disk = 0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(passes):
            t0 = time.perf_counter()
            disk += sum(pool.map(work, range(threads)))
            seconds.append(time.perf_counter() - t0)
    reader.close()
    payload = sum(s.nbytes for s in sources)
    best = min(seconds)
    return {"mode": mode, "threads": threads, "experts": len(sources),
            "expert_mb": sources[0].nbytes / 1e6, "gb_per_s": payload / best / 1e9,
            "ms_per_expert": best / len(sources) * 1e3,
            "read_overhead": disk / passes / payload - 1.0, "passes": passes}


def measure_h2d(nbytes: int, repeats: int = 20) -> Optional[dict[str, Any]]:
    """Pinned host -> device copy of one expert slot, on a side stream as the cache does."""
    if not torch.cuda.is_available():
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)
    stream.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        start.record(stream)
        for _ in range(repeats):
            dst.copy_(src, non_blocking=True)
        end.record(stream)
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    return {"mode": "h2d-pinned", "threads": 1, "expert_mb": nbytes / 1e6,
            "gb_per_s": nbytes * repeats / seconds / 1e9, "ms_per_expert": seconds / repeats * 1e3}


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", help="directory for the synthetic checkpoint (default: temporary)")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--inter", type=int, default=1536)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--threads", default="1,4", help="reads in flight, comma-separated")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--slot-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="slot dtype (bfloat16: no conversion, the raw read path)")
    ap.add_argument("--json", default=os.path.join(RESULTS, "cache_io.json"))
    args = ap.parse_args(argv)

    os.makedirs(RESULTS, exist_ok=True)
    directory = args.dir or tempfile.mkdtemp(prefix="cache_io-", dir=RESULTS)
    try:
        sources = write_checkpoint(directory, args.experts, args.inter, args.hidden, torch.bfloat16)
        modes = ["buffered", "page-cache"]
        if ExpertReader().uses_direct(sources[0].gate.path):
            modes.insert(0, "direct")
        slot_dtype = getattr(torch, args.slot_dtype)
        rows = [measure_reads(sources, m, int(t), slot_dtype, args.passes)
                for m in modes for t in args.threads.split(",")]
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)
    h2d = measure_h2d(3 * args.inter * args.hidden * 2)
    if h2d is not None:
        rows.append(h2d)
    print(f"expert {args.inter}x{args.hidden} x3 bf16 -> {args.slot_dtype} slots, "
          f"{args.experts} experts; {machine()}")
    print(table(rows, ["mode", "threads", "expert_mb", "gb_per_s", "ms_per_expert", "read_overhead"]))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"machine": machine(), "expert_shape": [args.inter, args.hidden],
                   "experts": args.experts, "slot_dtype": args.slot_dtype, "results": rows}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
