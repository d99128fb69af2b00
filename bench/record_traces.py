"""Record moe-trace v2 routing traces from a model: MT-Bench first turns, chat template, greedy.

    python -m bench.record_traces [--model DIR | --preset NAME] [--out FILE] [--prompts 40]
                                  [--max-tokens 64] [--dtype bf16] [--threads 1]

Prompts are MT-Bench ids 121-160 (never the default model's calibration text), one request at
a time (arrival order = file order), all experts resident; the engine's ActivationTracer writes
each finished request (``--record-trace``). Feed the file to ``python -m bench.replay``.
"""
from __future__ import annotations

import argparse
import logging
import os
import time

from bench.common import heldout_prompts
from configs import CacheConfig, EngineConfig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the --preset default model)")
    ap.add_argument("--preset", default="smollm2-moe-8x", help="default-model preset when --model is absent")
    ap.add_argument("--out", default=None, help="trace file (default bench/results/traces/<model>.jsonl)")
    ap.add_argument("--prompts", type=int, default=40, help="how many MT-Bench first turns (ids 121-160)")
    ap.add_argument("--max-tokens", type=int, default=64, help="greedy tokens per request")
    ap.add_argument("--dtype", default="bf16", choices=("auto", "bf16", "fp16", "fp32"))
    ap.add_argument("--threads", type=int, default=1, help="compute threads")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from engine.engine import run_to_completion
    from engine.protocol import GenerateRequest, SamplingParams
    from moeserve.wiring import build_engine, resolve_model_dir
    from server.tokenizer import TextTokenizer

    model = resolve_model_dir(EngineConfig(model=args.model, default_preset=args.preset))
    name = os.path.basename(os.path.normpath(model))
    out = args.out or os.path.join(os.path.dirname(__file__), "results", "traces", f"{name}.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if os.path.exists(out):
        os.unlink(out)          # a fresh trace, not appended to an older run's
    tok = TextTokenizer(model)
    engine = build_engine(EngineConfig(model=model, dtype=args.dtype, threads=args.threads, max_batch=1,
                                       prefix_cache=False),   # traces record every prompt token
                          CacheConfig(record_trace=out), progress=False)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    t0 = time.perf_counter()
    try:
        for i, text in enumerate(heldout_prompts(args.prompts)):
            ids = tuple(tok.encode_chat([{"role": "user", "content": text}]))
            res = run_to_completion(engine, [GenerateRequest(f"mtbench-{121 + i}", ids, params)])
            logging.info("request %d/%d: %d prompt + %d generated tokens", i + 1, args.prompts,
                         len(ids), len(next(iter(res.values())).token_ids))
    finally:
        engine.close()
    print(f"wrote {out} ({args.prompts} requests, {time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
