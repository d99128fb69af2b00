"""Quality of the quantized formats: held-out perplexity (MT-Bench 121-160, every turn) of a default
preset at none/int8/int4 in moeserve, beside llama.cpp's own Q8_0 and Q4_K_M (and its BF16) GGUFs
of the same checkpoint, and those same GGUF files served by moeserve (``moeserve-gguf``: converted
as ``--model FILE.gguf`` converts them), scored on the same token ids.

    python -m bench.quality [--preset smollm2-moe-8x] [--json OUT] [--systems moeserve,llama.cpp,moeserve-gguf]

moeserve quantizes only the routed experts (dense weights stay in the compute dtype), or with
``+dense`` every linear layer but the routers and the LM head in int4 too; llama.cpp's Q8_0/Q4_K_M
quantize every weight matrix, as its users get them. Writes
``{"results": [{"preset", "system", "quantize", "perplexity"}], ...}``, a table and a plot.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from typing import Any, Callable

import torch

from bench.common import RESULTS, bar_plot, dense_variant, machine, table, write_json

log = logging.getLogger("bench.quality")
LLAMA_TYPES = ("bf16", "q8_0", "q4_k_m")


def heldout_ids(model_dir: str, max_tokens: int) -> list[list[int]]:
    """Token ids of every held-out turn, BOS-free, cut to ``max_tokens`` each."""
    from convert.mtbench import heldout_texts
    from server.tokenizer import TextTokenizer
    tok = TextTokenizer(model_dir)
    return [ids[:max_tokens] for ids in (tok.encode(t) for t in heldout_texts()) if len(ids) > 1]


def perplexity(seqs: list[list[int]], logits_of: Callable[[list[int]], torch.Tensor]) -> float:
    """exp(mean NLL of token t+1 given tokens <= t) over every sequence."""
    nll, n = 0.0, 0
    for ids in seqs:
        logits = logits_of(ids).float()                           # [T, V]
        logp = torch.log_softmax(logits[:-1], dim=-1)
        target = torch.tensor(ids[1:])
        nll -= logp.gather(1, target[:, None]).sum().item()
        n += len(ids) - 1
    return math.exp(nll / n)


def moeserve_logits(model_dir: str, context: int,
                    dense_quantize: str = "off") -> Callable[[list[int]], torch.Tensor]:
    from cache.provider import ResidentExpertProvider
    from engine.loader import load_model, resolve_dtype, load_config
    from engine.models.common import Batch, KVCache
    dev = torch.device("cpu")
    dtype = resolve_dtype("auto", load_config(model_dir), dev)
    lm = load_model(model_dir, dev, dtype, context_length=context, dense_quantize=dense_quantize)
    lm.model.set_provider(ResidentExpertProvider(lm.experts, dev, dtype))
    spec = lm.model.kv_spec
    kv = KVCache.for_model(spec, 1, context, dtype, dev)

    @torch.inference_mode()
    def run(ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids])
        pos = torch.arange(len(ids))[None]
        batch = Batch(pos, torch.zeros(1, dtype=torch.long), len(ids), 0)
        return lm.model(x, batch, kv, all_logits=True)[0]          # [T, V]
    return run


def expert_format(model_dir: str) -> str:
    """none, int8 or int4:G: the routed experts' format of a checkpoint directory."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        qc = json.load(f).get("quantization_config") or {}
    return f"{qc['format']}:{qc['group_size']}" if qc.get("group_size") else str(qc.get("format", "none"))


def llama_gguf(model_dir: str, qtype: str) -> str:
    """The checkpoint's GGUF in ``qtype``: the BF16 conversion, or llama.cpp's own quantization."""
    from bench.e2e_gguf import ensure_gguf, ensure_llama_quantized
    return ensure_gguf(model_dir) if qtype == "bf16" else ensure_llama_quantized(model_dir, qtype)


