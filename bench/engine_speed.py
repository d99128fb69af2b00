"""Decode speed of the engine vs transformers' generate on the same checkpoint, side by side.

    python -m bench.engine_speed [--model DIR] [--tokens 32] [--batches 1,8]

Decode tokens/s excludes the prompt pass: (tokens after the first) / (time after the first token).
For transformers the prompt pass is timed separately (max_new_tokens=1) and subtracted.
"""
from __future__ import annotations

import argparse
import gc
import os
import time

import torch

from bench.common import RESULTS, bar_plot, heldout_prompts, machine, table, write_json
from configs import CacheConfig, EngineConfig
from engine.engine import run_to_completion
from engine.protocol import GenerateRequest, SamplingParams
from moeserve.wiring import build_engine, resolve_model_dir
from server.tokenizer import TextTokenizer


def engine_tps(model_dir: str, prompts: list[list[int]], tokens: int, batch: int,
               quantize: str = "none") -> float:
    q = None if quantize == "none" else quantize
    eng = build_engine(EngineConfig(model=model_dir, max_batch=batch, quantize=q), CacheConfig(),
                       progress=False)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    run_to_completion(eng, [GenerateRequest("warm", tuple(prompts[0]), SamplingParams(max_tokens=2, temperature=0.0))])
    reqs = [GenerateRequest(str(i), tuple(p), params) for i, p in enumerate(prompts[:batch])]
    start = time.perf_counter()
    res = run_to_completion(eng, reqs)
    end = time.perf_counter() - start
    first = max(r.first_token_seconds for r in res.values())
    eng.close()
    return batch * (tokens - 1) / (end - first)


def hf_tps(model_dir: str, prompts: list[list[int]], tokens: int, batch: int, pad: int) -> float:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    width = max(len(p) for p in prompts[:batch])
    ids = torch.full((batch, width), pad, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, p in enumerate(prompts[:batch]):          # left padding, as generate expects
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1

    def timed(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=pad)
        return time.perf_counter() - start

    timed(2)
    prefill = timed(1)
    total = timed(tokens)
    del model
    gc.collect()
    return batch * (tokens - 1) / (total - prefill)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the built-in default model)")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--threads", type=int, default=1,
                    help="compute threads for both (1: OpenMP threads spin-waiting on a shared "
                         "2-core box were several times slower)")
    ap.add_argument("--quantize", default="none",
                    help="comma-separated expert formats for the engine rows (none, int8, int4); "
                         "transformers runs the unquantized checkpoint")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(EngineConfig(model=args.model))
    tok = TextTokenizer(model_dir)
    batches = [int(b) for b in args.batches.split(",")]
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) for t in heldout_prompts(max(batches))]
    pad = tok.encode("\n", add_special_tokens=False)[0]
    rows = []
    formats = [f.strip() for f in args.quantize.split(",") if f.strip()]
    for b in batches:
        h = hf_tps(model_dir, prompts, args.tokens, b, pad)
        for fmt in formats:
            e = engine_tps(model_dir, prompts, args.tokens, b, fmt)
            rows.append({"batch": b, "quantize": fmt, "engine_tok_s": e, "transformers_tok_s": h,
                         "ratio": e / h})
            print(f"batch {b}, {fmt}: engine {e:.1f} tok/s, transformers {h:.1f} tok/s, "
                  f"ratio {e / h:.2f}", flush=True)
    print(table(rows, ["batch", "quantize", "engine_tok_s", "transformers_tok_s", "ratio"]))
    path = write_json("engine_speed.json", {"machine": machine(), "model": model_dir,
                                            "tokens": args.tokens, "threads": torch.get_num_threads(),
                                            "results": rows})
    bar_plot(os.path.join(RESULTS, "engine_speed.png"),
             [f"{k} b={r['batch']}" for r in rows for k in (f"engine {r['quantize']}", "hf")],
             [v for r in rows for v in (r["engine_tok_s"], r["transformers_tok_s"])],
             "decode tokens/s", "engine vs transformers generate")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
