"""Mixtral: grouped-query attention, top-k softmax routing over SwiGLU experts."""
from __future__ import annotations

import torch
from torch import nn

from engine.models.base import DecoderLayer, DecoderLM, ExpertLayout, HFConfig, KVSpec, MoEBlockBase
from engine.models.common import Attention, Rotary, combine_experts, rope_parameters, softmax_topk


class MixtralSparseMoeBlock(MoEBlockBase):
    def __init__(self, hidden: int, num_experts: int, top_k: int, moe_index: int) -> None:
        super().__init__(moe_index)
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                # [N, H]
        weights, ids = softmax_topk(self.gate(x), self.top_k, normalize=True)  # [N, k]
        return combine_experts(self.provider, self.moe_index, x, weights, ids).view(shape)


def build(cfg: HFConfig, context: int) -> DecoderLM:
    hidden, n_layers = cfg.req("hidden_size"), cfg.req("num_hidden_layers")
    heads = cfg.req("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim, eps = cfg.head_dim(), cfg.get("rms_norm_eps", 1e-5)
    experts, top_k = cfg.req("num_local_experts"), cfg.req("num_experts_per_tok")
    layers = [DecoderLayer(Attention(hidden, heads, kv_heads, head_dim, i),
                           MixtralSparseMoeBlock(hidden, experts, top_k, i), hidden, eps,
                           mlp_name="block_sparse_moe") for i in range(n_layers)]
    layout = ExpertLayout(tuple(range(n_layers)), experts, top_k,
                          prefix=lambda i: f"model.layers.{i}.block_sparse_moe.experts",
                          names=("w1", "w3", "w2"))
    return DecoderLM(cfg.req("vocab_size"), hidden, layers, eps,
                     Rotary(head_dim, rope_parameters(cfg.raw), context), layout,
                     KVSpec(n_layers, kv_heads, head_dim, head_dim),
                     tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
