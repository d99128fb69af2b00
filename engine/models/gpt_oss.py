"""OpenAI gpt-oss (gpt_oss: gpt-oss-20b, gpt-oss-120b): grouped-query attention with biases,
one learned sink logit per head, and a 128-token sliding window on every other layer (the
config's layer_types); yarn rope; a router with a bias whose top-k logits are softmaxed; experts
with biases and a clamped SwiGLU (engine/kernels.ExpertMath) in every layer.

gpt-oss checkpoints stack each layer's experts as [E, H, 2I] with gate and up interleaved (or
as MXFP4 blocks): moeserve serves them converted once into per-expert weights in the usual slot
layout (convert/gpt_oss.py); the expert biases stay dense tensors of the MoE layer, under their
checkpoint names (mlp.experts.gate_up_proj_bias [E, 2I], mlp.experts.down_proj_bias [E, H]).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from engine.kernels import ExpertMath
from engine.models.base import DecoderLayer, DecoderLM, ExpertLayout, HFConfig, KVSpec, MoEBlockBase
from engine.models.common import Attention, RMSNorm, Rotary, combine_experts, rope_parameters
from engine.models.sink_attention import AttnExtras

# what transformers' GptOssConfig fills in for settings a config.json leaves out
DEFAULTS = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0, "sliding_window": 128,
            "rope_theta": 150000.0, "rms_norm_eps": 1e-5, "attention_bias": True,
            "num_key_value_heads": 8, "head_dim": 64}
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": False, "original_max_position_embeddings": 4096}
EXPERT_BIASES = ("gate_up_proj_bias", "down_proj_bias")
LAYER_TYPES = ("sliding_attention", "full_attention")


class GptOssRMSNorm(RMSNorm):
    """gpt-oss multiplies by the weight before rounding back to the model dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        return (self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))).to(dtype)


class GptOssAttention(Attention):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, layer: int,
                 bias: bool, window: Optional[int]) -> None:
        super().__init__(hidden, heads, kv_heads, head_dim, layer, bias=bias, o_bias=bias)
        self.sinks = nn.Parameter(torch.zeros(heads))           # [H] one logit per head
        self.window = window

    def attn_extras(self) -> AttnExtras:
        return AttnExtras(self.sinks, self.window)


class ExpertBiases(nn.Module):
    """The routed experts' biases (the weights themselves live in the expert cache)."""

    def __init__(self, num_experts: int, inter: int, hidden: int) -> None:
        super().__init__()
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(num_experts, 2 * inter))   # [E, 2I]
        self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden))         # [E, H]


class GptOssMoe(MoEBlockBase):
    def __init__(self, hidden: int, inter: int, num_experts: int, top_k: int, alpha: float,
                 limit: float, moe_index: int) -> None:
        super().__init__(moe_index)
        self.top_k, self.alpha, self.limit = top_k, alpha, limit
        self.router = nn.Linear(hidden, num_experts, bias=True)
        self.experts = ExpertBiases(num_experts, inter, hidden)

    @property
    def gate(self) -> nn.Module:
        """The router, under the name the look-ahead reads (DecoderLM.routers)."""
        return self.router

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                       # [N, H]
        top, ids = torch.topk(self.router(x), self.top_k, dim=-1)          # [N, k] logits, ids
        weights = torch.softmax(top, dim=-1)                               # in the logits' dtype
        math = ExpertMath(self.alpha, self.limit, self.experts.gate_up_proj_bias,
                          self.experts.down_proj_bias)
        return combine_experts(self.provider, self.moe_index, x, weights, ids, math=math).view(shape)


def layer_types(cfg: HFConfig) -> list[str]:
    n = cfg.req("num_hidden_layers")
    types = cfg.get("layer_types") or [LAYER_TYPES[i % 2] for i in range(n)]   # transformers' default
    if len(types) != n or any(t not in LAYER_TYPES for t in types):
        raise ValueError(f"config.json: layer_types {types!r}: expected {n} entries, each one of "
                         f"{', '.join(LAYER_TYPES)}")
    return list(types)


def build(cfg: HFConfig, context: int) -> DecoderLM:
    hidden, n_layers = cfg.req("hidden_size"), cfg.req("num_hidden_layers")
    heads = cfg.req("num_attention_heads")
    # transformers' GptOssConfig: absent -> 8 kv heads and head_dim 64; null -> heads, hidden / heads
    kv_heads = cfg.get("num_key_value_heads", DEFAULTS["num_key_value_heads"]) or heads
    head_dim = cfg.get("head_dim", DEFAULTS["head_dim"]) or hidden // heads
    eps = cfg.get("rms_norm_eps", DEFAULTS["rms_norm_eps"])
    experts, top_k = cfg.req("num_local_experts"), cfg.req("num_experts_per_tok")
    inter = cfg.req("intermediate_size")
    alpha = float(cfg.get("swiglu_alpha", DEFAULTS["swiglu_alpha"]))
    limit = float(cfg.get("swiglu_limit", DEFAULTS["swiglu_limit"]))
    window = cfg.get("sliding_window", DEFAULTS["sliding_window"])
    bias = bool(cfg.get("attention_bias", DEFAULTS["attention_bias"]))
    types = layer_types(cfg)
    if window is None and "sliding_attention" in types:
        raise ValueError("config.json: layer_types has sliding_attention layers but sliding_window is null")
    layers = []
    for i in range(n_layers):
        attn = GptOssAttention(hidden, heads, kv_heads, head_dim, i, bias,
                               int(window) if types[i] == "sliding_attention" else None)
        layer = DecoderLayer(attn, GptOssMoe(hidden, inter, experts, top_k, alpha, limit, i), hidden, eps)
        layer.input_layernorm = GptOssRMSNorm(hidden, eps)
        layer.post_attention_layernorm = GptOssRMSNorm(hidden, eps)
        layers.append(layer)
    layout = ExpertLayout(tuple(range(n_layers)), experts, top_k,
                          prefix=lambda i: f"model.layers.{i}.mlp.experts",
                          dense_suffixes=EXPERT_BIASES, converted=True)
    rope = rope_parameters({**cfg.raw, "rope_theta": cfg.get("rope_theta", DEFAULTS["rope_theta"])})
    if not (cfg.get("rope_parameters") or cfg.get("rope_scaling")):
        rope.update(DEFAULT_ROPE)
    model = DecoderLM(cfg.req("vocab_size"), hidden, layers, eps, Rotary(head_dim, rope, context), layout,
                      KVSpec(n_layers, kv_heads, head_dim, head_dim),
                      tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    model.model.norm = GptOssRMSNorm(hidden, eps)
    return model
