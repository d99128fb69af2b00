"""Pure parts of the end-to-end benchmark: raw worker runs -> per-system entries, bounds, ratios with
their spread, the e2e.json schema and the markdown report.

No I/O and no torch here, so tests/bench can check the maths on made-up numbers. A raw run is what
bench.e2e_worker prints plus "repeat": {"requests": [{"prompt", "prompt_tokens", "ttft_ms",
"decode_ms": [gaps], "prefill_disk_bytes", "decode_disk_bytes", "decode_hits", ...}], "concurrent":
{"requests", "tokens", "seconds", "mode"} | None, "peak_rss_bytes", "error", ...}.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

from bench.common import median, percentile
from bench.e2e_plan import SYSTEMS, Ratio, Scenario

Run = dict[str, Any]
# the schema's per-system keys (issue 10); entries carry more
SCHEMA_KEYS = ("format", "decode_ms_median", "decode_ms_p90", "ttft_ms_median", "decode_disk_bytes_per_token",
               "decode_hit_rate", "floor_ms", "no_overlap_ms", "tok_s_concurrent", "concurrency",
               "peak_rss_bytes", "runs", "error")
# (ratio label suffix, op, threshold): a target is met when the ratio's *median* passes
TARGETS = (("bf16-25%: auto-int4 speedup over llama.cpp-q4_k_m", ">=", 1.0),
           ("bf16-25%: auto-int4 speedup over accelerate", ">=", 5.0),
           ("bf16-25%: auto-int4 speedup over lru-int4", ">=", 1.3),
           ("bf16-25%: auto-int4 slowdown vs resident-int4 (uncapped)", "<=", 1.5),
           ("bf16-25%: auto-int4 speedup over auto (defaults)", ">=", 4.0),
           ("int4-25%: auto-int4 speedup over llama.cpp-q4_k_m", ">=", 3.0),
           ("uncapped: resident-int4 speedup over llama.cpp-q4_k_m", ">=", 1.0))


def ok_runs(runs: Iterable[Run]) -> list[Run]:
    return [r for r in runs if not r.get("error") and r.get("requests")]


def prompts_of(runs: Iterable[Run]) -> set[int]:
    """Prompts measured in *every* one of these runs (a slow system may stop after the first)."""
    sets = [{q["prompt"] for q in r["requests"]} for r in ok_runs(runs)]
    return set.intersection(*sets) if sets else set()


def common_prompts(raw: dict[str, dict[str, list[Run]]]) -> set[int]:
    """The prompts every system of every scenario measured: the sample the ratios compare on."""
    sets = [prompts_of(runs) for by in raw.values() for runs in by.values() if ok_runs(runs)]
    return set.intersection(*sets) if sets else set()


def _requests(run: Run, prompts: Optional[set[int]]) -> list[dict[str, Any]]:
    return [q for q in run["requests"] if prompts is None or q["prompt"] in prompts]


def run_median(run: Run, prompts: Optional[set[int]] = None) -> Optional[float]:
    """Median decode gap (ms per token) of one run over ``prompts`` (None: all it measured)."""
    gaps = [g for q in _requests(run, prompts) for g in q["decode_ms"]]
    return median(gaps) if gaps else None


def _sum(reqs: Sequence[dict[str, Any]], key: str) -> Optional[float]:
    vals = [q[key] for q in reqs if q.get(key) is not None]
    return float(sum(vals)) if vals else None


def floors(compute_ms: Optional[float], io_bytes_per_token: Optional[float],
           bandwidth: float) -> tuple[Optional[float], Optional[float]]:
    """(perfect-overlap floor, no-overlap estimate) of one decode step: the all-resident compute time
    and the decode miss bytes read at the disk's best measured bandwidth; max(...) and sum(...)."""
    if compute_ms is None or io_bytes_per_token is None or bandwidth <= 0:
        return None, None
    io_ms = io_bytes_per_token / bandwidth * 1000
    return max(compute_ms, io_ms), compute_ms + io_ms


