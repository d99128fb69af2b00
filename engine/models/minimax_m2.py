"""MiniMax-M2 (minimax_m2: MiniMax-M2, MiniMax-M2.1): grouped-query attention with RMSNorm over
the whole q and k projections and rope on the first ``rotary_dim`` of each head; a sigmoid
router whose selection adds ``e_score_correction_bias`` (weights: the chosen sigmoid scores,
normalised, applied in fp32); Mixtral's checkpoint names (block_sparse_moe, experts w1/w3/w2)."""
from __future__ import annotations

import torch
from torch import nn

from cache.provider import Router
from engine.models.base import DecoderLayer, DecoderLM, ExpertLayout, HFConfig, KVSpec, MoEBlockBase
from engine.models.common import Attention, Rotary, combine_experts, rope_parameters
from engine.models.deepseek_common import FP32Router, KeepFP32

DEFAULT_THETA = 5_000_000.0          # transformers' MiniMaxM2Config


class MiniMaxM2MoE(MoEBlockBase, KeepFP32):
    """The router and the selection bias stay fp32 in a bf16 model, as vLLM and SGLang keep them
    (transformers rounds them to bf16): selection adds a bias to sigmoid scores near each
    other, where bf16's steps (~4e-3 near 0.5, ~3e-2 near 8) would change which experts win."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, moe_index: int) -> None:
        super().__init__(moe_index)
        self.top_k = top_k
        self.gate = FP32Router(hidden, num_experts)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts), requires_grad=False)

    def lookahead_router(self) -> Router:
        return Router(self.gate.weight, sigmoid=True, selection_bias=self.e_score_correction_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                               # [N, H]
        scores = torch.sigmoid(self.gate.logits(x))                                # [N, E] fp32
        ids = torch.topk(scores + self.e_score_correction_bias, self.top_k, dim=-1)[1]
        weights = scores.gather(1, ids)
        weights = weights / weights.sum(dim=-1, keepdim=True)                      # [N, k] fp32
        out = combine_experts(self.provider, self.moe_index, x, weights, ids, weight_dtype=torch.float32)
        return out.view(shape)


def rotary_dim(cfg: HFConfig) -> int:
    """Released configs name it rotary_dim; transformers 5 writes partial_rotary_factor."""
    head_dim = cfg.get("head_dim", 128) or cfg.req("hidden_size") // cfg.req("num_attention_heads")
    dim = cfg.get("rotary_dim")
    if dim is None:
        factor = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor",
                                                        cfg.get("partial_rotary_factor"))
        dim = int(head_dim * float(1.0 if factor is None else factor))
    if dim <= 0 or dim % 2 or dim > head_dim:
        raise ValueError(f"config.json: rotary_dim={dim} for head_dim={head_dim}: it must be even "
                         f"and in (0, head_dim]")
    return int(dim)


def build(cfg: HFConfig, context: int) -> DecoderLM:
    hidden, n_layers = cfg.req("hidden_size"), cfg.req("num_hidden_layers")
    heads = cfg.req("num_attention_heads")
    # transformers' MiniMaxM2Config: absent -> 8 kv heads and head_dim 128; null -> heads, hidden / heads
    kv_heads = cfg.get("num_key_value_heads", 8) or heads
    head_dim, eps = cfg.get("head_dim", 128) or hidden // heads, cfg.get("rms_norm_eps", 1e-6)
    experts, top_k = cfg.req("num_local_experts"), cfg.req("num_experts_per_tok")
    if cfg.get("scoring_func", "sigmoid") != "sigmoid":
        raise ValueError(f"config.json: scoring_func={cfg.get('scoring_func')!r} is not supported "
                         f"for model_type 'minimax_m2' (sigmoid is)")
    layers = [DecoderLayer(Attention(hidden, heads, kv_heads, head_dim, i, qk_norm_eps=eps, qk_norm_full=True),
                           MiniMaxM2MoE(hidden, experts, top_k, i), hidden, eps, mlp_name="block_sparse_moe")
              for i in range(n_layers)]
    layout = ExpertLayout(tuple(range(n_layers)), experts, top_k,
                          prefix=lambda i: f"model.layers.{i}.block_sparse_moe.experts",
                          names=("w1", "w3", "w2"))
    params = rope_parameters({**cfg.raw, "rope_theta": cfg.get("rope_theta", DEFAULT_THETA)})
    return DecoderLM(cfg.req("vocab_size"), hidden, layers, eps,
                     Rotary(rotary_dim(cfg), params, context), layout,
                     KVSpec(n_layers, kv_heads, head_dim, head_dim),
                     tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                     skipped_prefixes=cfg.mtp_prefixes())
