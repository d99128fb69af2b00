"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): biased q/k/v, softmax top-k routing plus a shared
expert gated by sigmoid(shared_expert_gate(x)); mlp_only_layers / decoder_sparse_step make some
layers dense (only MoE layers count in the MoE layer index)."""
from __future__ import annotations

from engine.models.base import DecoderLM, HFConfig
from engine.models.common import Attention
from engine.models.softmax_moe import (build_softmax_moe, num_experts, reject_sliding_window,
                                       sparse_step_layers)


def build(cfg: HFConfig, context: int) -> DecoderLM:
    reject_sliding_window(cfg)
    hidden, heads = cfg.req("hidden_size"), cfg.req("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim, bias = cfg.head_dim(), bool(cfg.get("qkv_bias", True))   # qkv_bias is v5's name; always on before
    experts = num_experts(cfg)
    moe_layers = sparse_step_layers(cfg, cfg.req("num_hidden_layers")) if experts > 0 else ()
    return build_softmax_moe(cfg, context, lambda i: Attention(hidden, heads, kv_heads, head_dim, i, bias=bias),
                             moe_layers, experts, cfg.get("shared_expert_intermediate_size"),
                             cfg.get("rms_norm_eps", 1e-6))
