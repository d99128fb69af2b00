"""Expert cache configuration: tier budgets, policy, traces."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from configs.base import ConfigError, parse_bytes

POLICIES = ("lru", "lfu", "moe-infinity", "auto")
PREFETCH = ("auto", "on", "off")
CPU_EXPERTS = ("auto", "off")
_BOOL_WORDS = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}


def parse_budget(text: str, total_bytes: int, field_name: str = "expert_budget") -> int:
    """'25%' of ``total_bytes``, 'all', or an absolute size such as '2GiB'."""
    t = str(text).strip().lower()
    if t in ("all", "100%"):
        return total_bytes
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*%", t)
    if m:
        return int(total_bytes * float(m.group(1)) / 100)
    return parse_bytes(t, field_name)


def _check_budget(name: str, value: str) -> None:
    t = str(value).strip().lower()
    if t == "all":
        return
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*%", t)
    if m:
        if not 0 < float(m.group(1)) <= 100:
            raise ConfigError(name, value, "a percentage must lie in (0, 100]")
        return
    if parse_bytes(t, name) <= 0:
        raise ConfigError(name, value, "must be positive")


@dataclass(frozen=True)
class CacheConfig:
    """Expert cache: budgets per tier, eviction/prefetch policy and activation traces."""

    expert_budget: str = field(default="all", metadata={
        "help": "bytes of routed experts kept on the compute device: 'all', a size such as "
                "2GiB, or a fraction of all experts such as 25%"})
    host_budget: str = field(default="auto", metadata={
        "help": "bytes of experts kept in pinned host RAM on a CUDA machine (ignored on CPU): "
                "'auto' holds every expert if they fit in the RAM available at start-up less "
                "10% of RAM (at least 4 GiB) for the rest, else that much, the disk beneath; "
                "'all', a size such as 32GiB, or a percentage of all experts"})
    policy: str = field(default="auto", metadata={
        "help": "eviction and prefetch policy", "choices": POLICIES})
    trace_store: Optional[str] = field(default=None, metadata={
        "help": "file holding the collection of past activation matrices, loaded at start-up "
                "and saved as requests finish", "metavar": "PATH"})
    collection_capacity: int = field(default=120, metadata={
        "help": "most past activation matrices kept for prediction"})
    record_trace: Optional[str] = field(default=None, metadata={
        "help": "append every finished request's routing to this moe-trace v2 JSONL file (v1 plus the next layer's look-ahead)",
        "metavar": "FILE"})
    io_threads: int = field(default=4, metadata={
        "help": "background threads reading experts (several reads in flight)"})
    prefetch: str = field(default="auto", metadata={
        "help": "prefetch predicted experts in the background: on; off (demand loads only); auto "
                "(on): reads for the next layers' likely experts (the next router's look-ahead, "
                "the routing statistics) start while the current layer computes, demand reads "
                "first, paced by the measured disk bandwidth and layer time; on the 64x model at "
                "25% on 2-core CPUs 1.07-1.17x fewer ms per token (medians of 5 repeats, four runs on "
                "three VMs), 1.10-1.14x the disk bytes (bench/prefetch.py)",
        "choices": PREFETCH})
    cpu_experts: str = field(default="off", metadata={
        "help": "CUDA with experts beyond VRAM: auto computes a missed expert on the CPU from its "
                "host RAM copy when that measures cheaper than copying it to the GPU (link "
                "bandwidth and CPU time timed at start-up and while serving; typical for one or "
                "two rows at batch 1), as Fiddler and llama.cpp's --cpu-moe do; outputs are then "
                "not bit-identical to all-resident. off: every miss is copied (ignored on CPU)",
        "choices": CPU_EXPERTS})

    def expert_budget_bytes(self, total_bytes: int) -> int:
        """``expert_budget`` in bytes for experts totalling ``total_bytes`` ('all' and '100%'
        are the same number): the one resolution the wiring and the cache share."""
        return parse_budget(self.expert_budget, total_bytes, "expert_budget")

    def prefetch_enabled(self, device_type: str) -> bool:
        """Whether to prefetch with experts served to a ``device_type`` ('cpu' or 'cuda') device."""
        return self.prefetch in ("on", "auto")

    def __post_init__(self) -> None:
        pf = self.prefetch
        pf = ("on" if pf else "off") if isinstance(pf, bool) else _BOOL_WORDS.get(str(pf).lower(), str(pf).lower())
        if pf not in PREFETCH:
            raise ConfigError("prefetch", self.prefetch, f"choose one of {', '.join(PREFETCH)}")
        object.__setattr__(self, "prefetch", pf)
        if self.cpu_experts not in CPU_EXPERTS:
            raise ConfigError("cpu_experts", self.cpu_experts, f"choose one of {', '.join(CPU_EXPERTS)}")
        if self.policy not in POLICIES:
            raise ConfigError("policy", self.policy, f"choose one of {', '.join(POLICIES)}")
        _check_budget("expert_budget", self.expert_budget)
        if str(self.host_budget).strip().lower() != "auto":
            _check_budget("host_budget", self.host_budget)
        if not 1 <= self.collection_capacity <= 100_000:
            raise ConfigError("collection_capacity", self.collection_capacity, "must be in 1..100000")
        if not 1 <= self.io_threads <= 64:
            raise ConfigError("io_threads", self.io_threads, "must be in 1..64")
