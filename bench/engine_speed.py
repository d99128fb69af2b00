"""Engine compute with every expert resident: moeserve vs transformers' generate vs llama.cpp, side by side.

    python -m bench.engine_speed [--model DIR] [--formats none,int4,int4+dense] [--batches 1,4,8] [--repeats 3]

Decode tokens/s excludes the prompt pass: (tokens after the first) / (time after the first token of
the last request). Prompt tokens/s: one request's prompt tokens / its time to first token. Same
prompts, same greedy token count; each repeat measures the systems in alternating order, and the
table gives the median with min-max. llama.cpp runs the GGUF of the same precision (bf16 -> BF16,
int8 -> Q8_0, int4 -> Q4_K_M, made by llama.cpp's own tools); batch > 1 through its multi-sequence
batch API. transformers runs the unquantized checkpoint at --dtype in every row.
"""
from __future__ import annotations

from moeserve import runtime_env

runtime_env.apply()     # moeserve's thread settings (as `moeserve serve` runs), before numpy and torch load

import argparse
import os
import time
from typing import Any, Callable, Optional

import torch

from bench.common import RESULTS, dense_variant, heldout_prompts, machine, median, table, write_json
from bench.e2e_plan import run_order
from configs import CacheConfig, EngineConfig
from engine.engine import run_to_completion
from engine.protocol import GenerateRequest, SamplingParams
from moeserve.wiring import build_engine, resolve_model_dir
from server.tokenizer import TextTokenizer

GGUF_OF = {"none": "bf16", "int8": "q8_0", "int4": "q4_k_m"}
Measure = Callable[[list[list[int]], int], tuple[float, float]]     # (decode tok/s, prompt tok/s)


def moeserve_system(model_dir: str, fmt: str, dtype: str, max_batch: int, context: Optional[int]) -> Measure:
    """fmt: an expert format, with '+dense' for the dense layers in int4 too (--dense-quantize)."""
    spec, dense = dense_variant(fmt)
    q = None if spec == "none" else spec
    eng = build_engine(EngineConfig(model=model_dir, max_batch=max_batch, quantize=q, context_length=context,
                                    dtype=dtype if spec == "none" else "auto",
                                    dense_quantize=dense, prefix_cache=False),
                       CacheConfig(), progress=False)
    run_to_completion(eng, [GenerateRequest("warm", (1, 2, 3), SamplingParams(max_tokens=2, temperature=0.0))])
    n = [0]

    def measure(prompts: list[list[int]], tokens: int) -> tuple[float, float]:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        n[0] += 1
        reqs = [GenerateRequest(f"{n[0]}-{i}", tuple(p), params) for i, p in enumerate(prompts)]
        start = time.perf_counter()
        res = run_to_completion(eng, reqs)
        end = time.perf_counter() - start
        first = max(r.first_token_seconds for r in res.values())
        return len(prompts) * (tokens - 1) / (end - first), len(prompts[0]) / min(
            r.first_token_seconds for r in res.values()) if len(prompts) == 1 else float("nan")
    return measure


def transformers_system(model_dir: str, dtype: str, pad: int) -> Measure:
    from transformers import AutoModelForCausalLM
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt).eval()

    from bench.e2e_baselines import left_pad

    def measure(prompts: list[list[int]], tokens: int) -> tuple[float, float]:
        ids, mask = left_pad(prompts, pad)
        width = ids.shape[1]

        def timed(k: int) -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                model.generate(ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k,
                               do_sample=False, pad_token_id=pad)
            return time.perf_counter() - start
        prefill = timed(1)
        total = timed(tokens)
        return len(prompts) * (tokens - 1) / (total - prefill), width / prefill if len(prompts) == 1 else float("nan")
    return measure


def llama_system(gguf: str, threads: int, max_batch: int, ctx: int, flash_attn: bool) -> Measure:
    import llama_cpp

    from bench.e2e_baselines import decode_together
    llm = llama_cpp.Llama(gguf, n_ctx=ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                          flash_attn=flash_attn, verbose=False)

    def measure(prompts: list[list[int]], tokens: int) -> tuple[float, float]:
        if len(prompts) > 1:        # as for moeserve: the tokens after each first, from the last first
            started: list[float] = []
            decode_together(llama_cpp, llm, prompts, tokens, threads, decode_start=started)
            return len(prompts) * (tokens - 1) / (time.perf_counter() - started[0]), float("nan")
        stamps: list[float] = []
        llm.reset()         # else generate() reuses the cached prefix and skips the prompt pass
        start = time.perf_counter()
        for _ in llm.generate(prompts[0], top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) >= tokens:
                break
        return (tokens - 1) / (stamps[-1] - stamps[0]), len(prompts[0]) / (stamps[0] - start)
    return measure


def long_prompts(tok: TextTokenizer, n: int, context: int) -> list[list[int]]:
    """n chat prompts: held-out question i alone (context 0), or preceded by the other MT-Bench
    first turns in a fixed order until the prompt holds about ``context`` tokens."""
    from convert.mtbench import load_questions
    questions = heldout_prompts(n)
    if context <= 0:
        return [tok.encode_chat([{"role": "user", "content": q}]) for q in questions]
    others = [q.turns[0] for q in load_questions()]
    out = []
    for i, q in enumerate(questions):
        parts: list[str] = []
        k = i
        while len(tok.encode_chat([{"role": "user", "content": "\n\n".join(parts + [q])}])) < context:
            parts.append(others[k % len(others)])
            k += 1
        out.append(tok.encode_chat([{"role": "user", "content": "\n\n".join(parts + [q])}]))
    return out


