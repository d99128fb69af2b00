"""Serving benchmark: concurrent streaming clients against a real `moeserve serve` process.

    python -m bench.serve [--model DIR] [--concurrency 1,4,16] [--prompts 40] [--max-tokens 64]

Prompts: first turns of MT-Bench ids 121-160, sent as chat messages, greedy, ignore_eos (every
request produces exactly --max-tokens tokens, so runs are comparable). Per concurrency level:
time to first token (request sent -> first content chunk) p50/p99, inter-token latency (gap between
content chunks) p50/p99, and total output tokens/s over the level's wall time.
HTTP overhead: at concurrency 1, tokens/s through the server over tokens/s of the engine called
directly in this process on the same prompts (same run, engine closed before the server starts).
Writes bench/results/serve.json and serve.png.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any, Optional

import httpx

from bench.common import RESULTS, heldout_prompts, machine, percentile, start_server, table, write_json



def engine_direct(model_dir: str, prompts: list[list[int]], max_tokens: int,
                  threads: Optional[int]) -> tuple[dict[str, float], list[int]]:
    """Tokens/s of the engine called directly, one request at a time (the concurrency-1 baseline),
    and the indices of the prompts that fit the model's context with ``max_tokens`` of reply."""
    from configs import CacheConfig, EngineConfig
    from engine.engine import run_to_completion
    from engine.protocol import GenerateRequest, SamplingParams
    from moeserve.wiring import build_engine

    eng = build_engine(EngineConfig(model=model_dir, threads=threads, prefix_cache=False), CacheConfig(),
                       progress=False)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ctx = eng.model_info.context_length
    keep = [i for i, p in enumerate(prompts) if len(p) + max_tokens <= ctx]
    prompts = [prompts[i] for i in keep]
    try:
        run_to_completion(eng, [GenerateRequest("warm", tuple(prompts[0]),
                                                SamplingParams(max_tokens=2, temperature=0.0))])
        tokens, start = 0, time.perf_counter()
        for i, p in enumerate(prompts):
            res = run_to_completion(eng, [GenerateRequest(f"d{i}", tuple(p), params)])
            tokens += len(res[f"d{i}"].token_ids)
        seconds = time.perf_counter() - start
    finally:
        eng.close()
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}, keep


async def _one(client: httpx.AsyncClient, base: str, text: str, max_tokens: int) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    stamps: list[float] = []
    usage: dict[str, int] = {}
    async with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - sent if stamps else float("nan"),
            "itl": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": usage.get("completion_tokens", 0)}


async def _level(base: str, texts: list[str], concurrency: int, max_tokens: int) -> dict[str, Any]:
    todo = list(texts)
    results: list[dict[str, Any]] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while todo:
            results.append(await _one(client, base, todo.pop(0), max_tokens))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "output_tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": percentile(ttft, 50) * 1e3, "ttft_p99_ms": percentile(ttft, 99) * 1e3,
            "itl_p50_ms": percentile(itl, 50) * 1e3, "itl_p99_ms": percentile(itl, 99) * 1e3}


def _start_server(model_dir: str, port: int, max_batch: int, threads: Optional[int]) -> Any:
    args = ["--model", model_dir, "--max-batch", str(max_batch), "--max-queue", "1024",
            "--log-level", "warning", "--no-prefix-cache"]
    if threads:
        args += ["--threads", str(threads)]
    return start_server(args, port)


def _plot(path: str, levels: list[dict[str, Any]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    xs = [str(r["concurrency"]) for r in levels]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    axes[0].bar(xs, [r["tokens_per_s"] for r in levels], color="tab:blue")
    axes[0].set_title("output tokens/s (total)")
    for key, ax, title in (("ttft", axes[1], "time to first token (ms)"),
                           ("itl", axes[2], "inter-token latency (ms)")):
        ax.plot(xs, [r[f"{key}_p50_ms"] for r in levels], "o-", label="p50")
        ax.plot(xs, [r[f"{key}_p99_ms"] for r in levels], "s--", label="p99")
        ax.set_title(title)
        ax.legend()
    for ax in axes:
        ax.set_xlabel("concurrent clients")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint directory (default: the built-in default model)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--prompts", type=int, default=40, help="MT-Bench first turns used (<= 40)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    ap.add_argument("--threads", type=int, default=None, help="compute threads (both engines)")
    ap.add_argument("--port", type=int, default=8931)
    ap.add_argument("--out", default="serve.json")
    args = ap.parse_args(argv)
    if args.model:
        model_dir = args.model
    else:
        from configs import EngineConfig
        from moeserve.wiring import resolve_model_dir
        model_dir = resolve_model_dir(EngineConfig())
    from server.tokenizer import TextTokenizer
    tok = TextTokenizer(model_dir)
    texts = heldout_prompts(args.prompts)
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) for t in texts]

    direct, keep = engine_direct(model_dir, prompts, args.max_tokens, args.threads)
    if len(keep) < len(texts):
        print(f"{len(texts) - len(keep)} prompts do not fit the context with {args.max_tokens} "
              "reply tokens; they are left out", flush=True)
    texts = [texts[i] for i in keep]
    print(f"engine direct, one request at a time: {direct['tokens_per_s']:.1f} tokens/s", flush=True)
    proc = _start_server(model_dir, args.port, args.max_batch, args.threads)
    try:
        base = f"http://127.0.0.1:{args.port}"
        asyncio.run(_level(base, texts[:1], 1, 2))   # warm-up
        levels = []
        for c in (int(x) for x in args.concurrency.split(",")):
            levels.append(asyncio.run(_level(base, texts, c, args.max_tokens)))
            print(f"concurrency {c}: {levels[-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    one = next((r for r in levels if r["concurrency"] == 1), None)
    ratio = one["tokens_per_s"] / direct["tokens_per_s"] if one else None
    cols = ["concurrency", "requests", "output_tokens", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms",
            "itl_p50_ms", "itl_p99_ms"]
    print(table(levels, cols))
    if ratio is not None:
        print(f"HTTP overhead at concurrency 1: server/engine tokens/s = {ratio:.3f} (goal >= 0.95)")
    path = write_json(args.out, {
        "machine": machine(), "model": model_dir, "max_tokens": args.max_tokens,
        "prompts": len(texts), "server_max_batch": args.max_batch, "engine_direct": direct,
        "levels": levels, "http_overhead_ratio": ratio})
    png = os.path.join(RESULTS, os.path.splitext(args.out)[0] + ".png")
    _plot(png, levels)
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
