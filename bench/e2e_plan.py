"""What the end-to-end benchmark runs: its systems, its memory scenarios and the order of the runs.

Pure (no I/O, no torch), so tests/bench can check the bookkeeping. One source of truth for system
names: SYSTEMS. A system's name is its policy or peer plus a format suffix (``auto-int4``,
``llama.cpp-q4_k_m``); ``resident*`` rows keep every expert in RAM and only run uncapped, where they
give the compute floor of the offloaded rows of the same format.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class System:
    name: str
    kind: str                     # "moeserve" | "llama.cpp" | "accelerate"
    fmt: str                      # moeserve: none|int8|int4; llama.cpp: bf16|q8_0|q4_k_m; accelerate: bf16
    policy: Optional[str] = None  # moeserve cache policy; None: every expert resident
    prefetch: str = "auto"        # moeserve --prefetch
    dtype: str = "auto"           # moeserve --dtype (auto: the user's default)

    @property
    def reference(self) -> str:
        """The system whose uncapped run is this one's all-resident compute time, same format."""
        if self.kind != "moeserve":
            return self.name
        return "resident" if self.fmt == "none" else f"resident-{self.fmt}"


_SYSTEMS = (
    System("resident", "moeserve", "none"),
    System("resident-int8", "moeserve", "int8"),
    System("resident-int4", "moeserve", "int4"),
    System("auto", "moeserve", "none", "auto"),                 # the user's defaults, nothing forced
    System("auto-int8", "moeserve", "int8", "auto"),
    System("auto-int4", "moeserve", "int4", "auto"),
    System("lru-int4", "moeserve", "int4", "lru", prefetch="off"),
    System("moe-infinity-int4", "moeserve", "int4", "moe-infinity", prefetch="on"),
    System("lru", "moeserve", "none", "lru", prefetch="off"),
    System("moe-infinity", "moeserve", "none", "moe-infinity", prefetch="on"),
    System("llama.cpp-bf16", "llama.cpp", "bf16"),
    System("llama.cpp-q8_0", "llama.cpp", "q8_0"),
    System("llama.cpp-q4_k_m", "llama.cpp", "q4_k_m"),
    System("accelerate", "accelerate", "bf16"),
)
SYSTEMS: dict[str, System] = {s.name: s for s in _SYSTEMS}
QUANT_OF_PEER = {"q8_0": "int8", "q4_k_m": "int4", "bf16": "none"}   # moeserve format of equal size


@dataclass(frozen=True)
class Scenario:
    name: str
    memory_cap_bytes: Optional[int]       # None: no cgroup (the all-resident references)
    expert_budget_bytes: Optional[int]    # moeserve's --expert-budget inside the cap
    systems: tuple[str, ...]
    why: str


