"""OLMoE: q/k RMSNorm over the whole projection (before the head split), optional clip_qkv,
softmax top-k routing (norm_topk_prob) in every layer, no shared expert."""
from __future__ import annotations

from typing import Optional

import torch

from engine.models.base import DecoderLM, HFConfig
from engine.models.common import Attention, Batch, KVCache, apply_rope
from engine.models.softmax_moe import build_softmax_moe, num_experts


class OlmoeAttention(Attention):
    """Attention with the whole-projection q/k norm, then q/k/v clamped to +-clip_qkv if set."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, layer: int,
                 bias: bool, eps: float, clip_qkv: Optional[float]) -> None:
        super().__init__(hidden, heads, kv_heads, head_dim, layer, bias=bias, o_bias=bias,
                         qk_norm_eps=eps, qk_norm_full=True)
        self.clip_qkv = clip_qkv

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: Batch,
                kv: KVCache) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.q_norm(self.q_proj(x)), self.k_norm(self.k_proj(x)), self.v_proj(x)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)        # [B, H, T, D]
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)     # [B, Hkv, T, D]
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.o_proj(kv.attend(self.layer, q, k, v, batch))


def build(cfg: HFConfig, context: int) -> DecoderLM:
    hidden, heads = cfg.req("hidden_size"), cfg.req("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim, eps = cfg.head_dim(), cfg.get("rms_norm_eps", 1e-5)
    bias, clip = bool(cfg.get("attention_bias", False)), cfg.get("clip_qkv")
    return build_softmax_moe(cfg, context,
                             lambda i: OlmoeAttention(hidden, heads, kv_heads, head_dim, i, bias, eps, clip),
                             tuple(range(cfg.req("num_hidden_layers"))), num_experts(cfg), None, eps)