def llama_logits(gguf: str, context: int, threads: int) -> Callable[[list[int]], torch.Tensor]:
    from llama_cpp import Llama
    llm = Llama(model_path=gguf, n_ctx=context, n_batch=context, logits_all=True, n_threads=threads,
                verbose=False)

    def run(ids: list[int]) -> torch.Tensor:
        llm.reset()
        llm.eval(ids)
        return torch.from_numpy(llm.scores[:len(ids)].copy())
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="smollm2-moe-8x", help="built-in default model preset")
    p.add_argument("--systems", default="moeserve,llama.cpp,moeserve-gguf",
                   help="comma-separated: moeserve, llama.cpp, moeserve-gguf (llama.cpp's GGUF files "
                   "served by moeserve)")
    p.add_argument("--formats", default="none,int8,int4,int4:32,int4+dense,int4:32+dense",
                   help="moeserve expert formats; int4:G sets the int4 group size (int4 alone: "
                   "the default group); +dense: the dense linear layers in int4 too "
                   "(--dense-quantize int4)")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per held-out turn at most")
    p.add_argument("--threads", type=int, default=2, help="compute threads (torch and llama.cpp)")
    p.add_argument("--json", default=os.path.join(RESULTS, "quality.json"), help="output JSON path")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    from convert.default_model import ensure_default_model
    from convert.quantize import ensure_quantized
    base = ensure_default_model(args.preset)
    seqs = heldout_ids(base, args.max_tokens)
    context = max(len(s) for s in seqs)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    results: list[dict[str, Any]] = []
    for system in systems:
        kinds = tuple(f.strip() for f in args.formats.split(",") if f.strip()) \
            if system == "moeserve" else LLAMA_TYPES
        for kind in kinds:
            t0 = time.perf_counter()
            if system == "moeserve":
                spec, dense = dense_variant(kind)
                fmt, _, group = spec.partition(":")
                path = base if fmt == "none" else ensure_quantized(base, fmt, int(group) if group else None)
                fn = moeserve_logits(path, context, dense)
                if fmt == "int4" and not group:                              # name the default
                    kind = f"int4:{os.path.basename(path).rsplit('-g', 1)[-1]}" + kind[len(spec):]
            elif system == "moeserve-gguf":
                from convert.gguf_convert import ensure_gguf
                path = ensure_gguf(llama_gguf(base, kind))       # the experts' default format
                fn = moeserve_logits(path, context)
                kind = f"{kind} as {expert_format(path)}"
            else:
                fn = llama_logits(llama_gguf(base, kind), context, args.threads)
            ppl = perplexity(seqs, fn)
            log.info("%s %s: perplexity %.4f (%.0fs)", system, kind, ppl, time.perf_counter() - t0)
            results.append({"preset": args.preset, "system": system, "quantize": kind,
                            "perplexity": ppl, "perplexity (3 d.p.)": f"{ppl:.3f}"})
            del fn
    by = {(r["system"], r["quantize"]): r["perplexity"] for r in results}
    goals = []
    if ("moeserve", "none") in by:
        ref = by[("moeserve", "none")]
        for (system, kind), v in by.items():
            limit = 0.01 if kind == "int8" else 0.05 if kind.startswith("int4") else None
            if system == "moeserve" and limit is not None:
                d = v / ref - 1
                goals.append(f"target moeserve {kind} within {limit:.0%} of none: "
                             f"{'met' if d <= limit else 'NOT met'} ({d:+.2%})")
    for (system, kind), v in by.items():
        if system == "moeserve" and kind.startswith("int4") and ("llama.cpp", "q4_k_m") in by:
            b = by[("llama.cpp", "q4_k_m")]
            goals.append(f"target moeserve {kind} no worse than llama.cpp Q4_K_M: "
                         f"{'met' if v <= b else 'NOT met'} ({v:.4f} vs {b:.4f})")
    for (system, kind), v in by.items():
        src = kind.split(" as ")[0]
        if system == "moeserve-gguf" and ("llama.cpp", src) in by:
            b = by[("llama.cpp", src)]
            goals.append(f"target moeserve serving llama.cpp's {src.upper()} file within 1% of llama.cpp "
                         f"on it: {'met' if v / b - 1 <= 0.01 else 'NOT met'} ({v / b - 1:+.2%})")
    tokens = sum(len(s) - 1 for s in seqs)
    note = (f"{len(seqs)} held-out MT-Bench turns (ids 121-160), {tokens} scored tokens, same ids "
            "for every system; moeserve quantizes the routed experts only (+dense: every linear "
            "layer but the routers and the LM head, in int4), llama.cpp every weight")
    out = {"machine": machine(), "note": note, "results": results, "goals": goals}
    path = write_json(os.path.abspath(args.json), out)
    print(table(results, ["preset", "system", "quantize", "perplexity (3 d.p.)"]))
    print(note)
    for g in goals:
        print("-", g)
    png = os.path.splitext(path)[0] + ".png"
    bar_plot(png, [f"{r['system']}\n{r['quantize']}" for r in results],
             [r["perplexity"] for r in results], "perplexity (lower is better)",
             f"held-out perplexity, {args.preset}")
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