def cgroup_limit_bytes(expert_bytes: int, budget_fraction: float, dense_bytes: int, allowance: int) -> int:
    """A scenario's memory cap: a share of the expert bytes + the dense weights + a fixed allowance
    for the runtime (interpreter, KV cache, buffers), rounded up to a 4 KiB page."""
    if not 0 < budget_fraction <= 1:
        raise ValueError(f"invalid budget_fraction={budget_fraction}: must be in (0, 1]")
    if min(expert_bytes, dense_bytes, allowance) < 0:
        raise ValueError("expert_bytes, dense_bytes and allowance must not be negative")
    raw = int(math.ceil(expert_bytes * budget_fraction)) + dense_bytes + allowance
    return -(-raw // 4096) * 4096


def parse_fraction(budget: str) -> float:
    """'25%' -> 0.25 (the benchmark's budgets are always a share of some expert bytes)."""
    t = budget.strip()
    if not t.endswith("%"):
        raise ValueError(f"invalid budget={budget!r}: the benchmark needs a percentage such as 25%")
    return float(t[:-1]) / 100


DEFAULT_SCENARIOS = {
    "bf16-25%": ("auto", "auto-int8", "auto-int4", "lru-int4", "moe-infinity-int4",
                 "llama.cpp-bf16", "llama.cpp-q8_0", "llama.cpp-q4_k_m", "accelerate"),
    "int4-25%": ("auto-int4", "lru-int4", "llama.cpp-q4_k_m"),
}


def scenarios(sizes: dict[str, tuple[int, int]], allowance: int,
              chosen: Optional[dict[str, Sequence[str]]] = None) -> list[Scenario]:
    """The uncapped references plus one capped scenario per entry of ``chosen``.

    sizes: moeserve format (none/int8/int4) -> (expert bytes, dense bytes) as stored. A scenario
    named ``<fmt>-<pct>%`` caps every system at pct of that format's expert bytes + dense + allowance;
    moeserve rows get the cap minus dense and allowance as a byte budget, whatever their own format."""
    chosen = dict(DEFAULT_SCENARIOS if chosen is None else chosen)
    refs: list[str] = []
    for name in (n for names in chosen.values() for n in names):
        ref = SYSTEMS[name].reference
        if ref not in refs:
            refs.append(ref)
    refs.sort(key=list(SYSTEMS).index)
    out = [Scenario("uncapped", None, None, tuple(refs),
                    "every system with all its weights in RAM: the compute floor of the capped rows")]
    base_d = sizes["none"][1]
    for name, names in chosen.items():
        fmt, _, pct = name.partition("-")
        key = {"bf16": "none"}.get(fmt, fmt)
        if key not in sizes or not pct.endswith("%"):
            raise ValueError(f"invalid scenario {name!r}: expected <bf16|int8|int4>-<percent>%")
        experts, _ = sizes[key]
        cap = cgroup_limit_bytes(experts, parse_fraction(pct), base_d, allowance)
        budget = cap - base_d - allowance
        out.append(Scenario(name, cap, budget, tuple(names),
                            f"{pct} of the {fmt} expert bytes ({budget / 1e9:.2f} GB) + dense "
                            f"({base_d / 1e9:.2f} GB) + {allowance >> 20} MiB, every system in a cgroup"))
    return out


def run_order(names: Sequence[str], repeat: int) -> list[str]:
    """Systems of one scenario in the order of repeat ``repeat``: forward, then backward, ... so that
    no system always runs first (warm machine) or last (a neighbour's load)."""
    return list(names) if repeat % 2 == 0 else list(reversed(names))


@dataclass(frozen=True)
class Ratio:
    """num ms / den ms, run by run (same repeat): > 1 means ``den`` is faster."""
    label: str
    num: tuple[str, str]          # (scenario, system)
    den: tuple[str, str]


def ratio_pairs(plan: Sequence[Scenario]) -> list[Ratio]:
    """The headline ratios: in each capped scenario, its best moeserve row against every peer, auto
    against lru and moe-infinity at the same format, defaults against int4; and every offloaded
    moeserve row against its all-resident reference (its slowdown from offloading)."""
    out: list[Ratio] = []
    refs = next((set(s.systems) for s in plan if s.memory_cap_bytes is None), set())
    for sc in plan:
        if sc.memory_cap_bytes is None:      # moeserve vs llama.cpp at the same size, all in RAM
            for peer, fmt in QUANT_OF_PEER.items():
                mine = SYSTEMS["resident" if fmt == "none" else f"resident-{fmt}"].name
                if mine in sc.systems and f"llama.cpp-{peer}" in sc.systems:
                    out.append(Ratio(f"uncapped: {mine} speedup over llama.cpp-{peer}",
                                     (sc.name, f"llama.cpp-{peer}"), (sc.name, mine)))
            continue
        have = set(sc.systems)
        best = next((n for n in ("auto-int4", "auto-int8", "auto") if n in have), None)
        at = lambda n: (sc.name, n)   # noqa: E731
        for peer in sc.systems:
            if SYSTEMS[peer].kind != "moeserve" and best:
                out.append(Ratio(f"{sc.name}: {best} speedup over {peer}", at(peer), at(best)))
        for sfx in ("", "-int8", "-int4"):
            for other in (f"lru{sfx}", f"moe-infinity{sfx}"):
                if f"auto{sfx}" in have and other in have:
                    out.append(Ratio(f"{sc.name}: auto{sfx} speedup over {other}", at(other), at(f"auto{sfx}")))
        if "auto" in have and "auto-int4" in have:
            out.append(Ratio(f"{sc.name}: auto-int4 speedup over auto (defaults)", at("auto"), at("auto-int4")))
        for name in sc.systems:
            sys_ = SYSTEMS[name]
            if sys_.kind == "moeserve" and sys_.policy and sys_.reference in refs:
                out.append(Ratio(f"{sc.name}: {name} slowdown vs {sys_.reference} (uncapped)", at(name),
                                 ("uncapped", sys_.reference)))
    return out
