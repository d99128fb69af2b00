"""DeepSeek-V2 (and V2-Lite): MLA attention, softmax routing with greedy or group_limited_greedy
top-k, shared experts, first_k_dense_replace dense layers."""
from __future__ import annotations

import torch

from engine.models.base import DecoderLM, HFConfig
from engine.models.deepseek_common import FP32Router, build_deepseek, group_mask

TOPK_METHODS = ("greedy", "group_limited_greedy")


class DeepseekV2Router(FP32Router):
    def __init__(self, hidden: int, num_experts: int, top_k: int, method: str, n_group: int,
                 topk_group: int, scaling: float, norm_topk_prob: bool) -> None:
        super().__init__(hidden, num_experts)
        self.top_k, self.method, self.n_group, self.topk_group = top_k, method, n_group, topk_group
        self.scaling, self.norm_topk_prob = scaling, norm_topk_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (weights [N, k] fp32, expert ids [N, k])."""
        scores = self.logits(x).softmax(dim=-1)                               # [N, E]
        if self.method == "group_limited_greedy":
            per = scores.shape[-1] // self.n_group
            best = scores.view(-1, self.n_group, per).max(dim=-1).values     # [N, G]
            scores = scores.masked_fill(~group_mask(best, self.topk_group, per), 0.0)
        weights, ids = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        # DeepSeek's own code normalises *instead of* scaling; transformers 5.24 ignores
        # norm_topk_prob for V2 (every released V2 checkpoint has it false, where both agree)
        if self.top_k > 1 and self.norm_topk_prob:
            return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20), ids
        return weights * self.scaling, ids


def build(cfg: HFConfig, context: int) -> DecoderLM:
    method = cfg.get("topk_method") or "greedy"
    if method not in TOPK_METHODS:
        raise ValueError(f"config.json: topk_method {method!r} is not supported for deepseek_v2 "
                         f"(supported: {', '.join(TOPK_METHODS)})")
    grouped = method == "group_limited_greedy"
    experts = cfg.req("n_routed_experts")
    n_group = cfg.req("n_group") if grouped else 1
    if experts % n_group:
        raise ValueError(f"config.json: n_routed_experts={experts} is not divisible by n_group={n_group}")

    def router() -> DeepseekV2Router:
        return DeepseekV2Router(cfg.req("hidden_size"), experts, cfg.req("num_experts_per_tok"), method,
                                n_group, cfg.req("topk_group") if grouped else 1,
                                float(cfg.get("routed_scaling_factor", 1.0)),
                                bool(cfg.get("norm_topk_prob", False)))
    return build_deepseek(cfg, context, router, rope_mode="fp32_interleaved")
