"""The small offloading setup the cache/offload.py tests share: the shape of the checkpoint the
``ckpt`` fixture writes (tests/cache/conftest.py), a provider over it, and a skewed router."""
from __future__ import annotations

import torch

from cache import policies
from cache.offload import OffloadedExpertProvider
from cache.policy import CachePolicy
from configs.cache import CacheConfig

L, E, K, I, H = 3, 8, 2, 16, 24
EXPERT_BYTES = 3 * I * H * 4          # slots hold float32


def make(sources, policy: str | CachePolicy = "lru", budget: str = str(K * EXPERT_BYTES),
         **cfg) -> OffloadedExpertProvider:
    pol = policy if isinstance(policy, CachePolicy) else policies.make_policy(policy, L, E, K, None)
    return OffloadedExpertProvider(sources, torch.device("cpu"), torch.float32,
                                   CacheConfig(expert_budget=budget, **cfg), pol)


def flat(w) -> torch.Tensor:
    return torch.cat([w.gate.reshape(-1), w.up.reshape(-1), w.down.reshape(-1)])


def routing(g: torch.Generator, tokens: int) -> torch.Tensor:
    """[tokens, K] distinct experts per token, skewed towards low ids like a real router."""
    probs = torch.linspace(2.0, 0.5, E)
    return torch.stack([torch.multinomial(probs, K, generator=g) for _ in range(tokens)])
