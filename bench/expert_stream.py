"""What the opt-in expert stream costs: decode time per token with ``"moeserve": {"experts":
true}`` over the same requests without it, against a real `moeserve serve` process.

    python -m bench.expert_stream [--model DIR] [--budgets 25%,all] [--prompts 4]
                                  [--max-tokens 32] [--repeats 3]

Per budget one server; after a warm-up request, each repeat runs the same prompts (held-out
MT-Bench first turns, greedy, ignore_eos, so every request decodes exactly --max-tokens tokens)
each once without and once with the stream, back to back, the order alternating by prompt
and by repeat. Decode ms/token of a request: (last content chunk - first content chunk) /
(tokens - 1), timed at the client, so it includes the larger chunks' encoding and transfer. A repeat's ratio is the median over prompts
of with / without; reported as the median with min-max over repeats. Also measured in this
process: the per-token cost of the stream outside the forward pass (engine -> server pickle, the
JSON object, its encoding), in microseconds.
Writes bench/results/expert_stream.json and expert_stream.png.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Optional

import httpx

from bench.common import RESULTS, free_port, heldout_prompts, machine, median, start_server, table, write_json


def decode_ms(base: str, prompt: str, max_tokens: int, watch: bool) -> tuple[float, int]:
    """One streamed request: its decode ms/token and the bytes of its SSE body."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "stream": True,
                            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if watch:
        body["moeserve"] = {"experts": True}
    stamps: list[float] = []
    size = 0
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            size += len(line) + 1
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                stamps.append(time.perf_counter())
    if len(stamps) < 2:
        raise SystemExit(f"a request streamed {len(stamps)} content chunks; need 2 or more")
    return (stamps[-1] - stamps[0]) * 1e3 / (len(stamps) - 1), size


def last_entry(base: str, prompt: str) -> dict[str, Any]:
    """The expert-stream object of a request's last token."""
    r = httpx.post(base + "/v1/chat/completions", timeout=600, json={
        "messages": [{"role": "user", "content": prompt}], "max_tokens": 4, "temperature": 0,
        "ignore_eos": True, "moeserve": {"experts": True}})
    r.raise_for_status()
    return r.json()["choices"][0]["moeserve"]["tokens"][-1]


def server_cost_us(entry: dict[str, Any], n: int = 2000) -> float:
    """Microseconds the stream adds per token outside the forward pass: the engine -> server
    pickle round trip of a TokenExperts like ``entry``, its JSON object and its encoding."""
    import pickle

    from engine.protocol import TokenExperts
    from server.errors import encode
    from server.expert_stream import token_json
    x = TokenExperts(entry["phase"], tuple(tuple((e, k, c) for e, k, c in layer)
                                           for layer in entry["layers"]),
                     tuple(int(m, 16) for m in entry["resident"]),
                     tuple(map(tuple, entry["evicted"])), tuple(map(tuple, entry["prefetched"])),
                     entry["bytes_read"], entry["stall_ms"] / 1e3, entry["batch"])
    t = time.perf_counter()
    for _ in range(n):
        encode({"moeserve": token_json(pickle.loads(pickle.dumps(x)), 1)})
    return (time.perf_counter() - t) * 1e6 / n


def run_budget(model: Optional[str], budget: str, prompts: list[str], max_tokens: int,
               repeats: int, log_dir: str) -> dict[str, Any]:
    port = free_port()
    args = ["--expert-budget", budget, "--no-prefix-cache"] + (["--model", model] if model else [])
    proc = start_server(args, port, os.path.join(log_dir, f"expert_stream-{budget.strip('%')}.log"))
    base = f"http://127.0.0.1:{port}"
    try:
        decode_ms(base, prompts[0], 8, True)                      # warm-up: first loads, caches
        runs = []
        for rep in range(repeats):
            # each prompt without and with, back to back (drift on a shared machine hits both),
            # the order alternating by prompt and by repeat
            got: dict[bool, list[tuple[float, int]]] = {False: [], True: []}
            for i, p in enumerate(prompts):
                order = (False, True) if (rep + i) % 2 == 0 else (True, False)
                for watch in order:
                    got[watch].append(decode_ms(base, p, max_tokens, watch))
            ratios = [on[0] / off[0] for on, off in zip(got[True], got[False])]
            runs.append({"off_ms": [x[0] for x in got[False]], "on_ms": [x[0] for x in got[True]],
                         "off_bytes": [x[1] for x in got[False]],
                         "on_bytes": [x[1] for x in got[True]], "ratio": median(ratios)})
            print(f"  {budget} repeat {rep + 1}/{repeats}: with/without {runs[-1]['ratio']:.3f}",
                  flush=True)
        sample = last_entry(base, prompts[0])
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    ratios = [r["ratio"] for r in runs]
    return {"budget": budget, "runs": runs, "server_us_per_token": server_cost_us(sample), "ratio_median": median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios),
            "off_ms_median": median([m for r in runs for m in r["off_ms"]]),
            "on_ms_median": median([m for r in runs for m in r["on_ms"]]),
            "bytes_per_token_off": median([b / max_tokens for r in runs for b in r["off_bytes"]]),
            "bytes_per_token_on": median([b / max_tokens for r in runs for b in r["on_bytes"]])}


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: the built-in default model)")
    ap.add_argument("--budgets", default="25%,all",
                    help="comma-separated --expert-budget values, one server each")
    ap.add_argument("--prompts", type=int, default=4, help="held-out MT-Bench prompts per run")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens decoded per request")
    ap.add_argument("--repeats", type=int, default=3, help="alternating on/off repeats")
    ap.add_argument("--json", default=os.path.join(RESULTS, "expert_stream.json"),
                    help="where the results go (the plot beside it)")
    a = ap.parse_args(argv)
    if a.repeats < 1 or a.prompts < 1 or a.max_tokens < 2:
        ap.error("--repeats and --prompts must be >= 1, --max-tokens >= 2")
    prompts = heldout_prompts(a.prompts)
    log_dir = os.path.dirname(os.path.abspath(a.json))
    os.makedirs(log_dir, exist_ok=True)
    rows = [run_budget(a.model, b.strip(), prompts, a.max_tokens, a.repeats, log_dir)
            for b in a.budgets.split(",")]
    out = {"machine": machine(), "model": a.model or "default", "prompts": a.prompts,
           "max_tokens": a.max_tokens, "repeats": a.repeats, "budgets": rows}
    path = write_json(os.path.abspath(a.json), out)
    print(table([{**r, "ratio (min-max)": f"{r['ratio_median']:.3f} "
                  f"({r['ratio_min']:.3f}-{r['ratio_max']:.3f})"} for r in rows],
                ["budget", "off_ms_median", "on_ms_median", "ratio (min-max)",
                 "bytes_per_token_off", "bytes_per_token_on", "server_us_per_token"]))
    _plot(path.replace(".json", ".png"), rows)
    print(f"wrote {path}")


def _plot(path: str, rows: list[dict[str, Any]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    x = range(len(rows))
    med = [r["ratio_median"] for r in rows]
    err = [[m - r["ratio_min"] for m, r in zip(med, rows)], [r["ratio_max"] - m for m, r in zip(med, rows)]]
    ax.bar(x, med, yerr=err, capsize=4, color="tab:blue")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(list(x), [f"budget {r['budget']}" for r in rows])
    ax.set_ylabel("decode ms/token, with / without")
    ax.set_title("expert stream overhead (median, min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