def spread(xs: list[float]) -> dict[str, Optional[float]]:
    xs = [x for x in xs if x == x]
    return {"median": median(xs), "min": min(xs), "max": max(xs)} if xs else {"median": None, "min": None, "max": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the built-in default model)")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    ap.add_argument("--batches", default="1,4,8", help="comma-separated batch sizes")
    ap.add_argument("--formats", default="none,int4,int4+dense",
                    help="moeserve expert formats (none, int8, int4; +dense: the dense layers in int4 "
                         "too, --dense-quantize int4)")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"),
                    help="compute dtype of the unquantized rows (moeserve and transformers)")
    ap.add_argument("--systems", default="moeserve,transformers,llama.cpp", help="which systems to run")
    ap.add_argument("--repeats", type=int, default=3, help="alternating repeats per measurement")
    ap.add_argument("--threads", type=int, default=1,
                    help="compute threads for all (1: OpenMP threads spin-waiting on a shared "
                         "2-core box were several times slower)")
    ap.add_argument("--context", type=int, default=0,
                    help="prompt tokens per request: each question follows earlier MT-Bench questions "
                         "as a long first message, so decode attends over about this many keys "
                         "(0: the question alone)")
    ap.add_argument("--llama-flash-attn", choices=("on", "off"), default="on",
                    help="llama.cpp's flash attention (on: what llama.cpp's CLI and server pick by "
                         "default on a CPU, -fa auto; llama-cpp-python's own default is off)")
    ap.add_argument("--json", default=os.path.join(RESULTS, "engine_speed.json"), help="output JSON path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(EngineConfig(model=args.model))
    tok = TextTokenizer(model_dir)
    batches = [int(b) for b in args.batches.split(",")]
    prompts = long_prompts(tok, max(batches), args.context)
    pad = tok.encode("\n", add_special_tokens=False)[0]
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    hf = transformers_system(model_dir, args.dtype, pad) if "transformers" in names else None
    per_request = max(len(p) for p in prompts) + args.tokens + 8      # tokens of context a request needs
    rows: list[dict[str, Any]] = []
    for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
        systems: dict[str, Measure] = {}
        if "moeserve" in names:
            systems["moeserve"] = moeserve_system(model_dir, fmt, args.dtype, max(batches),
                                                  per_request if args.context else None)
        if hf is not None:
            systems["transformers"] = hf
        if "llama.cpp" in names:
            from bench.e2e_gguf import ensure_gguf, ensure_llama_quantized
            q = GGUF_OF[dense_variant(fmt)[0]]
            gguf = ensure_gguf(model_dir) if q == "bf16" else ensure_llama_quantized(model_dir, q)
            systems["llama.cpp"] = llama_system(gguf, args.threads, max(batches), max(batches) * per_request,
                                                args.llama_flash_attn == "on")
        for b in batches:
            got: dict[str, list[tuple[float, float]]] = {k: [] for k in systems}
            for rep in range(args.repeats):
                for name in run_order(list(systems), rep):
                    got[name].append(systems[name](prompts[:b], args.tokens))
            label = args.dtype if fmt == "none" else fmt
            row: dict[str, Any] = {"model": os.path.basename(model_dir), "batch": b, "dtype": label,
                                   "prompt_tokens": round(median([len(p) for p in prompts[:b]]))}
            for name, key in (("moeserve", "moeserve"), ("transformers", "transformers"), ("llama.cpp", "llama_cpp")):
                runs = got.get(name, [])
                row[f"{key}_tok_s"] = spread([r[0] for r in runs])["median"] if runs else None
                row[f"{key}_runs"] = [r[0] for r in runs]
                if b == 1 and runs:
                    row[f"{key}_prefill_tok_s"] = spread([r[1] for r in runs])["median"]
            row["prefill_tok_s"] = row.get("moeserve_prefill_tok_s")
            rows.append(row)
            print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items() if not k.endswith("_runs")},
                  flush=True)
        systems.pop("transformers", None)
        systems.clear()
    cols = ["model", "batch", "dtype", "prompt_tokens", "moeserve_tok_s", "transformers_tok_s", "llama_cpp_tok_s", "prefill_tok_s",
            "transformers_prefill_tok_s", "llama_cpp_prefill_tok_s"]
    print(table(rows, cols))
    out = os.path.abspath(args.json)
    path = write_json(out,
                      {"machine": machine(), "model": model_dir, "tokens": args.tokens, "threads": args.threads,
                       "repeats": args.repeats, "context": args.context,
                       "llama_flash_attn": args.llama_flash_attn, "results": rows})
    plot(os.path.splitext(out)[0] + ".png", rows)
    print(f"wrote {path}")


def plot(path: str, rows: list[dict[str, Any]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(5, len(rows) * 1.6), 3.8))
    keys = [("moeserve_tok_s", "moeserve"), ("transformers_tok_s", "transformers"), ("llama_cpp_tok_s", "llama.cpp")]
    for j, (k, label) in enumerate(keys):
        xs = [i + (j - 1) * 0.27 for i in range(len(rows))]
        ax.bar(xs, [r.get(k) or 0 for r in rows], width=0.27, label=label)
    ax.set_xticks(range(len(rows)), [f"{r['dtype']} b={r['batch']}" for r in rows], fontsize=8)
    ax.set_ylabel("decode tokens/s (median)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
