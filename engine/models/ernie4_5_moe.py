"""ERNIE-4.5 MoE (ernie4_5_moe: ERNIE-4.5-21B-A3B, ERNIE-4.5-300B-A47B): grouped-query attention
with optional biases and rope on interleaved pairs computed in fp32; a softmax router in fp32 whose
selection adds moe_statics.e_score_correction_bias (weights: the plain probabilities, normalised,
in the model dtype); shared experts beside the routed ones; MoE in the layers from
moe_layer_start_index to moe_layer_end_index, every moe_layer_interval-th."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cache.provider import Router
from engine.models.base import DecoderLayer, DecoderLM, ExpertLayout, HFConfig, KVSpec, MoEBlockBase
from engine.models.common import Attention, Batch, DenseMLP, KVCache, combine_experts, rope_parameters
from engine.models.deepseek_common import FP32Router, KeepFP32
from engine.models.mla import FP32Rotary, rope_interleaved


class ErnieAttention(Attention):
    """Attention whose rope turns interleaved pairs, in fp32 (cos/sin from FP32Rotary)."""

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: Batch,
                kv: KVCache) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)      # [B, H, T, D]
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)   # [B, Hkv, T, D]
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = (rope_interleaved(y.float(), *rope).to(x.dtype) for y in (q, k))
        return self.o_proj(kv.attend(self.layer, q, k, v, batch))


class MoeStatics(KeepFP32):
    """The selection bias [1, E], in fp32 (checkpoint name mlp.moe_statics.e_score_correction_bias)."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.e_score_correction_bias = nn.Parameter(torch.zeros(1, num_experts, dtype=torch.float32),
                                                    requires_grad=False)


class ErnieMoe(MoEBlockBase):
    def __init__(self, hidden: int, num_experts: int, top_k: int, norm_min: float, shared_inter: int,
                 bias: bool, moe_index: int, selection_bias: bool) -> None:
        super().__init__(moe_index)
        self.top_k, self.norm_min = top_k, norm_min
        self.gate = FP32Router(hidden, num_experts)
        # checkpoints trained without the auxiliary-loss-free bias have no moe_statics
        self.moe_statics = MoeStatics(num_experts) if selection_bias else None
        self.shared_experts = DenseMLP(hidden, shared_inter, bias) if shared_inter > 0 else None

    def lookahead_router(self) -> Router:
        """Softmax probabilities, chosen with the selection bias where the checkpoint has one."""
        bias = None if self.moe_statics is None else self.moe_statics.e_score_correction_bias.view(-1)
        return Router(self.gate.weight, selection_bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                           # [N, H]
        probs = torch.softmax(self.gate.logits(x), dim=-1)                     # [N, E] fp32
        choice = probs if self.moe_statics is None else probs + self.moe_statics.e_score_correction_bias
        ids = torch.topk(choice, self.top_k, dim=-1)[1]
        weights = probs.gather(1, ids)                                         # [N, k]
        weights = (weights / weights.sum(dim=-1, keepdim=True).clamp(min=self.norm_min)).to(x.dtype)
        out = combine_experts(self.provider, self.moe_index, x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)


def _setting(cfg: HFConfig, key: str, default: Any) -> Any:
    """A config value, or transformers' Ernie4_5_MoeConfig default when it is absent or null."""
    value = cfg.get(key)
    return default if value is None else value


def moe_layers(cfg: HFConfig, n_layers: int) -> tuple[int, ...]:
    start = int(_setting(cfg, "moe_layer_start_index", 1))
    end = int(_setting(cfg, "moe_layer_end_index", -1))
    end = n_layers - 1 if end == -1 else end
    every = int(_setting(cfg, "moe_layer_interval", 1))
    return tuple(i for i in range(n_layers) if (i + 1) % every == 0 and start <= i <= end)


def build(cfg: HFConfig, context: int) -> DecoderLM:
    hidden, n_layers = cfg.req("hidden_size"), cfg.req("num_hidden_layers")
    heads = cfg.req("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim, eps = cfg.head_dim(), cfg.get("rms_norm_eps", 1e-5)
    experts = int(cfg.get("moe_num_experts") or cfg.req("num_experts"))
    top_k = int(cfg.get("moe_k") or cfg.req("num_experts_per_tok"))
    bias = bool(_setting(cfg, "use_bias", False))
    shared_inter = cfg.req("moe_intermediate_size") * int(_setting(cfg, "moe_num_shared_experts", 2))
    norm_min = float(_setting(cfg, "moe_norm_min", 1e-12))
    selection_bias = bool(_setting(cfg, "moe_use_aux_free", True))
    moe = moe_layers(cfg, n_layers)
    layers = []
    for i in range(n_layers):
        attn = ErnieAttention(hidden, heads, kv_heads, head_dim, i, bias=bias, o_bias=bias)
        if i in moe:
            mlp: nn.Module = ErnieMoe(hidden, experts, top_k, norm_min, shared_inter, bias, moe.index(i),
                                      selection_bias)
        else:
            mlp = DenseMLP(hidden, cfg.req("intermediate_size"), bias)
        layers.append(DecoderLayer(attn, mlp, hidden, eps))
    layout = ExpertLayout(moe, experts, top_k, prefix=lambda i: f"model.layers.{i}.mlp.experts") if moe else None
    rope = rope_parameters({**cfg.raw, "rope_theta": _setting(cfg, "rope_theta", 500000.0)})
    # Baidu's checkpoints keep their multi-token-prediction weights under model.mtp_*
    return DecoderLM(cfg.req("vocab_size"), hidden, layers, eps, FP32Rotary(head_dim, rope, context), layout,
                     KVSpec(n_layers, kv_heads, head_dim, head_dim),
                     tie_embeddings=bool(_setting(cfg, "tie_word_embeddings", True)), head_bias=bias,
                     skipped_prefixes=cfg.mtp_prefixes() + ("model.mtp_",))
