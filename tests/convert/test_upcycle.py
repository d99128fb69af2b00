"""Upcycling pieces: spherical k-means routers, router scale, seeded expert perturbations, sharding."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from cache.disk import ExpertReader
from cache.provider import ExpertSource, read_tensor
from cache.safetensors_file import read_checkpoint_index
from cache.slots import aligned_empty
from convert.moe_writer import plan_tensors, shard_plan, write_checkpoint
from convert.upcycle import perturbed_expert, router_scale, spherical_kmeans


def _blobs(n: int = 300, d: int = 16, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    centers = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1) * 5
    labels = torch.arange(n) % k
    return centers[labels] + 0.3 * torch.randn(n, d, generator=g), labels


def test_kmeans_recovers_clusters_and_routes_like_its_assignment() -> None:
    x, labels = _blobs()
    c, assign = spherical_kmeans(x, 4, seed=3)
    assert torch.allclose(c.norm(dim=1), torch.ones(4), atol=1e-5)
    # same partition up to relabelling
    for j in range(4):
        assert len(set(labels[assign == j].tolist())) == 1
    # the router's top-1 (x @ c.T) equals the cosine assignment, and is scale invariant
    assert torch.equal((x @ (3.0 * c).T).argmax(1), assign)


def test_kmeans_is_deterministic_and_seeded() -> None:
    x, _ = _blobs()
    a1, a2 = spherical_kmeans(x, 4, seed=5), spherical_kmeans(x, 4, seed=5)
    assert torch.equal(a1[0], a2[0]) and torch.equal(a1[1], a2[1])


def test_router_scale_sets_logit_spread() -> None:
    x, _ = _blobs()
    c, _ = spherical_kmeans(x, 4, seed=0)
    s = router_scale(x, c, 1.5)
    assert abs(float((x @ (s * c).T).std(dim=1).median()) - 1.5) < 1e-4


def test_perturbation_is_seeded_small_and_per_expert() -> None:
    w = torch.randn(32, 16)
    e0 = perturbed_expert(w, 0.005, 0, 3, 0, "w1")
    assert torch.equal(e0, perturbed_expert(w, 0.005, 0, 3, 0, "w1"))
    assert not torch.equal(e0, perturbed_expert(w, 0.005, 0, 3, 1, "w1"))
    rel = float((e0 - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt())
    assert 0.004 < rel < 0.006


def test_sharded_checkpoint_has_index_and_all_tensors(tmp_path) -> None:
    dense = {"model.embed_tokens.weight": torch.randn(10, 4),
             "model.layers.0.mlp.gate_proj.weight": torch.randn(6, 4),
             "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4),
             "model.layers.0.mlp.down_proj.weight": torch.randn(4, 6)}
    plan = plan_tensors(dense, [torch.randn(3, 4)], experts=3, noise=0.02, seed=0)
    assert len(shard_plan(plan, 100)) > 1
    write_checkpoint(plan, str(tmp_path), 100, progress=False)
    with open(tmp_path / "model.safetensors.index.json") as f:
        wm = json.load(f)["weight_map"]
    assert set(wm) == {t.name for t in plan}
    assert "model.layers.0.block_sparse_moe.experts.2.w2.weight" in wm
    name = "model.layers.0.block_sparse_moe.experts.1.w3.weight"
    with safe_open(os.path.join(tmp_path, wm[name]), framework="pt") as f:
        t = f.get_tensor(name)
    assert t.dtype == torch.bfloat16 and t.shape == (6, 4)
    assert torch.allclose(t.float(), dense["model.layers.0.mlp.up_proj.weight"], atol=0.1)


@pytest.mark.parametrize("direct", [False, True])
def test_checkpoint_experts_are_read_straight_into_slots(tmp_path, direct: bool) -> None:
    # 32x64 bf16 = 4 KiB per tensor: every expert is one aligned gate|up|down range of its shard
    inter, hidden = 32, 64
    dense = {"model.embed_tokens.weight": torch.randn(10, hidden),
             "model.layers.0.input_layernorm.weight": torch.randn(hidden),   # 128 B: not aligned
             "model.layers.0.mlp.gate_proj.weight": torch.randn(inter, hidden),
             "model.layers.0.mlp.up_proj.weight": torch.randn(inter, hidden),
             "model.layers.0.mlp.down_proj.weight": torch.randn(hidden, inter)}
    plan = plan_tensors(dense, [torch.randn(3, hidden)], experts=3, noise=0.02, seed=0)
    write_checkpoint(plan, str(tmp_path), 5 * 4096, progress=False)   # shards of 1-2 experts
    index = read_checkpoint_index(str(tmp_path))
    reader = ExpertReader(direct=direct)
    if direct and not reader.uses_direct(index["model.embed_tokens.weight"].path):
        pytest.skip(f"{tmp_path}: file system refuses O_DIRECT")
    pre = "model.layers.0.block_sparse_moe.experts"
    sources = [ExpertSource(0, e, gate=index[f"{pre}.{e}.w1.weight"], up=index[f"{pre}.{e}.w3.weight"],
                            down=index[f"{pre}.{e}.w2.weight"]) for e in range(3)]
    for s in sources:
        reads = reader.plan(s)
        assert [(r.slot_byte, r.length) for r in reads] == [(0, 3 * 4096)]
    staging = reader.new_staging()
    slot = aligned_empty(3 * 4096)
    for s in sources:
        staging.fill_(7)
        want = torch.cat([read_tensor(r).reshape(-1) for r in (s.gate, s.up, s.down)])
        reader.read_into(s, slot.view(torch.bfloat16), staging)
        assert torch.equal(slot.view(torch.bfloat16), want)
        assert bool((staging == 7).all())          # the bytes never went through staging
        as_fp32 = torch.empty(3 * inter * hidden)
        reader.read_into(s, as_fp32, staging)       # another slot dtype: staged and converted
        assert torch.equal(as_fp32, want.float())
    # transformers' own loader reads the reordered, padded shards (safetensors' reader, too)
    with safe_open(index[f"{pre}.1.w2.weight"].path, framework="pt") as f:
        assert torch.equal(f.get_tensor(f"{pre}.1.w2.weight"), read_tensor(index[f"{pre}.1.w2.weight"]))
    reader.close()
