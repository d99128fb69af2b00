"""Qwen3-Next (qwen3_next: Qwen3-Next-80B-A3B Instruct and Thinking): a hybrid of Gated DeltaNet
linear attention (engine/models/gated_deltanet.py) and full attention, one full-attention layer
in every ``full_attention_interval`` (layer_types); full attention has a sigmoid output gate
(q_proj writes each head's query and gate side by side), per-head q/k norms and rope on the first
``partial_rotary_factor`` of each head; every norm scales by (1 + weight); MoE layers route by
softmax top-k beside a shared expert gated by sigmoid(shared_expert_gate(x)) (as qwen2_moe).
The checkpoints' multi-token-prediction weights (``mtp.*``) are not used for decoding."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from engine.models.base import DecoderLayer, DecoderLM, ExpertLayout, HFConfig, KVSpec
from engine.models.common import (Attention, Batch, DenseMLP, KVCache, RMSNorm, Rotary, apply_rope,
                                  rope_parameters)
from engine.models.gated_deltanet import GatedDeltaNet
from engine.models.glm4_moe import rotary_dim
from engine.models.linear_state import LinearSpec
from engine.models.softmax_moe import SoftmaxMoeBlock, num_experts, sparse_step_layers

LAYER_TYPES = ("linear_attention", "full_attention")
DEFAULTS = {"linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
            "linear_num_key_heads": 16, "linear_num_value_heads": 32, "full_attention_interval": 4,
            "partial_rotary_factor": 0.25, "num_key_value_heads": 2, "head_dim": 256,
            "shared_expert_intermediate_size": 512}
SKIPPED = ("mtp.",)


class OffsetRMSNorm(RMSNorm):
    """RMSNorm scaling by (1 + weight) (weights stored around zero), in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class GatedAttention(Attention):
    """Full attention whose output is multiplied by sigmoid(gate) before o_proj."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, layer: int,
                 bias: bool, eps: float) -> None:
        super().__init__(hidden, heads, kv_heads, head_dim, layer, bias=bias, o_bias=bias)
        self.q_proj = nn.Linear(hidden, heads * head_dim * 2, bias=bias)
        self.q_norm, self.k_norm = OffsetRMSNorm(head_dim, eps), OffsetRMSNorm(head_dim, eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: Batch,
                kv: KVCache) -> torch.Tensor:
        b, t, _ = x.shape
        q, gate = self.q_proj(x).view(b, t, self.heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = self.q_norm(q).transpose(1, 2)                                         # [B, H, T, D]
        k = self.k_norm(self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = kv.attend(self.layer, q, k, v, batch)                                # [B, T, H*D]
        return self.o_proj(out * torch.sigmoid(gate.reshape(b, t, -1)))


def layer_types(cfg: HFConfig) -> list[str]:
    n = cfg.req("num_hidden_layers")
    every = int(cfg.get("full_attention_interval") or DEFAULTS["full_attention_interval"])
    types = cfg.get("layer_types") or [LAYER_TYPES[(i + 1) % every == 0] for i in range(n)]
    if len(types) != n or any(t not in LAYER_TYPES for t in types):
        raise ValueError(f"config.json: layer_types {types!r}: expected {n} entries, each one of "
                         f"{', '.join(LAYER_TYPES)}")
    return list(types)


def _get(cfg: HFConfig, key: str) -> int:
    value = cfg.get(key)
    return int(DEFAULTS[key] if value is None else value)


def build(cfg: HFConfig, context: int) -> DecoderLM:
    experts = num_experts(cfg)
    moe_layers = sparse_step_layers(cfg, cfg.req("num_hidden_layers")) if experts > 0 else ()
    return build_hybrid(cfg, context, GatedDeltaNet, moe_layers, bool(cfg.get("norm_topk_prob", True)))


def build_hybrid(cfg: HFConfig, context: int, delta_net: type[GatedDeltaNet], moe_layers: tuple[int, ...],
                 norm: bool, checkpoint_prefix: str = "model.",
                 skipped: tuple[str, ...] = SKIPPED) -> DecoderLM:
    """The Qwen3-Next decoder (also Qwen3.5's text model, whose linear layers are ``delta_net``)."""
    hidden, n_layers = cfg.req("hidden_size"), cfg.req("num_hidden_layers")
    heads = cfg.req("num_attention_heads")
    # transformers' defaults for absent fields (null: heads, hidden / heads)
    kv_heads = cfg.get("num_key_value_heads", DEFAULTS["num_key_value_heads"]) or heads
    head_dim = cfg.get("head_dim", DEFAULTS["head_dim"]) or hidden // heads
    eps = cfg.get("rms_norm_eps", 1e-6)
    bias = bool(cfg.get("attention_bias", False))
    experts = num_experts(cfg) if moe_layers else 0
    top_k = cfg.req("num_experts_per_tok") if moe_layers else 0
    shared: Optional[int] = cfg.get("shared_expert_intermediate_size",
                                    DEFAULTS["shared_expert_intermediate_size"])
    types = layer_types(cfg)
    linear = LinearSpec(tuple(i for i, t in enumerate(types) if t == "linear_attention"),
                        2 * _get(cfg, "linear_num_key_heads") * _get(cfg, "linear_key_head_dim")
                        + _get(cfg, "linear_num_value_heads") * _get(cfg, "linear_value_head_dim"),
                        _get(cfg, "linear_conv_kernel_dim"), _get(cfg, "linear_num_value_heads"),
                        _get(cfg, "linear_key_head_dim"), _get(cfg, "linear_value_head_dim"))
    layers = []
    for i in range(n_layers):
        if types[i] == "linear_attention":
            mixer: nn.Module = delta_net(hidden, _get(cfg, "linear_num_key_heads"), linear.heads,
                                         linear.k_dim, linear.v_dim, linear.kernel, eps, i)
        else:
            mixer = GatedAttention(hidden, heads, kv_heads, head_dim, i, bias, eps)
        if i in moe_layers:
            mlp: nn.Module = SoftmaxMoeBlock(hidden, experts, top_k, norm, moe_layers.index(i), shared)
        else:
            mlp = DenseMLP(hidden, cfg.req("intermediate_size"))
        layer = DecoderLayer(mixer, mlp, hidden, eps,
                             attn_name="linear_attn" if types[i] == "linear_attention" else "self_attn")
        layer.input_layernorm, layer.post_attention_layernorm = OffsetRMSNorm(hidden, eps), OffsetRMSNorm(hidden, eps)
        layers.append(layer)
    layout = ExpertLayout(moe_layers, experts, top_k,
                          prefix=lambda i: f"{checkpoint_prefix}layers.{i}.mlp.experts") if moe_layers else None
    params = rope_parameters(cfg.raw)
    if params.get("partial_rotary_factor") is None:
        params["partial_rotary_factor"] = cfg.get("partial_rotary_factor", DEFAULTS["partial_rotary_factor"])
    if params["partial_rotary_factor"] is None:               # null: all of it, as transformers
        params["partial_rotary_factor"] = 1.0
    raw = {**cfg.raw, "rope_parameters": params, "head_dim": head_dim}
    model = DecoderLM(cfg.req("vocab_size"), hidden, layers, eps,
                      Rotary(rotary_dim(HFConfig(raw)), params, context), layout,
                      KVSpec(n_layers, kv_heads, head_dim, head_dim, linear if linear.layers else None),
                      tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                      skipped_prefixes=skipped, checkpoint_prefix=checkpoint_prefix)
    model.model.norm = OffsetRMSNorm(hidden, eps)
    return model