def summarize(system: str, runs: list[Run], reference: Optional[list[Run]], bandwidth: float) -> dict[str, Any]:
    """One system of one scenario over its repeats -> its e2e.json entry."""
    good = ok_runs(runs)
    failed = [r["error"] for r in runs if r.get("error")]
    entry: dict[str, Any] = {k: None for k in SCHEMA_KEYS}
    entry.update(format=SYSTEMS[system].fmt, runs=[], concurrency="not measured", repeats=len(runs),
                 error=None if not failed else f"{len(failed)} of {len(runs)} runs failed: {failed[0]}")
    if not runs:
        entry["error"] = "not run (the benchmark stopped before this system's turn)"
    if not good:
        return entry
    mine = prompts_of(good)
    reqs = [q for r in good for q in _requests(r, mine)]
    gaps = [g for q in reqs for g in q["decode_ms"]]
    decoded = sum(len(q["decode_ms"]) for q in reqs)
    meds = [m for m in (run_median(r, mine) for r in good) if m is not None]
    entry["runs"] = meds
    entry["decode_ms_median"] = median(meds) if meds else None
    entry["decode_ms_p90"] = percentile(gaps, 90) if gaps else None
    ttft = [q["ttft_ms"] for q in reqs]
    entry["ttft_ms_median"] = median(ttft)
    entry["prompt_tok_s"] = sum(q["prompt_tokens"] for q in reqs) / (sum(ttft) / 1000) if sum(ttft) else None
    disk = _sum(reqs, "decode_disk_bytes")
    entry["decode_disk_bytes_per_token"] = disk / decoded if disk is not None and decoded else None
    pre = _sum(reqs, "prefill_disk_bytes")
    entry["prefill_disk_bytes_per_request"] = pre / len(reqs) if pre is not None else None
    hits, misses = _sum(reqs, "decode_hits"), _sum(reqs, "decode_misses")
    if hits is not None and misses is not None and hits + misses > 0:
        entry["decode_hit_rate"] = hits / (hits + misses)
    issued, used = _sum(reqs, "decode_prefetch_issued"), _sum(reqs, "decode_prefetch_used")
    if issued:
        entry["prefetch_precision"] = used / issued
        entry["prefetch_recall"] = used / (used + (misses or 0.0)) if used + (misses or 0.0) else None
    compute = None
    if reference:
        ref_meds = [m for m in (run_median(r, mine) for r in ok_runs(reference)) if m is not None]
        # the fastest the reference ever ran: noise between runs must not lift a floor above a truth
        compute = min(ref_meds) if ref_meds and prompts_of(reference) >= mine else None
    entry["compute_ms"] = compute
    entry["floor_ms"], entry["no_overlap_ms"] = floors(compute, entry["decode_disk_bytes_per_token"], bandwidth)
    conc = [r["concurrent"] for r in good if r.get("concurrent")]
    if conc:
        entry["tok_s_concurrent"] = median([c["tokens"] / c["seconds"] for c in conc])
        entry["concurrency"] = f"{conc[0]['requests']} {conc[0]['mode']}"
    else:       # the workers skip it only after stopping early for slowness
        entry["concurrency"] = "not measured (slower than --slow-ms per token)"
    entry["peak_rss_bytes"] = max(int(r.get("peak_rss_bytes") or 0) for r in good) or None
    cg = [int(r["cgroup_peak_bytes"]) for r in good if r.get("cgroup_peak_bytes")]
    entry["cgroup_peak_bytes"] = max(cg) if cg else None
    entry["prompts"] = sorted(mine)
    entry["tokens_per_request"] = len(reqs[0]["decode_ms"]) + 1 if reqs else None
    entry["notes"] = good[-1].get("notes")
    return entry


def ratio_stats(ratio: Ratio, raw: dict[str, dict[str, list[Run]]]) -> dict[str, Any]:
    """num/den per repeat (only repeats where both ran) on the prompts both sides ran in every
    run, median and min-max."""
    runs = {at: ok_runs(raw.get(at[0], {}).get(at[1], [])) for at in (ratio.num, ratio.den)}
    prompts = prompts_of(runs[ratio.num]) & prompts_of(runs[ratio.den])

    def by_repeat(at: tuple[str, str]) -> dict[int, float]:
        out = {}
        for r in runs[at]:
            m = run_median(r, prompts)
            if m is not None:
                out[int(r["repeat"])] = m
        return out
    num, den = by_repeat(ratio.num), by_repeat(ratio.den)
    vals = [num[k] / den[k] for k in sorted(num.keys() & den.keys()) if den[k] > 0]
    if not vals:
        return {"median": None, "min": None, "max": None, "runs": [], "prompts": sorted(prompts)}
    return {"median": median(vals), "min": min(vals), "max": max(vals), "runs": vals, "prompts": sorted(prompts)}


