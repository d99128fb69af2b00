"""Pure parts of the end-to-end benchmark: worker measurements -> issue-6 schema, bounds, table, targets.

No I/O and no torch here, so tests/bench can check the maths and the schema on made-up numbers.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from bench.common import median, percentile, table

MOESERVE = ("resident", "lru", "moe-infinity", "auto")
# moeserve on int8/int4 experts (the budget is the same share of that format's expert bytes)
MOESERVE_QUANT = ("resident-int8", "auto-int8", "resident-int4", "auto-int4")
# llama.cpp on its own quantizations of the same checkpoint; "-resident" runs without the cap
LLAMA_QUANT = ("llama.cpp-q8_0", "llama.cpp-q4_k_m", "llama.cpp-q4_k_m-resident")
SYSTEMS = MOESERVE + MOESERVE_QUANT + ("accelerate", "llama.cpp") + LLAMA_QUANT


def system_format(name: str) -> str:
    """The weight format a system runs: none, int8, int4 (moeserve) or q8_0, q4_k_m (llama.cpp)."""
    for fmt in ("int8", "int4", "q8_0", "q4_k_m"):
        if f"-{fmt}" in name:
            return fmt
    return "none"
# keys every system entry of e2e.json has (issue 6); entries may carry more
SCHEMA_KEYS = ("per_token_ms_median", "per_token_ms_p90", "ttft_ms_median", "tokens_per_s_concurrent4",
               "disk_bytes_per_token", "hit_rate", "peak_rss_bytes", "error")
COLUMNS = ["system", "per-token ms (median)", "per-token ms (p90)", "TTFT ms (median)",
           "tok/s at 4 concurrent", "disk MB/token", "hit rate", "peak RSS GB", "measured on"]


def cgroup_limit_bytes(expert_bytes: int, budget_fraction: float, dense_bytes: int, allowance: int) -> int:
    """Memory cap of a capped baseline: moeserve's expert budget + the dense weights + a fixed
    allowance for the runtime (interpreter, KV cache, buffers), rounded up to a 4 KiB page."""
    if not 0 < budget_fraction <= 1:
        raise ValueError(f"invalid budget_fraction={budget_fraction}: must be in (0, 1]")
    if min(expert_bytes, dense_bytes, allowance) < 0:
        raise ValueError("expert_bytes, dense_bytes and allowance must not be negative")
    raw = int(math.ceil(expert_bytes * budget_fraction)) + dense_bytes + allowance
    return -(-raw // 4096) * 4096


def parse_fraction(budget: str) -> float:
    """'25%' -> 0.25 (the benchmark's budget is always a share of the experts)."""
    t = budget.strip()
    if not t.endswith("%"):
        raise ValueError(f"invalid budget={budget!r}: the benchmark needs a percentage such as 25%")
    return float(t[:-1]) / 100


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """One worker's raw measurements -> the issue's per-system entry (plus context fields).

    raw: decode_ms (gaps between consecutive tokens of one request, concurrency 1), ttft_ms (per
    request), c4_tokens/c4_seconds, generated_tokens and disk_read_bytes over every measured phase,
    hits/misses (moeserve offloaded), peak_rss_bytes, error, tokens_per_request, prompts_c1/c4, notes.
    """
    err = raw.get("error")
    decode = [float(x) for x in raw.get("decode_ms", [])]
    ttft = [float(x) for x in raw.get("ttft_ms", [])]
    gen = int(raw.get("generated_tokens", 0))
    c4s = float(raw.get("c4_seconds", 0.0))
    hits, misses = raw.get("hits"), raw.get("misses")
    hit_rate: Optional[float] = None
    if hits is not None and misses is not None and hits + misses > 0:
        hit_rate = hits / (hits + misses)
    out = {
        "per_token_ms_median": median(decode) if decode else None,
        "per_token_ms_p90": percentile(decode, 90) if decode else None,
        "ttft_ms_median": median(ttft) if ttft else None,
        "tokens_per_s_concurrent4": raw["c4_tokens"] / c4s if c4s > 0 and raw.get("c4_tokens") else None,
        "disk_bytes_per_token": raw["disk_read_bytes"] / gen if gen and "disk_read_bytes" in raw else None,
        "hit_rate": hit_rate,
        "peak_rss_bytes": int(raw["peak_rss_bytes"]) if raw.get("peak_rss_bytes") else None,
        "error": err,
    }
    for k in ("tokens_per_request", "prompts_c1", "prompts_c4", "generated_tokens", "cgroup_limit_bytes",
              "cgroup_peak_bytes", "cache_disk_bytes", "stall_seconds", "dtype", "notes", "wall_seconds"):
        if raw.get(k) is not None:
            out[k] = raw[k]
    return out


def physical_bounds(systems: dict[str, dict[str, Any]], bandwidth: float) -> dict[str, Any]:
    """moeserve's physical bounds on this machine, per offloaded system:
    compute-bound = all-resident per-token time (compute never waited for an expert);
    io-bound = compute-bound + the system's measured expert bytes per token read at ``bandwidth``
    (every miss read sequentially, nothing overlapped)."""
    res = systems.get("resident", {}).get("per_token_ms_median")
    out: dict[str, Any] = {"disk_bandwidth_bytes_per_s": bandwidth, "compute_bound_ms": res}
    for name in MOESERVE[1:]:
        s = systems.get(name, {})
        cache_bytes, gen = s.get("cache_disk_bytes"), s.get("generated_tokens")
        if res is None or cache_bytes is None or not gen or bandwidth <= 0:
            out[f"{name}_io_bound_ms"] = None
            continue
        out[f"{name}_io_bound_ms"] = res + cache_bytes / gen / bandwidth * 1000
    return out


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b is not None and b > 0 else None


def targets(systems: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's four targets on per-token median latency: met True/False, or None if unmeasured."""
    def ms(name: str) -> Optional[float]:
        s = systems.get(name, {})
        return None if s.get("error") else s.get("per_token_ms_median")
    auto = ms("auto")
    checks = [("auto <= 1.5x resident", _ratio(auto, ms("resident")), lambda r: r <= 1.5),
              ("auto >= 5x faster than accelerate", _ratio(ms("accelerate"), auto), lambda r: r >= 5),
              ("auto faster than llama.cpp (same memory cap)", _ratio(ms("llama.cpp"), auto), lambda r: r > 1),
              ("auto >= 1.3x faster than lru (no prefetch)", _ratio(ms("lru"), auto), lambda r: r >= 1.3),
              ("resident-int4 at least as fast as llama.cpp Q4_K_M resident (uncapped)",
               _ratio(ms("llama.cpp-q4_k_m-resident"), ms("resident-int4")), lambda r: r >= 1),
              ("auto-int4 >= 3x faster than llama.cpp Q4_K_M (same cap)",
               _ratio(ms("llama.cpp-q4_k_m"), ms("auto-int4")), lambda r: r >= 3),
              ("auto-int4 >= 4x faster than auto (bf16)", _ratio(auto, ms("auto-int4")), lambda r: r >= 4)]
    return [{"target": name, "ratio": r, "met": None if r is None else bool(ok(r))} for name, r, ok in checks]


def rows(systems: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name in SYSTEMS:
        s = systems.get(name)
        if s is None:
            continue
        if s.get("error") and s.get("per_token_ms_median") is None:
            out.append({"system": name, "per-token ms (median)": "error (below)"})
            continue
        mb = s.get("disk_bytes_per_token")
        rss = s.get("peak_rss_bytes")
        hr = s.get("hit_rate")
        out.append({
            "system": name + (" (error)" if s.get("error") else ""),
            "per-token ms (median)": s.get("per_token_ms_median"),
            "per-token ms (p90)": s.get("per_token_ms_p90"),
            "TTFT ms (median)": s.get("ttft_ms_median"),
            "tok/s at 4 concurrent": s.get("tokens_per_s_concurrent4"),
            "disk MB/token": None if mb is None else mb / 1e6,
            "hit rate": "n/a" if hr is None else f"{hr:.1%}",
            "peak RSS GB": None if rss is None else rss / 1e9,
            "measured on": (f"{s.get('prompts_c1', '?')} prompts x {s.get('tokens_per_request', '?')} tokens"
                            f" (then {s.get('prompts_c4', '?')} at 4)"),
        })
    return out


def render(result: dict[str, Any]) -> str:
    """The markdown report: setup line, table, bounds, targets, errors and notes."""
    systems = result["systems"]
    lines = [f"Machine: {result['machine']}", ""]
    if result.get("setup"):
        lines += [result["setup"], ""]
    lines += [table(rows(systems), COLUMNS), ""]
    b = result.get("bounds") or {}
    if b:
        bw = b.get("disk_bandwidth_bytes_per_s") or 0
        parts = [f"disk sequential read (O_DIRECT) {bw / 1e9:.2f} GB/s",
                 f"compute-bound (all resident) {_fmt_ms(b.get('compute_bound_ms'))}"]
        parts += [f"{n} if every miss were read at that bandwidth {_fmt_ms(b.get(f'{n}_io_bound_ms'))}"
                  for n in MOESERVE[1:]]
        lines += ["Physical bounds per token: " + "; ".join(parts) + ".", ""]
    for t in result.get("targets", []):
        state = "not measured" if t["met"] is None else ("met" if t["met"] else "NOT met")
        ratio = "" if t["ratio"] is None else f" (ratio {t['ratio']:.2f})"
        lines.append(f"- target {t['target']}: {state}{ratio}")
    for name in SYSTEMS:
        s = systems.get(name, {})
        if s.get("error"):
            lines.append(f"- {name} error: {s['error']}")
        if s.get("notes"):
            lines.append(f"- {name}: {s['notes']}")
    return "\n".join(lines) + "\n"


def _fmt_ms(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.1f} ms"


def error_entry(error: str, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """A system that produced no measurement: every number null, ``error`` says why."""
    out: dict[str, Any] = {k: None for k in SCHEMA_KEYS}
    out["error"] = error
    out.update(extra or {})
    return out


def check_schema(result: dict[str, Any], names: Sequence[str] = SYSTEMS) -> None:
    """Raise ValueError naming the first key of e2e.json that breaks the issue's schema."""
    if not isinstance(result.get("machine"), str):
        raise ValueError("e2e.json: 'machine' must be a string")
    for name in names:
        s = result["systems"].get(name)
        if s is None:
            raise ValueError(f"e2e.json: system {name!r} is missing")
        for k in SCHEMA_KEYS:
            if k not in s:
                raise ValueError(f"e2e.json: systems[{name!r}] lacks {k!r}")
        for k in SCHEMA_KEYS[:5]:
            if s[k] is not None and not isinstance(s[k], float):
                raise ValueError(f"e2e.json: systems[{name!r}][{k!r}] = {s[k]!r} is not a float")
        if s["peak_rss_bytes"] is not None and not isinstance(s["peak_rss_bytes"], int):
            raise ValueError(f"e2e.json: systems[{name!r}]['peak_rss_bytes'] is not an int")
