"""Qwen3-Next's and Qwen3.5's hybrid layers (llama.cpp's ``qwen3next`` and ``qwen35moe``) read back
from a GGUF: llama.cpp's converter changes their tensors for its own graph, and each change is
undone here:
- every (1 + w) RMSNorm but the linear attention's own is stored as w + 1;
- A_log is stored as A = -exp(A_log), dt_bias as ``ssm_dt.bias``, the conv kernel squeezed [C, K];
- Qwen3-Next's in_proj_qkvz (per key head: q, k, v, z) is regrouped into one q|k|v matrix of all
  heads (``attn_qkv``) and z (``attn_gate``);
- Qwen3.5's value heads, grouped by key head in the checkpoint ([K0: v0 v1][K1: v0 v1]), are
  tiled for ggml's broadcast ([v0: K0 K1][v1: K0 K1]) in every tensor that has them (Ollama's
  converter says whether it did, by ``ssm.v_head_reordered``).
Files from llama.cpp's first Qwen3-Next support hold in_proj_qkvz unchanged (``ssm_in``).
Ollama's Qwen3.5 files carry the vision tower (``v.*``, ``mm.*``), which is not read.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from convert.gguf_file import GgufFile, stored_dtype

ARCHS = ("qwen3next", "qwen35moe")
OFFSET_NORMS = ("attn_norm", "post_attention_norm", "attn_q_norm", "attn_k_norm")
# GGUF tensor -> the linear attention's parameter (Qwen3-Next's in_proj_qkvz and in_proj_ba apart)
LINEAR = {"ssm_a": "A_log", "ssm_conv1d": "conv1d.weight", "ssm_dt": "dt_bias", "ssm_norm": "norm.weight",
          "ssm_out": "out_proj.weight", "attn_qkv": "in_proj_qkv.weight", "attn_gate": "in_proj_z.weight",
          "ssm_beta": "in_proj_b.weight", "ssm_alpha": "in_proj_a.weight", "ssm_ba": "in_proj_ba.weight",
          "ssm_in": "in_proj_qkvz.weight"}
VISION = ("v.", "mm.")          # Ollama's Qwen3.5 files: the vision tower, in the same (not served)


def linear_config(g: GgufFile, layers: int) -> dict[str, Any]:
    """The linear attention's config fields, and each layer's kind (a layer with ``ssm_a`` is a
    linear one: the tensors say, whatever recurrent_layers or the interval would)."""
    a = g.arch_meta
    v_heads = int(a("ssm.time_step_rank"))
    return {"linear_conv_kernel_dim": int(a("ssm.conv_kernel")), "linear_key_head_dim": int(a("ssm.state_size")),
            "linear_num_key_heads": int(a("ssm.group_count")), "linear_num_value_heads": v_heads,
            "linear_value_head_dim": int(a("ssm.inner_size")) // v_heads,
            "layer_types": ["linear_attention" if f"blk.{i}.ssm_a" in g.tensors else "full_attention"
                            for i in range(layers)]}


def handles(g: GgufFile, gguf_name: str) -> bool:
    """Whether ``hybrid_tensor`` reads GGUF tensor ``gguf_name``."""
    if g.arch not in ARCHS:
        return False
    parts = gguf_name.split(".")
    if gguf_name == "output_norm.weight":
        return True
    if len(parts) not in (3, 4) or parts[0] != "blk":                    # blk.N.ssm_a has no suffix
        return False
    # attn_qkv/attn_gate are the linear layers' (a full-attention layer's, in a --fuse-qkv file,
    # are left to be refused as unknown)
    linear = parts[2] in LINEAR and (parts[2] not in ("attn_qkv", "attn_gate") or f"blk.{parts[1]}.ssm_a" in g.tensors)
    return parts[2] in OFFSET_NORMS or linear


def tiled(g: GgufFile) -> bool:
    """Whether the file's value heads are tiled: Qwen3.5's as llama.cpp writes them, or as
    Ollama's converter says."""
    return bool(g.arch_meta("ssm.v_head_reordered", g.arch == "qwen35moe"))


