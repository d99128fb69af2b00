"""Synthetic MoE expert checkpoints written with safetensors itself, for the cache tests."""
from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from cache.provider import ExpertSource
from cache.safetensors_file import read_header, slice_leading


def write_experts(directory: str, layers: int, experts: int, inter: int, hidden: int,
                  dtype: torch.dtype = torch.bfloat16, shards: int = 1, fused: bool = False,
                  seed: int = 0) -> tuple[list[ExpertSource], dict[tuple[int, int], torch.Tensor]]:
    """Random experts in ``shards`` files. Mixtral layout (w1/w3/w2 per expert), or with ``fused``
    one [E, 2I, H] gate_up and one [E, H, I] down tensor per layer (experts are slices).
    Returns the sources and, per (layer, expert), the flat gate|up|down reference in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    files: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    want: dict[tuple[int, int], torch.Tensor] = {}
    # a dense tensor between experts, as real checkpoints interleave them
    for layer in range(layers):
        part = files[layer % shards]
        part[f"model.layers.{layer}.input_layernorm.weight"] = torch.randn(hidden, generator=g).to(dtype)
        gate = torch.randn(experts, inter, hidden, generator=g).to(dtype)
        up = torch.randn(experts, inter, hidden, generator=g).to(dtype)
        down = torch.randn(experts, hidden, inter, generator=g).to(dtype)
        for e in range(experts):
            want[(layer, e)] = torch.cat([gate[e].reshape(-1), up[e].reshape(-1), down[e].reshape(-1)])
        if fused:
            part[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1).contiguous()
            part[f"model.layers.{layer}.mlp.experts.down_proj"] = down.contiguous()
        else:
            for e in range(experts):
                pre = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
                part[f"{pre}.w1.weight"] = gate[e].contiguous()
                part[f"{pre}.w3.weight"] = up[e].contiguous()
                part[f"{pre}.w2.weight"] = down[e].contiguous()
    index = {}
    for i, tensors in enumerate(files):
        path = os.path.join(directory, f"model-{i:05d}.safetensors")
        save_file(tensors, path)
        index.update(read_header(path))
    sources = []
    for layer in range(layers):
        for e in range(experts):
            if fused:
                gu = index[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
                gate_ref = slice_leading(gu, e, (0, inter))
                up_ref = slice_leading(gu, e, (inter, 2 * inter))
                down_ref = slice_leading(index[f"model.layers.{layer}.mlp.experts.down_proj"], e)
            else:
                pre = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
                gate_ref, up_ref, down_ref = (index[f"{pre}.w1.weight"], index[f"{pre}.w3.weight"],
                                              index[f"{pre}.w2.weight"])
            sources.append(ExpertSource(layer, e, gate_ref, up_ref, down_ref))
    return sources, want
