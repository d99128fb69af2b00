"""Soak test: many concurrent streaming chats against a real `moeserve serve` for minutes.

    python -m bench.soak [--streams 64] [--minutes 10] [--json OUT] [--model DIR]

Reports completed requests, errors, tokens/s, p50/p99 first-token and inter-token latency,
/health and /metrics latency sampled throughout, and the RSS of the server and the engine process
over time (growth measured from the end of the warm-up). Goal: 0 errors, RSS growth under 5%
after warm-up, /metrics and /health p99 under 100 ms.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any, Optional

import httpx
import psutil

from bench.common import RESULTS, percentile, start_server, table, write_json

PROMPTS = ["Tell me about the sea.", "Write a short poem about rivers.",
           "Explain how a bicycle works.", "What is the capital of France, and why?",
           "Give three tips for learning to cook.", "Describe a thunderstorm to a child.",
           "Why is the sky blue?", "Summarise the plot of a detective story you invent."]


def _start_server(model: Optional[str], port: int, streams: int, max_batch: int, threads: int,
                  log_path: str) -> subprocess.Popen:
    args = ["--max-batch", str(max_batch), "--max-queue", str(max(64, 2 * streams)),
            "--threads", str(threads), "--log-level", "warning"]
    if model:
        args += ["--model", model]
    return start_server(args, port, log_path)


def _rss(pid: int) -> tuple[int, int]:
    """RSS of the server and of its engine child (the spawned process)."""
    server = psutil.Process(pid)
    engine = 0
    for child in server.children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                engine = child.memory_info().rss
        except psutil.Error:
            pass
    return server.memory_info().rss, engine


class Soak:
    def __init__(self, base: str, pid: int, streams: int, seconds: float, warmup: float,
                 max_tokens: int) -> None:
        self.base, self.pid, self.streams = base, pid, streams
        self.seconds, self.warmup, self.max_tokens = seconds, warmup, max_tokens
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.tokens = 0
        self.completed = 0
        self.errors: list[str] = []
        self.probes: dict[str, list[float]] = {"health": [], "metrics": []}
        self.probe_errors = 0
        self.rss: list[dict[str, float]] = []

    async def _chat(self, client: httpx.AsyncClient, i: int) -> None:
        body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": self.max_tokens, "temperature": 0.7, "seed": i, "stream": True}
        start = time.perf_counter()
        last: Optional[float] = None
        got_done = False
        async with client.stream("POST", self.base + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                self.errors.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    got_done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    self.errors.append(f"stream error: {event['error'].get('message')}")
                    return
                if event["choices"] and event["choices"][0].get("delta", {}).get("content"):
                    now = time.perf_counter()
                    if last is None:
                        self.ttft.append(now - start)
                    else:
                        self.itl.append(now - last)
                    last = now
                    self.tokens += 1
        if got_done:
            self.completed += 1
        else:
            self.errors.append("stream ended without [DONE]")

    async def _worker(self, w: int, end: float) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
            i = w
            while time.monotonic() < end:
                try:
                    await self._chat(client, i)
                except (httpx.HTTPError, json.JSONDecodeError) as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                i += self.streams

    async def _prober(self, end: float, t0: float) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            next_rss = 0.0
            while time.monotonic() < end:
                for name in ("health", "metrics"):
                    t = time.perf_counter()
                    try:
                        ok = (await client.get(f"{self.base}/{name}")).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    self.probes[name].append(time.perf_counter() - t)
                    self.probe_errors += not ok
                if time.monotonic() >= next_rss:
                    server, engine = _rss(self.pid)
                    self.rss.append({"t_s": round(time.monotonic() - t0, 1),
                                     "server_mb": server / 2**20, "engine_mb": engine / 2**20})
                    next_rss = time.monotonic() + 10
                await asyncio.sleep(0.5)   # probe interval

    async def run(self) -> None:
        t0 = time.monotonic()
        end = t0 + self.seconds
        await asyncio.gather(self._prober(end, t0), *(self._worker(w, end)
                                                      for w in range(self.streams)))

    def report(self, elapsed: float) -> dict[str, Any]:
        after = [r for r in self.rss if r["t_s"] >= self.warmup] or self.rss
        def growth(key: str) -> float:
            first, peak = after[0][key], max(r[key] for r in after)
            return 100.0 * (peak - first) / first if first else float("nan")
        ms = 1e3
        return {
            "streams": self.streams, "seconds": round(elapsed, 1), "completed": self.completed,
            "errors": len(self.errors), "error_samples": self.errors[:10],
            "tokens_per_s": self.tokens / elapsed,
            "ttft_p50_ms": percentile(self.ttft, 50) * ms, "ttft_p99_ms": percentile(self.ttft, 99) * ms,
            "itl_p50_ms": percentile(self.itl, 50) * ms, "itl_p99_ms": percentile(self.itl, 99) * ms,
            "health_p99_ms": percentile(self.probes["health"], 99) * ms,
            "health_max_ms": max(self.probes["health"], default=float("nan")) * ms,
            "metrics_p99_ms": percentile(self.probes["metrics"], 99) * ms,
            "metrics_max_ms": max(self.probes["metrics"], default=float("nan")) * ms,
            "probe_errors": self.probe_errors,
            "server_rss_growth_pct": growth("server_mb"), "engine_rss_growth_pct": growth("engine_mb"),
            "rss": self.rss,
        }


def goal_met(rep: dict[str, Any]) -> bool:
    return (rep["errors"] == 0 and rep["probe_errors"] == 0 and rep["health_p99_ms"] < 100
            and rep["metrics_p99_ms"] < 100 and rep["server_rss_growth_pct"] < 5
            and rep["engine_rss_growth_pct"] < 5)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=64, help="concurrent streaming chats")
    ap.add_argument("--minutes", type=float, default=10.0, help="how long to run")
    ap.add_argument("--warmup-minutes", type=float, default=1.0,
                    help="RSS growth is measured from the end of this warm-up")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each chat")
    ap.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="engine compute threads (default: all cores but one, left to HTTP)")
    ap.add_argument("--model", default=None, help="model directory (default: the built-in model)")
    ap.add_argument("--port", type=int, default=8765, help="port of the server the soak starts")
    ap.add_argument("--json", default=None, metavar="OUT",
                    help="write the report here (default: bench/results/soak.json)")
    args = ap.parse_args(argv)
    log_path = os.path.join(RESULTS, "soak-logs", "server.log")   # bench/results/*-logs/: ignored
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    proc = _start_server(args.model, args.port, args.streams, args.max_batch, args.threads,
                         log_path)
    soak = Soak(f"http://127.0.0.1:{args.port}", proc.pid, args.streams, args.minutes * 60,
                args.warmup_minutes * 60, args.max_tokens)
    t = time.monotonic()
    try:
        asyncio.run(soak.run())
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    rep = soak.report(time.monotonic() - t)
    rep["goal_met"] = goal_met(rep)
    cols = ["streams", "seconds", "completed", "errors", "tokens_per_s", "ttft_p50_ms",
            "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "health_p99_ms", "metrics_p99_ms",
            "server_rss_growth_pct", "engine_rss_growth_pct", "goal_met"]
    print(table([rep], cols))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=2)
        print(f"wrote {args.json}")
    else:
        print(f"wrote {write_json('soak.json', rep)}")
    return 0 if rep["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
