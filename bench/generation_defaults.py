"""Which default sampling parameters the built-in model should ship in generation_config.json.

Front ends (Open WebUI, `llm chat`) send no temperature and no max_tokens, so the model's
defaults decide what users see. For each candidate (temperature, top_p, repetition_penalty) this
samples answers to a handful of held-out MT-Bench questions (ids 121-160: never calibration text)
with several seeds and measures: how often the answer ends by itself (EOS) within --max-tokens,
whether it stays on topic (share of the question's content words that the answer uses), and how
much it loops (share of repeated token 4-grams). Cheap by design: a few questions, short answers.

    python -m bench.generation_defaults [--model DIR] [--questions 6] [--max-tokens 256]

Prints a table and writes bench/results/generation_defaults.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import time
from typing import Any

from configs import CacheConfig, EngineConfig
from convert.mtbench import HELDOUT_IDS, load_questions

STOP = set("a an the and or of to in on for with is are be this that your you it as by at from "
           "what which how can its their them they was were will would should could about into "
           "than then also more most some each".split())
GRID = [(0.0, 1.0, 1.0), (0.0, 1.0, 1.1), (0.0, 1.0, 1.2),
        (0.2, 0.9, 1.0), (0.2, 0.9, 1.1), (0.2, 0.9, 1.2),
        (0.4, 0.9, 1.1), (0.6, 0.9, 1.1), (0.6, 0.95, 1.05), (1.0, 1.0, 1.0)]


def words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]{4,}", text.lower()) if w not in STOP}


def repeated_4grams(ids: list[int]) -> float:
    grams = [tuple(ids[i:i + 4]) for i in range(len(ids) - 3)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the built-in model)")
    ap.add_argument("--questions", type=int, default=6, help="held-out questions to use")
    ap.add_argument("--seeds", type=int, default=2, help="samples per question (sampled configs)")
    ap.add_argument("--max-tokens", type=int, default=256, help="answer length limit")
    ap.add_argument("--out", default="bench/results/generation_defaults.json", help="JSON output")
    args = ap.parse_args(argv)
    from engine.engine import run_to_completion
    from engine.protocol import GenerateRequest, SamplingParams
    from moeserve.wiring import build_engine, resolve_model_dir
    from server.tokenizer import TextTokenizer

    ecfg = EngineConfig(model=args.model, max_batch=16, threads=1)
    model_dir = resolve_model_dir(ecfg)
    ecfg = EngineConfig(model=model_dir, max_batch=16, threads=1, prefix_cache=False)
    tok = TextTokenizer(model_dir)
    qs = sorted((q for q in load_questions() if q.question_id in HELDOUT_IDS),
                key=lambda q: q.question_id)
    step = max(1, len(qs) // args.questions)   # spread over the categories
    qs = qs[::step][:args.questions]
    prompts = [tuple(tok.encode_chat([{"role": "user", "content": q.turns[0]}])) for q in qs]
    engine = build_engine(ecfg, CacheConfig(), progress=False)
    rows: list[dict[str, Any]] = []
    try:
        for temp, top_p, rp in GRID:
            seeds = [0] if temp == 0.0 else list(range(args.seeds))
            reqs = [GenerateRequest(f"q{i}-s{s}", p, SamplingParams(
                max_tokens=args.max_tokens, temperature=temp, top_p=top_p,
                repetition_penalty=rp, seed=s))
                for (i, p), s in itertools.product(enumerate(prompts), seeds)]
            t0 = time.perf_counter()
            res = run_to_completion(engine, reqs)
            ended, topic, rep, length = [], [], [], []
            for r in reqs:
                out = res[r.request_id]
                q = qs[int(r.request_id[1:].split("-")[0])]
                qw = words(q.turns[0])
                aw = words(tok.decode(out.token_ids))
                ended.append(out.finish_reason == "stop")
                topic.append(len(qw & aw) / max(1, len(qw)))
                rep.append(repeated_4grams(out.token_ids))
                length.append(len(out.token_ids))
            n = len(reqs)
            rows.append({"temperature": temp, "top_p": top_p, "repetition_penalty": rp,
                         "answers": n, "ended_by_eos": sum(ended) / n,
                         "on_topic": sum(topic) / n, "repeated_4grams": sum(rep) / n,
                         "mean_tokens": sum(length) / n, "seconds": time.perf_counter() - t0})
            r = rows[-1]
            print(f"T={temp:<4} top_p={top_p:<5} rp={rp:<5} ended {r['ended_by_eos']:.2f} "
                  f"on-topic {r['on_topic']:.2f} repeats {r['repeated_4grams']:.2f} "
                  f"tokens {r['mean_tokens']:.0f} ({r['seconds']:.0f}s)", flush=True)
    finally:
        engine.close()
    # score: answers that end by themselves, stay on topic and do not loop
    for r in rows:
        r["score"] = r["ended_by_eos"] + r["on_topic"] - r["repeated_4grams"]
    best = max(rows, key=lambda r: r["score"])
    print(f"best: temperature={best['temperature']} top_p={best['top_p']} "
          f"repetition_penalty={best['repetition_penalty']} (score {best['score']:.2f})")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"model": model_dir, "questions": [q.question_id for q in qs],
                   "max_tokens": args.max_tokens, "rows": rows, "best": best}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
