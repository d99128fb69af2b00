"""Fixtures of the cache tests."""
from __future__ import annotations

import pytest
import torch

from tests.cache.offload_setup import E, H, I, L
from tests.cache.synth import write_experts


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory):
    """A bf16 checkpoint of L layers x E experts in two shards: (sources, expert weights)."""
    d = tmp_path_factory.mktemp("ckpt")
    return write_experts(str(d), L, E, I, H, dtype=torch.bfloat16, shards=2)
