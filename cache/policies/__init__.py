"""Cache policies by name (see cache/policy.py for the interface)."""
from __future__ import annotations

from typing import Optional

from cache.eam import EAMCollection
from cache.policies.auto import AutoPolicy
from cache.policies.lfu import LFUPolicy
from cache.policies.lru import LRUPolicy
from cache.policies.moe_infinity import MoEInfinityPolicy
from cache.policy import CachePolicy

POLICY_NAMES: tuple[str, ...] = ("lru", "lfu", "moe-infinity", "auto")


def make_policy(name: str, num_layers: int, num_experts: int, top_k: int,
                collection: Optional[EAMCollection] = None) -> CachePolicy:
    """A fresh policy; ``collection`` (past activation matrices) feeds the predicting ones."""
    if name == "lru":
        return LRUPolicy(num_layers, num_experts, top_k)
    if name == "lfu":
        return LFUPolicy(num_layers, num_experts, top_k)
    if name == "moe-infinity":
        return MoEInfinityPolicy(num_layers, num_experts, top_k, collection)
    if name == "auto":
        return AutoPolicy(num_layers, num_experts, top_k, collection)
    raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")


__all__ = ["POLICY_NAMES", "make_policy", "AutoPolicy", "LFUPolicy", "LRUPolicy",
           "MoEInfinityPolicy"]