def target_verdicts(ratios: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for label, op, limit in TARGETS:
        r = ratios.get(label, {})
        m = r.get("median")
        met = None if m is None else (m >= limit if op == ">=" else m <= limit)
        out.append({"target": f"{label} {op} {limit:g}", "median": m, "min": r.get("min"),
                    "max": r.get("max"), "runs": len(r.get("runs", [])), "met": met})
    return out


def method_errors(scenarios: list[dict[str, Any]]) -> list[str]:
    """Every measurement below its own floor: the floor or the measurement is wrong, never a win."""
    out = []
    for sc in scenarios:
        for name, s in sc["systems"].items():
            if s["decode_ms_median"] is not None and s["floor_ms"] is not None \
                    and s["decode_ms_median"] < s["floor_ms"]:
                out.append(f"{sc['name']}/{name}: decode {s['decode_ms_median']:.1f} ms/token is below its "
                           f"floor {s['floor_ms']:.1f} ms (an error in the method, not a success)")
    return out


def build(plan: list[Scenario], raw: dict[str, dict[str, list[Run]]], ratios: list[Ratio],
          bandwidth: float) -> dict[str, Any]:
    """Every scenario's systems and ratios, the targets and the method errors (e2e.json's body)."""
    common = common_prompts(raw)
    refs = raw.get("uncapped", {})
    scenarios, all_ratios = [], {}
    for sc in plan:
        systems = {n: summarize(n, raw.get(sc.name, {}).get(n, []), refs.get(SYSTEMS[n].reference), bandwidth)
                   for n in sc.systems}
        for name, entry in systems.items():           # every system also on the prompts all ran
            meds = [m for m in (run_median(r, common) for r in ok_runs(raw.get(sc.name, {}).get(name, [])))
                    if m is not None]
            entry["decode_ms_median_common"] = median(meds) if meds else None
        rs = {r.label: ratio_stats(r, raw) for r in ratios if r.label.startswith(f"{sc.name}: ")}
        all_ratios.update(rs)
        scenarios.append({"name": sc.name, "memory_cap_bytes": sc.memory_cap_bytes,
                          "expert_budget_bytes": sc.expert_budget_bytes, "why": sc.why,
                          "systems": systems, "ratios": rs})
    counts = [len(runs) for by in raw.values() for runs in by.values()]
    missing = [f"{sc.name}/{n}: {len(raw.get(sc.name, {}).get(n, []))} of {max(counts, default=0)} runs"
               for sc in plan for n in sc.systems if len(raw.get(sc.name, {}).get(n, [])) < max(counts, default=0)]
    return {"scenarios": scenarios, "common_prompts": sorted(common), "targets": target_verdicts(all_ratios),
            "method_errors": method_errors(scenarios), "incomplete": missing}


def check_schema(result: dict[str, Any]) -> None:
    """Raise ValueError naming the first key of e2e.json that breaks the issue's schema."""
    if not isinstance(result.get("machine"), dict):
        raise ValueError("e2e.json: 'machine' must be an object")
    for sc in result["scenarios"]:
        for k in ("name", "memory_cap_bytes", "systems", "ratios"):
            if k not in sc:
                raise ValueError(f"e2e.json: scenario lacks {k!r}")
        for name, s in sc["systems"].items():
            for k in SCHEMA_KEYS:
                if k not in s:
                    raise ValueError(f"e2e.json: {sc['name']}/{name} lacks {k!r}")
            for k in ("decode_ms_median", "decode_ms_p90", "ttft_ms_median", "floor_ms", "tok_s_concurrent"):
                if s[k] is not None and not isinstance(s[k], float):
                    raise ValueError(f"e2e.json: {sc['name']}/{name}/{k} = {s[k]!r} is not a float")
            if not isinstance(s["runs"], list):
                raise ValueError(f"e2e.json: {sc['name']}/{name}/runs is not a list")
        for label, r in sc["ratios"].items():
            if set(r) < {"median", "min", "max"}:
                raise ValueError(f"e2e.json: ratio {label!r} lacks median/min/max")
