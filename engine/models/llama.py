"""Llama: the dense baseline (no routed experts); SmolLM2 is one."""
from __future__ import annotations

from engine.models.base import DecoderLayer, DecoderLM, HFConfig, KVSpec
from engine.models.common import Attention, DenseMLP, Rotary, rope_parameters


def build(cfg: HFConfig, context: int) -> DecoderLM:
    hidden, n_layers = cfg.req("hidden_size"), cfg.req("num_hidden_layers")
    heads = cfg.req("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim, eps = cfg.head_dim(), cfg.get("rms_norm_eps", 1e-6)
    bias = bool(cfg.get("attention_bias", False))
    layers = [DecoderLayer(Attention(hidden, heads, kv_heads, head_dim, i, bias=bias, o_bias=bias),
                           DenseMLP(hidden, cfg.req("intermediate_size")), hidden, eps)
              for i in range(n_layers)]
    return DecoderLM(cfg.req("vocab_size"), hidden, layers, eps,
                     Rotary(head_dim, rope_parameters(cfg.raw), context), None,
                     KVSpec(n_layers, kv_heads, head_dim, head_dim),
                     tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
