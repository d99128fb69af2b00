"""Qwen3-MoE: per-head q/k RMSNorm before rope, softmax top-k routing (norm_topk_prob), no
shared expert; mlp_only_layers / decoder_sparse_step as in qwen2_moe."""
from __future__ import annotations

from engine.models.base import DecoderLM, HFConfig
from engine.models.common import Attention
from engine.models.softmax_moe import (build_softmax_moe, num_experts, reject_sliding_window,
                                       sparse_step_layers)


def build(cfg: HFConfig, context: int) -> DecoderLM:
    reject_sliding_window(cfg)
    hidden, heads = cfg.req("hidden_size"), cfg.req("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim, eps = cfg.head_dim(), cfg.get("rms_norm_eps", 1e-6)
    bias = bool(cfg.get("attention_bias", False))
    experts = num_experts(cfg)
    moe_layers = sparse_step_layers(cfg, cfg.req("num_hidden_layers")) if experts > 0 else ()
    return build_softmax_moe(cfg, context,
                             lambda i: Attention(hidden, heads, kv_heads, head_dim, i, bias=bias,
                                                 o_bias=bias, qk_norm_eps=eps),
                             moe_layers, experts, None, eps)