def hybrid_tensor(g: GgufFile, config: dict[str, Any], name: str
                  ) -> Optional[tuple[str, Callable[[], torch.Tensor]]]:
    """(HF name, read) of a tensor ``handles`` names, in its ``stored_dtype``; None for
    Qwen3-Next's attn_gate, which the read of attn_qkv joins."""
    if name == "output_norm.weight":
        return "model.norm.weight", lambda: _offset(g, name)
    parts = name.split(".")
    base, kind = f"model.layers.{parts[1]}", parts[2]
    if kind in OFFSET_NORMS:
        module = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                  "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}[kind]
        return f"{base}.{module}.weight", lambda: _offset(g, name)
    if kind == "attn_gate" and g.arch == "qwen3next":
        return None
    if kind == "attn_qkv" and g.arch == "qwen3next":
        return f"{base}.linear_attn.in_proj_qkvz.weight", lambda: _qkvz(g, config, f"blk.{parts[1]}")
    return f"{base}.linear_attn.{LINEAR[kind]}", lambda: _linear(g, config, name, kind)


def _offset(g: GgufFile, name: str) -> torch.Tensor:
    return (g.read(name) - 1.0).to(stored_dtype(g.type_name(name)))


def _untile(w: torch.Tensor, dim: int, config: dict[str, Any], head_dim: int) -> torch.Tensor:
    """Qwen3.5's value heads along ``dim`` back from ggml's tiled order to grouped by key head."""
    k_heads, v_heads = config["linear_num_key_heads"], config["linear_num_value_heads"]
    if k_heads == v_heads:
        return w
    shape = list(w.shape)
    tiled = w.reshape(*shape[:dim], v_heads // k_heads, k_heads, head_dim, *shape[dim + 1:])
    return tiled.transpose(dim, dim + 1).reshape(shape)


def _linear(g: GgufFile, config: dict[str, Any], name: str, kind: str) -> torch.Tensor:
    w = g.read(name)
    dv = config["linear_value_head_dim"]
    qk = 2 * config["linear_num_key_heads"] * config["linear_key_head_dim"]   # conv and qkv rows before v
    if kind == "ssm_a":
        w = torch.log(-w)                               # A = -exp(A_log)
    if tiled(g):
        if kind in ("ssm_a", "ssm_dt", "ssm_beta", "ssm_alpha"):
            w = _untile(w, 0, config, 1)
        elif kind == "attn_gate":
            w = _untile(w, 0, config, dv)
        elif kind in ("attn_qkv", "ssm_conv1d"):
            w = torch.cat([w[:qk], _untile(w[qk:], 0, config, dv)])
        elif kind == "ssm_out":
            w = _untile(w, 1, config, dv)
    if kind == "ssm_conv1d":
        w = w.unsqueeze(1)                              # [C, K] -> the Conv1d's [C, 1, K]
    return w.to(stored_dtype(g.type_name(name)))


def _qkvz(g: GgufFile, config: dict[str, Any], block: str) -> torch.Tensor:
    """Qwen3-Next's in_proj_qkvz [Hk * (2 Dk + 2 g Dv), H] from llama.cpp's q|k|v of all heads and z."""
    qkv, z = g.read(f"{block}.attn_qkv.weight"), g.read(f"{block}.attn_gate.weight")
    hk, dk = config["linear_num_key_heads"], config["linear_key_head_dim"]
    gdv = config["linear_num_value_heads"] // hk * config["linear_value_head_dim"]
    hidden = qkv.shape[-1]
    q, k, v = qkv.split([hk * dk, hk * dk, hk * gdv])
    per_head = [q.view(hk, dk, hidden), k.view(hk, dk, hidden), v.view(hk, gdv, hidden), z.view(hk, gdv, hidden)]
    dtype = torch.promote_types(*(stored_dtype(g.type_name(f"{block}.{n}.weight")) for n in ("attn_qkv", "attn_gate")))
    return torch.cat(per_head, dim=1).reshape(-1, hidden).to(dtype)

