"""Qwen3-Next's and Qwen3.5's tensors and keys as llama.cpp's converter writes them (its
Qwen3NextModel and _LinearAttentionVReorderBase), for tests/convert/gguf_writer.py: norms stored
as w + 1, A as -exp(A_log), dt_bias as dt_proj.bias, the conv kernel squeezed, Qwen3-Next's
in_proj_qkvz regrouped into q|k|v of all heads and z, Qwen3.5's value heads tiled, its stacked
experts split into gate and up."""
from __future__ import annotations

from typing import Any

import torch


def hybrid_meta(w: Any, cfg: dict[str, Any], ollama: bool = False) -> None:
    """The keys llama.cpp writes; ``ollama``: KV heads per layer (0 in the linear ones) and the
    value heads left grouped, saying so (ssm.v_head_reordered false), as Ollama's converter may."""
    import gguf
    if ollama:
        w.add_array(gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=w.arch),
                    [0 if t == "linear_attention" else cfg["num_key_value_heads"] for t in cfg["layer_types"]])
        w.add_bool(f"{w.arch}.ssm.v_head_reordered", False)
    w.add_ssm_conv_kernel(cfg["linear_conv_kernel_dim"])
    w.add_ssm_state_size(cfg["linear_key_head_dim"])
    w.add_ssm_group_count(cfg["linear_num_key_heads"])
    w.add_ssm_time_step_rank(cfg["linear_num_value_heads"])
    w.add_ssm_inner_size(cfg["linear_value_head_dim"] * cfg["linear_num_value_heads"])
    w.add_full_attention_interval(cfg.get("full_attention_interval", 4))
    rope = cfg.get("rope_parameters") or {}
    factor = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.25))
    w.add_rope_dimension_count(int(cfg["head_dim"] * factor))


def _tile(t: torch.Tensor, dim: int, cfg: dict[str, Any], head_dim: int) -> torch.Tensor:
    """Value heads grouped by key head -> tiled (the converter's _reorder_v_heads)."""
    hk, hv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    shape = list(t.shape)
    grouped = t.reshape(*shape[:dim], hk, hv // hk, head_dim, *shape[dim + 1:])
    return grouped.transpose(dim, dim + 1).reshape(shape)


def hybrid_tensors(tensors: dict[str, torch.Tensor], cfg: dict[str, Any], legacy: bool = False,
                   ollama: bool = False) -> dict[str, torch.Tensor]:
    """``legacy``: Qwen3-Next's in_proj_qkvz kept whole (ssm_in); ``ollama``: Qwen3.5's value heads
    left grouped."""
    qwen35 = cfg["model_type"].startswith("qwen3_5") and not ollama
    hk, dk, dv = cfg["linear_num_key_heads"], cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    gdv = cfg["linear_num_value_heads"] // hk * dv
    qk = 2 * hk * dk
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith("mlp.experts.gate_up_proj"):          # transformers 5's stacked [E, 2I, H]
            half = t.shape[1] // 2
            out[name.replace("gate_up_proj", "gate_proj.weight")] = t[:, :half]
            out[name.replace("gate_up_proj", "up_proj.weight")] = t[:, half:]
            continue
        if name.endswith("mlp.experts.down_proj"):
            out[name + ".weight"] = t
            continue
        if name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
            t = t + 1
        kind = name.rsplit(".", 2)[-2] if name.endswith((".weight", ".bias")) else name.rsplit(".", 1)[-1]
        if kind == "A_log":
            t = -torch.exp(t)
        if qwen35:
            if kind in ("A_log", "dt_bias", "in_proj_b", "in_proj_a"):
                t = _tile(t, 0, cfg, 1)
            elif kind == "in_proj_z":
                t = _tile(t, 0, cfg, dv)
            elif kind == "in_proj_qkv":
                t = torch.cat([t[:qk], _tile(t[qk:], 0, cfg, dv)])
            elif kind == "conv1d":
                t = torch.cat([t[:qk], _tile(t[qk:], 0, cfg, dv)])
            elif kind == "out_proj":
                t = _tile(t, 1, cfg, dv)
        if kind == "conv1d":
            t = t.squeeze(1)
        if kind == "dt_bias":
            name = name.replace("dt_bias", "dt_proj.bias")
        if kind == "in_proj_qkvz" and not legacy:
            per = t.view(hk, 2 * dk + 2 * gdv, -1)
            q, k, v, z = per.split([dk, dk, gdv, gdv], dim=1)
            out[name.replace("in_proj_qkvz", "in_proj_qkv")] = torch.cat(
                [x.reshape(-1, t.shape[-1]) for x in (q, k, v)])
            out[name.replace("in_proj_qkvz", "in_proj_z")] = z.reshape(-1, t.shape[-1])
            continue
        out[name] = t
    return out
