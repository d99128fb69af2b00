"""What the prefix cache saves in a multi-turn chat: time to first token per turn with and without
it, on two real `moeserve serve` processes, through /v1/chat/completions as a chat front end calls it.

    python -m bench.prefix_cache [--model DIR] [--turns 6] [--max-tokens 96] [--repeats 3]
                                 [--extra-args "--expert-budget 25%"]

One server runs with the prefix cache (the default) and one with --no-prefix-cache, same model and
flags. A conversation's user turns are consecutive held-out MT-Bench questions (those of at most
400 characters, so that the conversation fits a 2,048-token context); each reply is
greedy with ignore_eos, so every reply is --max-tokens tokens long, and each server's own reply
goes back into its own history (content only), as a client sends it. Turn by turn, the two
servers take the same turn back to back, the order alternating by turn and by repeat, so drift on
a shared machine hits both. Each repeat is a new conversation (the next questions), so nothing
but the chat template's first tokens is cached from an earlier repeat.

TTFT is timed at the client: request sent -> first content chunk. Per turn: prompt tokens, the
tokens the server reports as cached (usage.prompt_tokens_details.cached_tokens), each server's
median TTFT with min-max over repeats, the median over repeats of without / with, and each
server's median decode ms/token ((last content chunk - first) / (reply tokens - 1)).
Writes bench/results/prefix_cache.json and prefix_cache.png.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from typing import Any, Optional

import httpx

from bench.common import RESULTS, free_port, heldout_prompts, machine, median, start_server, table, write_json

SYSTEMS = ("cache", "no cache")


def turn(base: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    """One streamed chat turn: TTFT (ms), the reply's text and the usage the server reports."""
    body = {"messages": messages, "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    sent, first, last, text, usage = time.perf_counter(), None, None, [], None
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=1800) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for c in chunk.get("choices", []):
                if c.get("delta", {}).get("content"):
                    last = time.perf_counter()
                    first = first or last
                    text.append(c["delta"]["content"])
    if first is None or last is None or usage is None:
        raise SystemExit("a turn streamed no content or no usage")
    decoded = max(usage["completion_tokens"] - 1, 1)
    return {"ttft_ms": (first - sent) * 1e3, "decode_ms_per_token": (last - first) * 1e3 / decoded,
            "text": "".join(text),
            "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)}


def run(bases: dict[str, str], questions: list[str], turns: int, max_tokens: int,
        repeats: int) -> list[dict[str, Any]]:
    """Per repeat and turn, each system's measurement."""
    samples = []
    for rep in range(repeats):
        history: dict[str, list[dict[str, str]]] = {s: [] for s in SYSTEMS}
        for t in range(turns):
            q = questions[(rep * turns + t) % len(questions)]
            order = SYSTEMS if (rep + t) % 2 == 0 else SYSTEMS[::-1]
            for s in order:
                history[s].append({"role": "user", "content": q})
                got = turn(bases[s], history[s], max_tokens)
                history[s].append({"role": "assistant", "content": got.pop("text")})
                samples.append({"repeat": rep, "turn": t + 1, "system": s, **got})
            print(f"repeat {rep + 1} turn {t + 1}: " + ", ".join(
                f"{x['system']} {x['ttft_ms']:.0f} ms ({x['cached_tokens']}/{x['prompt_tokens']} cached)"
                for x in samples[-2:]), flush=True)
    return samples


def summarize(samples: list[dict[str, Any]], turns: int) -> list[dict[str, Any]]:
    rows = []
    for t in range(1, turns + 1):
        at = {s: [x for x in samples if x["turn"] == t and x["system"] == s] for s in SYSTEMS}
        ratios = [off["ttft_ms"] / on["ttft_ms"] for on, off in zip(at["cache"], at["no cache"])]
        row: dict[str, Any] = {"turn": t,
                               "prompt_tokens": median([x["prompt_tokens"] for x in at["cache"]]),
                               "cached_tokens": median([x["cached_tokens"] for x in at["cache"]])}
        for s, key in zip(SYSTEMS, ("cache", "no_cache")):
            ms = [x["ttft_ms"] for x in at[s]]
            row.update({f"ttft_ms_{key}": median(ms), f"ttft_ms_{key}_min": min(ms),
                        f"ttft_ms_{key}_max": max(ms)})
        row.update(speedup=median(ratios), speedup_min=min(ratios), speedup_max=max(ratios))
        for s, key in zip(SYSTEMS, ("cache", "no_cache")):
            row[f"decode_ms_{key}"] = median([x["decode_ms_per_token"] for x in at[s]])
        rows.append(row)
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the built-in default model)")
    ap.add_argument("--turns", type=int, default=6, help="user turns per conversation")
    ap.add_argument("--max-tokens", type=int, default=96, help="tokens of each reply")
    ap.add_argument("--repeats", type=int, default=3, help="conversations (alternating order)")
    ap.add_argument("--extra-args", default="", help="more `moeserve serve` flags for both servers")
    ap.add_argument("--json", default=os.path.join(RESULTS, "prefix_cache.json"),
                    help="where the results go (the plot beside it)")
    a = ap.parse_args(argv)
    if a.turns < 1 or a.repeats < 1 or a.max_tokens < 1:
        ap.error("--turns, --repeats and --max-tokens must be >= 1")
    log_dir = os.path.dirname(os.path.abspath(a.json))
    os.makedirs(log_dir, exist_ok=True)
    common = (["--model", a.model] if a.model else []) + ["--log-level", "warning"]
    common += shlex.split(a.extra_args)
    procs, bases = [], {}
    try:
        for s, flag in zip(SYSTEMS, ("--prefix-cache", "--no-prefix-cache")):
            port = free_port()
            procs.append(start_server([*common, flag], port, os.path.join(
                log_dir, f"prefix_cache-{s.replace(' ', '_')}.log")))
            bases[s] = f"http://127.0.0.1:{port}"
        for s in SYSTEMS:       # warm-up: first loads and compiled paths, not measured
            turn(bases[s], [{"role": "user", "content": "Hello"}], 4)
        questions = [q for q in heldout_prompts(40) if len(q) <= 400]
        samples = run(bases, questions, a.turns, a.max_tokens, a.repeats)
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=60)
    rows = summarize(samples, a.turns)
    out = {"machine": machine(), "model": a.model or "default", "turns": a.turns,
           "max_tokens": a.max_tokens, "repeats": a.repeats, "extra_args": a.extra_args,
           "results": rows, "samples": samples}
    path = write_json(os.path.abspath(a.json), out)
    print(table([{**r, "no cache / cache (min-max)": f"{r['speedup']:.2f} ({r['speedup_min']:.2f}-"
                  f"{r['speedup_max']:.2f})"} for r in rows],
                ["turn", "prompt_tokens", "cached_tokens", "ttft_ms_cache", "ttft_ms_no_cache",
                 "no cache / cache (min-max)", "decode_ms_cache", "decode_ms_no_cache"]))
    _plot(path.replace(".json", ".png"), rows)
    print(f"wrote {path}")


def _plot(path: str, rows: list[dict[str, Any]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    x = [r["turn"] for r in rows]
    for key, label in (("cache", "prefix cache"), ("no_cache", "--no-prefix-cache")):
        med = [r[f"ttft_ms_{key}"] for r in rows]
        err = [[m - r[f"ttft_ms_{key}_min"] for m, r in zip(med, rows)],
               [r[f"ttft_ms_{key}_max"] - m for m, r in zip(med, rows)]]
        ax.errorbar(x, med, yerr=err, marker="o", capsize=3, label=label)
    ax.set_xlabel("turn of the conversation")
    ax.set_ylabel("time to first token, ms")
    ax.set_title("multi-turn chat: TTFT (median, min-max)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
