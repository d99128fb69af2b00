"""The end-to-end benchmark's markdown report and plot, from the e2e.json body (bench.e2e_report)."""
from __future__ import annotations

import os
from typing import Any, Optional

from bench.common import table

COLUMNS = ["system", "format", "decode ms/token (median; runs min-max)", "on common prompts", "p90", "TTFT ms", "prompt tok/s",
           "decode disk MB/token", "decode hit rate", "prefetch P/R", "floor ms", "no-overlap ms",
           "tok/s concurrent", "peak RSS GB", "measured on"]


def _f(v: Optional[float], digits: str = ".3g") -> str:
    return "" if v is None else format(v, digits) if abs(v) < 1000 else f"{v:.0f}"


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def system_row(name: str, s: dict[str, Any]) -> dict[str, Any]:
    if s["decode_ms_median"] is None:
        return {"system": name, "format": s["format"], COLUMNS[2]: "error (below)"}
    runs = s["runs"]
    spread = f" ({_f(min(runs))}-{_f(max(runs))})" if len(runs) > 1 else ""
    pr = ("" if s.get("prefetch_precision") is None else
          f"{_pct(s['prefetch_precision'])}/{_pct(s.get('prefetch_recall'))}")
    mb = s["decode_disk_bytes_per_token"]
    rss = s.get("cgroup_peak_bytes") or s["peak_rss_bytes"]
    conc = s["concurrency"]
    return {
        "system": name + (" (some runs failed)" if s["error"] else ""), "format": s["format"],
        COLUMNS[2]: _f(s["decode_ms_median"]) + spread, "on common prompts": _f(s.get("decode_ms_median_common")),
        "p90": _f(s["decode_ms_p90"]),
        "TTFT ms": _f(s["ttft_ms_median"]), "prompt tok/s": _f(s.get("prompt_tok_s")),
        "decode disk MB/token": None if mb is None else _f(mb / 1e6), "decode hit rate": _pct(s["decode_hit_rate"]),
        "prefetch P/R": pr, "floor ms": _f(s["floor_ms"]), "no-overlap ms": _f(s["no_overlap_ms"]),
        "tok/s concurrent": (_f(s["tok_s_concurrent"]) + f" ({conc})") if s["tok_s_concurrent"] else conc,
        "peak RSS GB": None if not rss else f"{rss / 1e9:.2f}",
        "measured on": f"prompts {s.get('prompts')} x {s.get('tokens_per_request')} tokens x {len(runs)} runs",
    }


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"Machine: {m.get('cpu')}; {m.get('ram_gib')} GiB RAM; disk read-ahead {m.get('read_ahead_kb')} KiB "
             f"({m.get('block_device')}); disk bandwidth (best of sequential and parallel O_DIRECT reads, "
             f"before and after) {m.get('disk_bandwidth_bytes_per_s', 0) / 1e9:.2f} GB/s", "",
             f"Versions: {m.get('versions')}; llama.cpp build: {m.get('llama_cpp_build')}", ""]
    if result.get("setup"):
        lines += [result["setup"], ""]
    if result.get("incomplete"):
        lines += ["**Incomplete run** (these rows have fewer runs than the others): "
                  + "; ".join(result["incomplete"]), ""]
    lines += [f"'On common prompts': every system on the prompts all of them ran ({result['common_prompts']}). "
              "Ratios: run by run in the same repeat, on the prompts both sides ran; median (min-max) over "
              "the repeats.", ""]
    for sc in result["scenarios"]:
        cap = sc["memory_cap_bytes"]
        lines += [f"### {sc['name']}" + (f": cap {cap / 1e9:.2f} GB" if cap else ": no cap"), "", sc["why"], "",
                  table([system_row(n, s) for n, s in sc["systems"].items()], COLUMNS), ""]
        if sc["ratios"]:
            rows = [{"ratio": k, "median": _f(r["median"]),
                     "min-max": "" if r["min"] is None else f"{_f(r['min'])}-{_f(r['max'])}",
                     "runs": len(r["runs"]), "prompts": r.get("prompts")} for k, r in sc["ratios"].items()]
            lines += [table(rows, ["ratio", "median", "min-max", "runs", "prompts"]), ""]
    lines.append("Targets (met only when the median meets it):")
    for t in result["targets"]:
        state = "not measured" if t["met"] is None else ("met" if t["met"] else "NOT met")
        spread = "" if t["median"] is None else f" (median {t['median']:.2f}, {t['min']:.2f}-{t['max']:.2f}, {t['runs']} runs)"
        lines.append(f"- {t['target']}: {state}{spread}")
    errs = result["method_errors"]
    lines += ["", "Method errors (a measurement below its floor): " + ("none" if not errs else "")]
    lines += [f"- {e}" for e in errs]
    lines += ["", "Errors and notes:"]
    for sc in result["scenarios"]:
        for n, s in sc["systems"].items():
            if s["error"]:
                lines.append(f"- {sc['name']}/{n} error: {s['error']}")
            if s.get("notes"):
                lines.append(f"- {sc['name']}/{n}: {s['notes']}")
    return "\n".join(lines) + "\n"


def plot(path: str, result: dict[str, Any]) -> None:
    """Decode ms/token per system and scenario, error bars = min-max over the runs (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scs = [sc for sc in result["scenarios"] if any(s["runs"] for s in sc["systems"].values())]
    fig, axes = plt.subplots(1, len(scs), figsize=(5 * len(scs), 4.2), squeeze=False)
    for ax, sc in zip(axes[0], scs):
        names = [n for n, s in sc["systems"].items() if s["runs"]]
        meds = [sc["systems"][n]["decode_ms_median"] for n in names]
        lo = [m - min(sc["systems"][n]["runs"]) for n, m in zip(names, meds)]
        hi = [max(sc["systems"][n]["runs"]) - m for n, m in zip(names, meds)]
        colors = ["tab:blue" if not n.startswith(("llama", "acc")) else "tab:gray" for n in names]
        ax.bar(names, meds, yerr=[lo, hi], color=colors, capsize=3)
        floors = [sc["systems"][n]["floor_ms"] for n in names]
        ax.scatter([i for i, f in enumerate(floors) if f], [f for f in floors if f], marker="_", s=300,
                   color="red", label="floor", zorder=3)
        ax.set_yscale("log")
        ax.set_title(sc["name"] + (f" (cap {sc['memory_cap_bytes'] / 1e9:.2f} GB)" if sc["memory_cap_bytes"] else ""))
        ax.set_ylabel("decode ms/token (median; min-max)")
        ax.tick_params(axis="x", rotation=60, labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
