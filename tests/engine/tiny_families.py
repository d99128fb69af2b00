"""Tiny random checkpoints of every supported family, written by transformers' own config classes
and save_pretrained. Routers are scaled up (and V3's correction bias randomised) so routing is
decisive and really spread over the experts (attention biases, zero at initialisation, are randomised too);
each config also has a dense/MoE layer split."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

COMMON: dict[str, Any] = dict(vocab_size=160, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                              max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                              tie_word_embeddings=False, initializer_range=0.05)
ROUTER_SCALE = 20.0
FamilyCheckpoint = Callable[[str, torch.dtype], str]   # the conftest fixture: (name, dtype) -> dir
DEEPSEEK_MLA = dict(num_key_value_heads=4, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
                    v_head_dim=12, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                    num_experts_per_tok=2, first_k_dense_replace=1)

# name -> (transformers config class, kwargs, number of MoE layers)
FAMILIES: dict[str, tuple[str, dict[str, Any], int]] = {
    "llama": ("LlamaConfig", dict(num_hidden_layers=2, num_key_value_heads=2, intermediate_size=96), 0),
    "mixtral": ("MixtralConfig", dict(num_hidden_layers=2, num_key_value_heads=2, intermediate_size=64,
                                      num_local_experts=4, num_experts_per_tok=2), 2),
    # layer 1 dense (mlp_only_layers), 8 experts + the gated shared expert, unnormalised top-k
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48, num_experts=8,
                                         num_experts_per_tok=2, mlp_only_layers=[1]), 2),
    # head_dim != hidden / heads; layer 0 dense; normalised top-k
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_key_value_heads=2, head_dim=24, intermediate_size=96,
                                         moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                         norm_topk_prob=True, mlp_only_layers=[0]), 2),
    # q/k norm over the whole projection, clip_qkv that really clips
    "olmoe": ("OlmoeConfig", dict(num_hidden_layers=2, num_key_value_heads=2, intermediate_size=32,
                                  num_experts=8, num_experts_per_tok=2, clip_qkv=1.5), 2),
    # q_lora_rank None, greedy top-k, 2 shared experts, yarn rope with mscale in the softmax scale
    "deepseek_v2": ("DeepseekV2Config", dict(DEEPSEEK_MLA, q_lora_rank=None, n_shared_experts=2,
                                             topk_method="greedy", routed_scaling_factor=1.5,
                                             rope_parameters=dict(rope_type="yarn", rope_theta=10000.0,
                                                                  factor=4.0, original_max_position_embeddings=64,
                                                                  mscale=0.707, mscale_all_dim=0.707)), 2),
    # q_lora_rank set, group_limited_greedy: top-3 within the best 2 of 4 groups (top_k > topk_group,
    # else the group limit never changes the plain top-k)
    "deepseek_v2_grouped": ("DeepseekV2Config", dict(DEEPSEEK_MLA, q_lora_rank=32, n_shared_experts=1,
                                                     num_experts_per_tok=3, topk_method="group_limited_greedy",
                                                     n_group=4, topk_group=2, routed_scaling_factor=1.0), 2),
    # sigmoid scores + correction bias, 2 of 4 groups, normalised and scaled, yarn with mscale != mscale_all_dim
    "deepseek_v3": ("DeepseekV3Config", dict(DEEPSEEK_MLA, q_lora_rank=32, n_shared_experts=1, n_group=4,
                                             topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                                             rope_parameters=dict(rope_type="yarn", rope_theta=10000.0,
                                                                  factor=8.0, original_max_position_embeddings=32,
                                                                  mscale=1.0, mscale_all_dim=0.8,
                                                                  beta_fast=32, beta_slow=1)), 2),
    # GLM-4.5: partial rotary (half of head_dim 24), q/k/v biases, per-head q/k norm, V3's router
    # (2 of 4 groups, normalised and scaled), one shared expert, layer 0 dense
    "glm4_moe": ("Glm4MoeConfig", dict(num_key_value_heads=2, head_dim=24, partial_rotary_factor=0.5,
                                       attention_bias=True, use_qk_norm=True, intermediate_size=96,
                                       moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                                       n_shared_experts=1, n_group=4, topk_group=2, norm_topk_prob=True,
                                       routed_scaling_factor=2.5, first_k_dense_replace=1), 2),
    # ERNIE-4.5: interleaved fp32 rope, biases on attention and the dense/shared MLPs, a softmax
    # router with a selection bias (moe_statics), one shared expert, layer 0 dense, an LM head bias
    # (larger initial weights: at 0.05 this tiny model repeats one token)
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", dict(num_key_value_heads=2, intermediate_size=96,
                                                moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                                moe_num_shared_experts=1, moe_layer_start_index=1,
                                                use_bias=True, initializer_range=0.1), 2),
    # gpt-oss: sinks, a sliding window of 4 on layers 0 and 2, q/k/v/o biases, yarn rope, a router
    # with a bias, experts with biases and a clamped SwiGLU whose limit (0.5) really clamps
    "gpt_oss": ("GptOssConfig", dict(num_key_value_heads=2, head_dim=16, intermediate_size=32,
                                     num_local_experts=8, num_experts_per_tok=2, sliding_window=4,
                                     swiglu_limit=0.5), 3),
    # Qwen3-Next: Gated DeltaNet layers 0 and 2 (2 key heads serving 4 value heads, Dk 8, Dv 12),
    # gated full attention in layer 1 with per-head (1 + w) norms and rope on half of each head,
    # softmax top-k beside a gated shared expert in layers 0 and 2, layer 1 dense
    "qwen3_next": ("Qwen3NextConfig", dict(num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5,
                                           layer_types=["linear_attention", "full_attention", "linear_attention"],
                                           linear_num_key_heads=2, linear_num_value_heads=4,
                                           linear_key_head_dim=8, linear_value_head_dim=12,
                                           linear_conv_kernel_dim=4, intermediate_size=96,
                                           moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                           num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                           mlp_only_layers=[1]), 2),
    # Qwen3.5 (text-only checkpoint): Qwen3-Next's layers with split linear projections, routed
    # experts in every layer (stacked, as transformers 5 writes them)
    "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", dict(num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5,
                                                      layer_types=["linear_attention", "full_attention",
                                                                   "linear_attention"],
                                                      linear_num_key_heads=2, linear_num_value_heads=4,
                                                      linear_key_head_dim=8, linear_value_head_dim=12,
                                                      moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                                      num_experts=8, num_experts_per_tok=2), 3),
    # MiniMax-M2: q/k RMSNorm over the whole projections, rope on rotary_dim 8 of head_dim 16, a
    # sigmoid router choosing on score + e_score_correction_bias, Mixtral's checkpoint names
    "minimax_m2": ("MiniMaxM2Config", dict(num_hidden_layers=2, num_key_value_heads=2, head_dim=16, rotary_dim=8,
                                           intermediate_size=32, num_local_experts=8, num_experts_per_tok=2), 2),
}
# weight seeds other than 0: with seed 0 this tiny GLM repeats one token after a 2-token prompt,
# which would make its greedy comparison against transformers say little
SEEDS: dict[str, int] = {"glm4_moe": 1}


def make_family_checkpoint(name: str, path: str, dtype: torch.dtype = torch.float32,
                           seed: Optional[int] = None, overrides: Optional[dict[str, Any]] = None) -> str:
    """Write the tiny ``name`` checkpoint (see FAMILIES; config fields replaced by ``overrides``)
    to ``path`` in ``dtype``; returns path."""
    import transformers
    cls_name, kwargs, _ = FAMILIES[name]
    cfg = getattr(transformers, cls_name)(**{**COMMON, **kwargs, **(overrides or {})})
    torch.manual_seed(SEEDS.get(name, 0) if seed is None else seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():   # norms stored around zero (Qwen3-Next's
            if "norm" in name and not param.any():      # 1 + w): make their weights count
                param.normal_(0.0, 0.1)
        if getattr(model.lm_head, "bias", None) is not None:       # ERNIE's with use_bias
            model.lm_head.bias.normal_(0.0, 0.1)
        for layer in model.model.layers:
            attn = getattr(layer, "self_attn", None) or layer.linear_attn        # Qwen3-Next's hybrid layers
            for module in (*attn.modules(), *layer.mlp.modules()):               # biases start at zero:
                if isinstance(module, torch.nn.Linear) and module.bias is not None:  # make them count
                    module.bias.normal_(0.0, 0.1)
            sinks = getattr(attn, "sinks", None)
            if sinks is not None:                          # gpt-oss: one logit per head
                sinks.normal_(0.0, 1.0)
            experts = getattr(layer.mlp, "experts", None)
            for name in ("gate_up_proj_bias", "down_proj_bias"):   # gpt-oss's, zero at initialisation
                if hasattr(experts, name):
                    getattr(experts, name).normal_(0.0, 0.1)
            gate: Optional[torch.nn.Module] = getattr(layer.mlp, "gate", getattr(layer.mlp, "router", None))
            if gate is None:                               # a dense layer
                continue
            gate.weight.normal_(0.0, 0.02).mul_(ROUTER_SCALE)
            if isinstance(getattr(gate, "bias", None), torch.nn.Parameter):
                gate.bias.normal_(0.0, 0.1)
            bias = getattr(getattr(gate, "moe_statics", gate), "e_score_correction_bias",
                           getattr(layer.mlp, "e_score_correction_bias", None))   # MiniMax-M2's: beside the gate
            if bias is not None:                           # selection-only bias: make it matter
                bias.normal_(0.0, 0.1)
    model.to(dtype).save_pretrained(path)
    return path


def add_mtp_layer(src: str, dst: str) -> int:
    """Copy checkpoint ``src`` to ``dst`` with a multi-token-prediction layer after its last layer,
    as GLM-4.5's checkpoints carry one (the last layer's tensors, experts included, plus eh_proj);
    returns how many tensors it added."""
    import json
    import os
    import shutil

    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        n = json.load(f)["num_hidden_layers"]
    last = f"model.layers.{n - 1}."
    extra = {k.replace(last, f"model.layers.{n}."): v.clone() for k, v in tensors.items() if k.startswith(last)}
    hidden = tensors["model.embed_tokens.weight"].shape[1]
    extra[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(hidden, 2 * hidden)
    save_file({**tensors, **extra}, os.path.join(dst, "model.safetensors"))
    return len(extra)


def engine_dir(path: str) -> str:
    """The directory the engine loads for checkpoint ``path``: itself, or, for a checkpoint that
    is served converted (gpt-oss's stacked experts), its per-expert conversion made beside it."""
    import json
    import os

    from convert.quantize import source_conversion, unstack_checkpoint
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    if source_conversion(path, raw) is None:
        return path
    out = path.rstrip("/") + "-per-expert"
    if not os.path.isdir(out):
        os.makedirs(out)
        unstack_checkpoint(path, out, progress=False)
    return out
