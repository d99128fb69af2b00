"""Writing the upcycled model as a standard Mixtral checkpoint (bf16, sharded safetensors).

Tensors are produced lazily, shard by shard, so a 10 GB model never has to sit in RAM at once.
Each shard lays its experts out first, gate | up | down per expert (the slot order of
cache/quant.py), after a header padded to 4 KiB: when the tensor sizes are 4 KiB multiples (they
are for SmolLM2's shapes) every expert is one aligned byte range, which the expert cache reads
with one O_DIRECT read straight into a slot (cache/disk.py). Any safetensors reader loads it.
Key names follow Mixtral: model.layers.{i}.block_sparse_moe.gate.weight [E, H] and
model.layers.{i}.block_sparse_moe.experts.{j}.w1/w3.weight [I, H] (gate/up), w2.weight [H, I] (down).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from cache.safetensors_file import padded_header
from cache.slots import ALIGN   # the data section and (given 4 KiB-multiple tensors) each expert
from convert.progress import progress as tqdm  # a bar on a terminal, log lines otherwise

from convert.gguf_import import write_json
from convert.upcycle import perturbed_expert

DTYPE = torch.bfloat16
# Mixtral expert names -> the dense Llama MLP projection each one copies, in slot order
EXPERT_SOURCES = (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]  # returns the bf16 tensor when the shard is written

    @property
    def nbytes(self) -> int:
        n = 2  # bf16
        for s in self.shape:
            n *= s
        return n


def mixtral_config_dict(dense_cfg: dict[str, Any], experts: int, top_k: int) -> dict[str, Any]:
    """config.json of the MoE: the dense Llama fields plus Mixtral's routing fields."""
    cfg = {k: v for k, v in dense_cfg.items() if k not in ("architectures", "model_type", "mlp_bias")}
    cfg.update({
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": int(experts),
        "num_experts_per_tok": int(top_k),
        "output_router_logits": False,
        "router_aux_loss_coef": 0.0,
        "router_jitter_noise": 0.0,
        "sliding_window": None,
        "torch_dtype": "bfloat16",
    })
    return cfg


def plan_tensors(dense: dict[str, torch.Tensor], routers: list[torch.Tensor], experts: int,
                 noise: float, seed: int) -> list[PlannedTensor]:
    """Every tensor of the MoE checkpoint, in a fixed order (non-FFN dense tensors, then per layer;
    each expert's tensors in slot order)."""
    n_layers = len(routers)
    plan: list[PlannedTensor] = []
    mlp_prefix = tuple(f"model.layers.{i}.mlp." for i in range(n_layers))
    for name in sorted(dense):
        if not name.startswith(mlp_prefix):
            t = dense[name]
            plan.append(PlannedTensor(name, tuple(t.shape), lambda t=t: t.to(DTYPE).contiguous()))
    for i in range(n_layers):
        base = f"model.layers.{i}.block_sparse_moe"
        g = routers[i]
        plan.append(PlannedTensor(f"{base}.gate.weight", tuple(g.shape), lambda g=g: g.to(DTYPE).contiguous()))
        for j in range(experts):
            for wname, src in EXPERT_SOURCES:
                d = dense[f"model.layers.{i}.mlp.{src}.weight"]
                plan.append(PlannedTensor(
                    f"{base}.experts.{j}.{wname}.weight", tuple(d.shape),
                    lambda d=d, i=i, j=j, w=wname: perturbed_expert(d, noise, seed, i, j, w).to(DTYPE)))
    return plan


def _unit(name: str) -> str:
    """Tensors of one expert share a unit (a shard never splits an expert); others stand alone."""
    return name.rsplit(".", 2)[0] if is_expert(name) else name


def shard_plan(plan: list[PlannedTensor], shard_bytes: int) -> list[list[PlannedTensor]]:
    """Consecutive tensors grouped into shards of at most ``shard_bytes`` (a bigger tensor or
    expert stands alone), never splitting an expert's gate | up | down."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > shard_bytes and _unit(shards[-1][-1].name) != _unit(t.name):
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]


def is_expert(name: str) -> bool:
    return ".block_sparse_moe.experts." in name


def write_shard(path: str, tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> None:
    """One safetensors file with the tensors' bytes in the given order after a header padded so
    that the data starts on an ALIGN boundary (the O_DIRECT reads' alignment). safetensors'
    save_file cannot do this: it orders tensors by dtype and name and does not pad."""
    header: dict[str, Any] = {"__metadata__": metadata}
    pos = 0
    for name, t in tensors:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [pos, pos + n]}
        if t.dtype != DTYPE:
            raise ValueError(f"{name}: expected {DTYPE}, got {t.dtype}")
        pos += n
    with open(path, "wb") as f:   # ENOSPC: see model_store.is_disk_full
        f.write(padded_header(header, ALIGN))
        for _, t in tensors:
            f.write(memoryview(t.contiguous().view(torch.int16).numpy()).cast("B"))


def write_checkpoint(plan: list[PlannedTensor], out_dir: str, shard_bytes: int, progress: bool = True) -> None:
    """Write the tensors as safetensors shards (+ model.safetensors.index.json when more than one),
    each shard's experts first (see the module docstring)."""
    shards = shard_plan(plan, shard_bytes)
    names = shard_names(len(shards))
    total = sum(t.nbytes for t in plan)
    bar = tqdm(total=total, desc="writing experts", unit="B", unit_scale=True, disable=not progress)
    try:
        for fname, shard in zip(names, shards):
            ordered = [t for t in shard if is_expert(t.name)] + [t for t in shard if not is_expert(t.name)]
            tensors = [(t.name, t.make()) for t in ordered]
            write_shard(os.path.join(out_dir, fname), tensors, {"format": "pt"})
            bar.update(sum(t.nbytes for t in shard))
            del tensors
    finally:
        bar.close()
    if len(shards) > 1:
        weight_map = {t.name: fname for fname, shard in zip(names, shards) for t in shard}
        write_json(os.path.join(out_dir, "model.safetensors.index.json"),
                   {"metadata": {"total_size": total}, "weight_map": weight_map})
