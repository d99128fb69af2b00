"""What DeepSeek-V2 and V3 share: fp32 routers with grouped top-k, the MoE block with its
shared experts, the dense-first layer plan and the decoder assembly around MLA."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from cache.provider import Router
from engine.models.base import DecoderLayer, DecoderLM, ExpertLayout, HFConfig, KVSpec, MoEBlockBase
from engine.models.common import DenseMLP, combine_experts, rope_parameters
from engine.models.mla import FP32Rotary, MLAttention, softmax_scale


class KeepFP32(nn.Module):
    """A module whose own parameters stay fp32 whatever the model dtype (transformers'
    _keep_in_fp32_modules_strict for gate.weight and e_score_correction_bias): a bf16 bias
    (steps of ~4e-3 near 0.5) would change which experts V3 selects."""

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "KeepFP32":
        super()._apply(fn, recurse)       # moves device; a dtype cast is undone below
        for p in self._parameters.values():
            if p is not None and p.dtype != torch.float32:
                p.data = p.data.float()
        return self


class FP32Router(KeepFP32):
    """A router [E, H] kept in fp32 (KeepFP32)."""

    def __init__(self, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, dtype=torch.float32))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, H] -> router logits [N, E], fp32."""
        return nn.functional.linear(x.float(), self.weight)


def group_mask(group_scores: torch.Tensor, topk_group: int, per_group: int) -> torch.Tensor:
    """group_scores [N, G] -> bool [N, G*per_group], true for experts of the topk_group best groups."""
    idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    mask = torch.zeros_like(group_scores).scatter_(1, idx, 1.0).bool()       # [N, G]
    return mask.unsqueeze(-1).expand(-1, -1, per_group).reshape(group_scores.shape[0], -1)


class DeepseekMoe(MoEBlockBase):
    """Routed experts (router: ``gate``, fp32 weights) plus shared experts as one dense MLP."""

    def __init__(self, hidden: int, router: nn.Module, shared_inter: int, moe_index: int) -> None:
        super().__init__(moe_index)
        self.gate = router
        self.shared_experts = DenseMLP(hidden, shared_inter) if shared_inter > 0 else None

    def lookahead_router(self) -> Router:
        """V3's (and GLM-4.5's) routers choose on sigmoid scores + a selection bias; V2's softmax."""
        bias = getattr(self.gate, "e_score_correction_bias", None)
        return Router(self.gate.weight, sigmoid=bias is not None, selection_bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                        # [N, H]
        weights, ids = self.gate(x)                                         # [N, k] fp32, [N, k]
        out = combine_experts(self.provider, self.moe_index, x, weights, ids,
                              weight_dtype=torch.float32)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)


def moe_layer_indices(cfg: HFConfig, n_layers: int) -> tuple[int, ...]:
    """MoE from first_k_dense_replace on, every moe_layer_freq-th layer (DeepSeek's rule)."""
    first = int(cfg.get("first_k_dense_replace") or 0)
    freq = int(cfg.get("moe_layer_freq") or 1)
    return tuple(i for i in range(first, n_layers) if i % freq == 0)


def build_deepseek(cfg: HFConfig, context: int, router: Callable[[], nn.Module],
                   rope_mode: str) -> DecoderLM:
    """``router()`` builds one MoE layer's router: x [N, H] -> (weights [N, k] fp32, ids [N, k])."""
    if cfg.get("mlp_bias"):
        raise ValueError(f"config.json: mlp_bias=true is not supported for model_type {cfg.get('model_type')!r}")
    hidden, n_layers = cfg.req("hidden_size"), cfg.req("num_hidden_layers")
    heads, eps = cfg.req("num_attention_heads"), cfg.get("rms_norm_eps", 1e-6)
    qk_nope, qk_rope, v_dim = cfg.req("qk_nope_head_dim"), cfg.req("qk_rope_head_dim"), cfg.req("v_head_dim")
    experts, top_k = cfg.req("n_routed_experts"), cfg.req("num_experts_per_tok")
    rope: dict[str, Any] = rope_parameters(cfg.raw)
    if rope["rope_type"] == "yarn" and rope.get("factor") is None:   # transformers' fallback
        rope["factor"] = cfg.req("max_position_embeddings") / rope["original_max_position_embeddings"]
    scale = softmax_scale(qk_nope + qk_rope, rope)
    shared_inter = cfg.req("moe_intermediate_size") * int(cfg.get("n_shared_experts") or 0)
    moe_layers = moe_layer_indices(cfg, n_layers)
    layers = []
    for i in range(n_layers):
        attn = MLAttention(hidden, heads, cfg.get("q_lora_rank"), cfg.req("kv_lora_rank"), qk_nope,
                           qk_rope, v_dim, i, scale, bool(cfg.get("attention_bias", False)), rope_mode)
        if i in moe_layers:
            mlp: nn.Module = DeepseekMoe(hidden, router(), shared_inter, moe_layers.index(i))
        else:
            mlp = DenseMLP(hidden, cfg.req("intermediate_size"))
        layers.append(DecoderLayer(attn, mlp, hidden, eps))
    layout = ExpertLayout(moe_layers, experts, top_k,
                          prefix=lambda i: f"model.layers.{i}.mlp.experts") if moe_layers else None
    return DecoderLM(cfg.req("vocab_size"), hidden, layers, eps, FP32Rotary(qk_rope, rope, context),
                     layout, KVSpec(n_layers, heads, qk_nope + qk_rope, v_dim),
                     tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                     skipped_prefixes=cfg.mtp_prefixes())
