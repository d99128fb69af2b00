"""Pieces shared by the softmax-routed families with standard attention (qwen2_moe, qwen3_moe,
olmoe): the routed block with its optional gated shared expert, the MoE/dense layer plan, and
the decoder assembly."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.base import DecoderLayer, DecoderLM, ExpertLayout, HFConfig, KVSpec, MoEBlockBase
from engine.models.common import DenseMLP, Rotary, combine_experts, rope_parameters, softmax_topk


class SoftmaxMoeBlock(MoEBlockBase):
    """Softmax top-k over routed experts, plus (qwen2_moe) a shared expert scaled by
    sigmoid(shared_expert_gate(x)). Module names follow the checkpoints: mlp.gate,
    mlp.shared_expert, mlp.shared_expert_gate."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, norm_topk_prob: bool,
                 moe_index: int, shared_inter: Optional[int] = None) -> None:
        super().__init__(moe_index)
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        if shared_inter:
            self.shared_expert = DenseMLP(hidden, shared_inter)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
        else:
            self.shared_expert = self.shared_expert_gate = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                                # [N, H]
        weights, ids = softmax_topk(self.gate(x), self.top_k, self.norm_topk_prob)  # [N, k]
        out = combine_experts(self.provider, self.moe_index, x, weights, ids)
        if self.shared_expert is not None:
            out = out + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(shape)


def num_experts(cfg: HFConfig) -> int:
    """Qwen checkpoints name it num_experts; transformers 5's Qwen3MoeConfig writes num_local_experts."""
    for key in ("num_experts", "num_local_experts"):
        if cfg.get(key):
            return int(cfg.raw[key])
    raise ValueError(f"config.json: missing required field 'num_experts' for model_type "
                     f"{cfg.get('model_type')!r}")


def sparse_step_layers(cfg: HFConfig, n_layers: int) -> tuple[int, ...]:
    """Qwen's rule: layer i is MoE unless listed in mlp_only_layers, if (i + 1) % decoder_sparse_step == 0."""
    step = int(cfg.get("decoder_sparse_step") or 1)
    dense = set(cfg.get("mlp_only_layers") or ())
    return tuple(i for i in range(n_layers) if i not in dense and (i + 1) % step == 0)


def reject_sliding_window(cfg: HFConfig) -> None:
    if cfg.get("use_sliding_window"):
        raise ValueError(f"config.json: use_sliding_window=true is not supported for model_type "
                         f"{cfg.get('model_type')!r} (sliding_window={cfg.get('sliding_window')})")


def build_softmax_moe(cfg: HFConfig, context: int, attention: Callable[[int], nn.Module],
                      moe_layers: tuple[int, ...], experts: int, shared_inter: Optional[int],
                      eps: float) -> DecoderLM:
    """Decoder whose layers in ``moe_layers`` are SoftmaxMoeBlocks and the rest dense SwiGLU MLPs;
    ``attention(i)`` builds layer i's attention."""
    hidden, n_layers = cfg.req("hidden_size"), cfg.req("num_hidden_layers")
    top_k, norm = cfg.req("num_experts_per_tok"), bool(cfg.get("norm_topk_prob", False))
    layers = []
    for i in range(n_layers):
        if i in moe_layers:
            mlp: nn.Module = SoftmaxMoeBlock(hidden, experts, top_k, norm, moe_layers.index(i),
                                             shared_inter)
        else:
            mlp = DenseMLP(hidden, cfg.req("intermediate_size"))
        layers.append(DecoderLayer(attention(i), mlp, hidden, eps))
    layout = ExpertLayout(moe_layers, experts, top_k,
                          prefix=lambda i: f"model.layers.{i}.mlp.experts") if moe_layers else None
    head_dim = cfg.head_dim()
    kv_heads = cfg.get("num_key_value_heads") or cfg.req("num_attention_heads")
    return DecoderLM(cfg.req("vocab_size"), hidden, layers, eps,
                     Rotary(head_dim, rope_parameters(cfg.raw), context), layout,
                     KVSpec(n_layers, kv_heads, head_dim, head_dim),
                     tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
