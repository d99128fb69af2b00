"""DeepSeek-V3 / R1 (and Kimi-K2-style checkpoints): MLA attention, sigmoid scoring; experts are
selected on score + e_score_correction_bias within the topk_group best of n_group groups (a
group's score: the sum of its two best), but weighted by the plain scores, normalised if
norm_topk_prob, times routed_scaling_factor."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from engine.models.base import DecoderLM, HFConfig
from engine.models.deepseek_common import FP32Router, build_deepseek, group_mask


class DeepseekV3Router(FP32Router):
    def __init__(self, hidden: int, num_experts: int, top_k: int, n_group: int, topk_group: int,
                 scaling: float, norm_topk_prob: bool) -> None:
        super().__init__(hidden, num_experts)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32),
                                                    requires_grad=False)
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.scaling, self.norm_topk_prob = scaling, norm_topk_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (weights [N, k] fp32, expert ids [N, k])."""
        scores = self.logits(x).sigmoid()                                     # [N, E]
        choice = scores + self.e_score_correction_bias
        per = scores.shape[-1] // self.n_group
        best = choice.view(-1, self.n_group, per).topk(2, dim=-1)[0].sum(dim=-1)   # [N, G]
        choice = choice.masked_fill(~group_mask(best, self.topk_group, per), float("-inf"))
        ids = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids


def v3_routers(cfg: HFConfig, topk_group_default: Optional[int],
               norm_default: bool) -> Callable[[], DeepseekV3Router]:
    """Builds one MoE layer's router from the config (DeepSeek-V3's, and GLM-4.5's with other
    defaults: topk_group absent is n_group for V3 when ``topk_group_default`` is None), with the
    group settings checked once."""
    experts = cfg.req("n_routed_experts")
    n_group = int(cfg.get("n_group") or 1)
    topk_group = int(cfg.get("topk_group") or topk_group_default or n_group)
    if experts % n_group or experts // n_group < 2:
        raise ValueError(f"config.json: n_routed_experts={experts} must split into n_group={n_group} "
                         f"groups of at least 2 experts")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"config.json: topk_group={topk_group} must be in 1..n_group={n_group}")

    def router() -> DeepseekV3Router:
        return DeepseekV3Router(cfg.req("hidden_size"), experts, cfg.req("num_experts_per_tok"), n_group,
                                topk_group, float(cfg.get("routed_scaling_factor", 1.0)),
                                bool(cfg.get("norm_topk_prob", norm_default)))
    return router


def build(cfg: HFConfig, context: int) -> DecoderLM:
    scoring = cfg.get("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise ValueError(f"config.json: scoring_func {scoring!r} is not supported for deepseek_v3 (sigmoid only)")
    router = v3_routers(cfg, topk_group_default=None, norm_default=False)
    mode = "interleaved" if cfg.get("rope_interleave", True) else "half"
    return build_deepseek(cfg, context, router, rope_mode=mode)
