"""Multi-head latent attention (DeepSeek-V2/V3).

q comes from q_proj, or through the low-rank q_a_proj -> q_a_layernorm -> q_b_proj when
q_lora_rank is set; keys and values are decompressed from a kv_lora_rank latent by kv_b_proj,
plus one rope key part shared by all heads. The engine's KV cache stores the decompressed
k [heads, qk_nope + qk_rope] and v [heads, v_head_dim], so decode is plain attention.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from engine.models.common import Batch, KVCache, RMSNorm, Rotary, apply_rope

LORA_NORM_EPS = 1e-6   # transformers builds q_a/kv_a layernorms with the default eps, not rms_norm_eps


class FP32Rotary(Rotary):
    """cos/sin [B, 1, T, dim] kept in fp32: DeepSeek-V2 rotates in fp32 whatever the model dtype."""

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions][:, None], self.sin[positions][:, None]


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x0, x1), (x2, x3)... of x [B, H, T, D]. The output is de-interleaved
    (all rotated evens, then all odds): q and k share that permutation, so q.k is unchanged."""
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]         # cat(freqs, freqs): first half is per pair
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def softmax_scale(qk_head_dim: int, rope: dict[str, Any]) -> float:
    """1/sqrt(d), times mscale(factor, mscale_all_dim)^2 under yarn-style scaling (as transformers)."""
    scale = qk_head_dim ** -0.5
    mscale_all_dim = rope.get("mscale_all_dim") or 0
    if rope.get("rope_type", "default") != "default" and mscale_all_dim:
        factor = float(rope["factor"])
        m = 1.0 if factor <= 1 else 0.1 * mscale_all_dim * math.log(factor) + 1.0
        scale = scale * m * m
    return scale


class MLAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, q_lora_rank: Optional[int], kv_lora_rank: int,
                 qk_nope: int, qk_rope: int, v_dim: int, layer: int, scale: float, bias: bool,
                 rope_mode: str) -> None:
        """rope_mode: 'fp32_interleaved' (V2: pairs, computed in fp32), 'interleaved' (V3's
        rope_interleave) or 'half' (V3 with rope_interleave false: rotate_half layout)."""
        super().__init__()
        self.heads, self.layer, self.scale, self.rope_mode = heads, layer, scale, rope_mode
        self.qk_nope, self.qk_rope, self.v_dim, self.kv_lora_rank = qk_nope, qk_rope, v_dim, kv_lora_rank
        qk_head = qk_nope + qk_rope
        if q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, heads * qk_head, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = nn.Linear(q_lora_rank, heads * qk_head, bias=False)
        self.q_lora = q_lora_rank is not None
        self.kv_a_proj_with_mqa = nn.Linear(hidden, kv_lora_rank + qk_rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, LORA_NORM_EPS)
        self.kv_b_proj = nn.Linear(kv_lora_rank, heads * (qk_nope + v_dim), bias=False)
        self.o_proj = nn.Linear(heads * v_dim, hidden, bias=bias)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rope_mode == "fp32_interleaved":
            return rope_interleaved(x.float(), cos.float(), sin.float()).to(x.dtype)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return rope_interleaved(x, cos, sin) if self.rope_mode == "interleaved" else apply_rope(x, cos, sin)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: Batch,
                kv: KVCache) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q = q.view(b, t, self.heads, -1).transpose(1, 2)                    # [B, H, T, nope+rope]
        q_nope, q_rot = q.split([self.qk_nope, self.qk_rope], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope], dim=-1)
        k_rot = k_rot.view(b, 1, t, self.qk_rope)                           # [B, 1, T, rope]
        q_rot, k_rot = self._rope(q_rot, *rope), self._rope(k_rot, *rope)
        kv_up = self.kv_b_proj(self.kv_a_layernorm(latent))                  # [B, T, H*(nope+v)]
        kv_up = kv_up.view(b, t, self.heads, -1).transpose(1, 2)            # [B, H, T, nope+v]
        k_nope, v = kv_up.split([self.qk_nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(-1, self.heads, -1, -1)], dim=-1)  # [B, H, T, nope+rope]
        q = torch.cat([q_nope, q_rot], dim=-1)
        return self.o_proj(kv.attend(self.layer, q, k, v.contiguous(), batch, scale=self.scale))
