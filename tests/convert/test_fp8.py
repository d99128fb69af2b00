"""FP8 block-scaled checkpoints (DeepSeek-V3's form): dequantized exactly, never loaded as they are,
and converted into a checkpoint that computes what their bf16 dequantization computes; large
dense weights are written in shards."""
from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert.quantize as quantize
from cache.safetensors_file import CheckpointError, read_checkpoint_index
from configs.engine import EngineConfig
from convert.fp8 import dequantize
from engine.engine import Engine, run_to_completion
from engine.loader import load_model
from engine.protocol import GenerateRequest, SamplingParams
from cache.provider import ResidentExpertProvider
from moeserve.wiring import resolve_quantized_dir
from tests.engine.tiny_families import make_family_checkpoint

CPU = torch.device("cpu")
BLOCK = (16, 16)          # the tiny model's dims (24, 32, 64, 96...) leave partial edge blocks
FP8_MAX = 448.0


def blockwise_reference(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Block by block, as DeepSeek's weight_dequant kernel computes it (fp32 product, bf16 out)."""
    out = torch.empty(q.shape, dtype=torch.bfloat16)
    bo, bi = block
    for r in range(scale.shape[0]):
        for c in range(scale.shape[1]):
            blk = q[r * bo:(r + 1) * bo, c * bi:(c + 1) * bi].float() * scale[r, c].float()
            out[r * bo:(r + 1) * bo, c * bi:(c + 1) * bi] = blk.to(torch.bfloat16)
    return out


def to_fp8(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w [O, I] -> (fp8 e4m3 [O, I], scale_inv [ceil(O/bo), ceil(I/bi)] fp32), per-block absmax."""
    bo, bi = block
    rows, cols = -(-w.shape[0] // bo), -(-w.shape[1] // bi)
    scale = torch.empty(rows, cols)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for r in range(rows):
        for c in range(cols):
            blk = w[r * bo:(r + 1) * bo, c * bi:(c + 1) * bi].float()
            s = blk.abs().max().clamp(min=1e-12) / FP8_MAX
            scale[r, c] = s
            q[r * bo:(r + 1) * bo, c * bi:(c + 1) * bi] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def test_dequantize_matches_the_blockwise_reference_with_partial_edge_blocks() -> None:
    torch.manual_seed(0)
    w = torch.randn(100, 72) * 3
    q, scale = to_fp8(w, (32, 32))
    assert scale.shape == (4, 3)
    got = dequantize(q, scale, (32, 32))
    assert got.dtype == torch.bfloat16 and torch.equal(got, blockwise_reference(q, scale, (32, 32)))
    assert (got.float() - w).abs().max() < 0.1 * w.abs().max()      # a real FP8 round trip
    with pytest.raises(ValueError, match="expected \\[4, 3\\]"):
        dequantize(q, scale[:, :2], (32, 32))


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(an FP8 DeepSeek-V3 checkpoint, the bf16 checkpoint of its dequantized weights)."""
    base = make_family_checkpoint("deepseek_v3", str(tmp_path_factory.mktemp("v3")), torch.bfloat16)
    fp8_dir, ref_dir = (str(tmp_path_factory.mktemp(n)) for n in ("v3-fp8", "v3-ref"))
    tensors = load_file(os.path.join(base, "model.safetensors"))
    fp8, ref = {}, {}
    for name, t in tensors.items():
        linear = t.dim() == 2 and name.endswith("_proj.weight") or name.endswith("_mqa.weight")
        if linear:      # as DeepSeek ships them: linear layers FP8, routers/norms/embeddings not
            q, s = to_fp8(t, BLOCK)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            ref[name] = blockwise_reference(q, s, BLOCK)
        else:
            fp8[name] = ref[name] = t
    assert any(".experts." in n and n.endswith("_scale_inv") for n in fp8)
    for d, weights in ((fp8_dir, fp8), (ref_dir, ref)):
        for f in os.listdir(base):
            if not f.endswith(".safetensors"):
                shutil.copy2(os.path.join(base, f), d)
        save_file(weights, os.path.join(d, "model.safetensors"))
    cfg_path = os.path.join(fp8_dir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": list(BLOCK)}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return fp8_dir, ref_dir


def greedy(path: str) -> tuple[list[int], torch.Tensor]:
    lm = load_model(path, CPU, torch.bfloat16, context_length=64)
    eng = Engine(lm, ResidentExpertProvider(lm.experts, CPU, torch.bfloat16), max_batch=2)
    try:
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=True)
        prompt = (150, 7, 7, 21, 99, 100, 4, 58, 33, 11, 60, 2, 19)
        out = run_to_completion(eng, [GenerateRequest("a", prompt, params)])["a"]
        return out.token_ids, torch.tensor(out.logprobs)
    finally:
        eng.close()


def test_an_fp8_checkpoint_is_refused_as_is_and_converted_like_its_dequantization(
        fp8_pair: tuple[str, str], tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    fp8_dir, ref_dir = fp8_pair
    with pytest.raises(CheckpointError, match="FP8 checkpoint"):
        load_model(fp8_dir, CPU, torch.bfloat16)
    with pytest.raises(quantize.BuildError, match="FP8"):
        quantize.ensure_quantized(fp8_dir, "none", home=str(tmp_path))
    # serve without --quantize: int8 experts, converted once into MOESERVE_HOME
    os.environ["MOESERVE_HOME"] = str(tmp_path / "home")
    try:
        with caplog.at_level(logging.INFO, logger="moeserve"):
            got_dir = resolve_quantized_dir(fp8_dir, EngineConfig(model=fp8_dir), CPU, progress=False)
    finally:
        del os.environ["MOESERVE_HOME"]
    assert "an FP8 checkpoint" in caplog.text and got_dir.endswith("-int8")
    want_dir = quantize.ensure_quantized(ref_dir, "int8", home=str(tmp_path / "ref"), progress=False)
    names = set(read_checkpoint_index(got_dir))
    assert not any(n.endswith("_scale_inv") for n in names) and names == set(read_checkpoint_index(want_dir))
    got, want = (load_file(os.path.join(d, "model.safetensors")) for d in (got_dir, want_dir))
    assert all(torch.equal(got[n], want[n]) for n in want)                 # dense weights: bf16, exact
    assert json.load(open(os.path.join(got_dir, "config.json")))["quantization_config"]["quant_method"] == "moeserve"
    tokens, logprobs = greedy(got_dir)
    ref_tokens, ref_logprobs = greedy(want_dir)
    assert tokens == ref_tokens and torch.equal(logprobs, ref_logprobs)
    assert len(set(tokens)) >= 3


def test_large_dense_weights_are_written_in_shards(fp8_pair: tuple[str, str], tmp_path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _, ref_dir = fp8_pair
    whole = quantize.ensure_quantized(ref_dir, "int4", home=str(tmp_path / "whole"), progress=False)
    monkeypatch.setattr(quantize, "DENSE_SHARD_BYTES", 40_000)
    sharded = quantize.ensure_quantized(ref_dir, "int4", home=str(tmp_path / "sharded"), progress=False)
    shards = sorted(f for f in os.listdir(sharded) if f.startswith("model-"))
    assert len(shards) >= 3 and not os.path.exists(os.path.join(sharded, "model.safetensors"))
    assert all(os.path.getsize(os.path.join(sharded, f)) < 40_000 + 20_000 for f in shards[:-1])
    index = json.load(open(os.path.join(sharded, quantize.DENSE_INDEX)))["weight_map"]
    assert set(index.values()) == set(shards) and set(index) == set(read_checkpoint_index(whole))
    (t1, lp1), (t2, lp2) = greedy(sharded), greedy(whole)
    assert t1 == t2 and torch.equal(lp1, lp2)
