"""gpt-oss checkpoints (convert/gpt_oss.py): MXFP4 dequantized as transformers dequantizes it,
stacked checkpoints refused as they are and served converted (per expert, int8, int4), an MXFP4
checkpoint computing what transformers computes on its dequantization, offloaded exactly as
resident."""
from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert.quantize as quantize
from cache.policies import POLICY_NAMES
from cache.safetensors_file import CheckpointError
from configs import CacheConfig, EngineConfig
from convert.gpt_oss import E2M1, dequantize_mxfp4
from engine.loader import load_model
from moeserve.wiring import resolve_quantized_dir
from tests.engine.test_families import PROMPTS, prompt_logits
from tests.engine.test_offload_exact import generate, one_layer_top_k_bytes
from tests.engine.tiny_families import make_family_checkpoint

transformers = pytest.importorskip("transformers")
CPU = torch.device("cpu")


def to_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., In] (In a multiple of 32) -> (blocks [..., In/32, 16] uint8, scales [..., In/32]
    uint8): per 32 weights the power of two that brings the largest to at most 6, each weight
    rounded to the nearest e2m1 value (the low nibble holds the even element)."""
    g = w.float().reshape(*w.shape[:-1], -1, 32)                                  # [..., G, 32]
    exp = torch.ceil(torch.log2(g.abs().amax(-1).clamp(min=1e-30) / 6.0)).clamp(-127, 127)
    x = g / torch.ldexp(torch.ones_like(exp), exp.int())[..., None]
    lut = torch.tensor(E2M1)
    codes = (x[..., None] - lut).abs().argmin(-1).to(torch.uint8)               # [..., G, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exp + 127).to(torch.uint8)


def test_dequantize_matches_transformers() -> None:
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors
    torch.manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), dtype=torch.uint8)           # [E, O, In/32, 16]
    scales = torch.randint(110, 140, (3, 40, 4), dtype=torch.uint8)
    ours = dequantize_mxfp4(blocks, scales)                                      # [E, O, In]
    theirs = _convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)   # [E, In, O]
    assert ours.shape == (3, 40, 128) and torch.equal(ours, theirs.transpose(1, 2))
    w = torch.randn(8, 64) * 0.05
    b, s = to_mxfp4(w)
    back = dequantize_mxfp4(b, s).float()
    assert (back - w).abs().max() < 0.25 * w.abs().max()                        # a real round trip
    with pytest.raises(ValueError, match="expected"):
        dequantize_mxfp4(blocks, scales[..., :3])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tiny gpt-oss in bf16 as transformers writes it (stacked), as OpenAI ships it (MXFP4
    experts, quantization_config mxfp4), and the bf16 checkpoint of the MXFP4 one's
    dequantization (transformers' reference for it)."""
    stacked = make_family_checkpoint("gpt_oss", str(tmp_path_factory.mktemp("stacked")), torch.bfloat16)
    mx, ref = (str(tmp_path_factory.mktemp(n)) for n in ("mxfp4", "dequantized"))
    tensors = load_file(os.path.join(stacked, "model.safetensors"))
    packed, plain = {}, {}
    for name, t in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            b, s = to_mxfp4(t.transpose(1, 2))              # [E, O, In], as OpenAI stores them
            packed[name + "_blocks"], packed[name + "_scales"] = b, s
            plain[name] = dequantize_mxfp4(b, s).transpose(1, 2).contiguous()
        else:
            packed[name] = plain[name] = t
    for d, weights in ((mx, packed), (ref, plain)):
        for f in os.listdir(stacked):
            if not f.endswith(".safetensors"):
                shutil.copy2(os.path.join(stacked, f), d)
        save_file(weights, os.path.join(d, "model.safetensors"))
    with open(os.path.join(mx, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    with open(os.path.join(mx, "config.json"), "w") as f:
        json.dump(cfg, f)
    return {"stacked": stacked, "mxfp4": mx, "dequantized": ref}


def test_stacked_checkpoints_are_refused_as_they_are(checkpoints: dict[str, str]) -> None:
    with pytest.raises(CheckpointError, match="served converted"):
        load_model(checkpoints["stacked"], CPU, torch.bfloat16)
    with pytest.raises(CheckpointError, match="MXFP4 checkpoint"):
        load_model(checkpoints["mxfp4"], CPU, torch.bfloat16)


def test_mxfp4_is_served_as_transformers_computes_its_dequantization(
        checkpoints: dict[str, str], tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """--quantize none: the experts, one by one in bf16, are exactly the MXFP4 values; the
    model's logits are transformers' on the dequantized checkpoint (bf16 tolerance)."""
    per_expert = quantize.ensure_quantized(checkpoints["mxfp4"], "none", home=str(tmp_path), progress=False)
    again = quantize.ensure_quantized(checkpoints["dequantized"], "none", home=str(tmp_path), progress=False)
    assert per_expert.endswith("-per-expert") and per_expert != again
    a, b = (load_file(os.path.join(d, "model.safetensors")) for d in (per_expert, again))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in a
    assert "model.layers.0.mlp.experts.gate_up_proj_bias" in a                   # dense, kept
    assert "quantization_config" not in json.load(open(os.path.join(per_expert, "config.json")))
    ref = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["dequantized"],
                                                            dtype=torch.bfloat16).eval()
    lm = load_model(per_expert, CPU, torch.bfloat16, context_length=64)
    from cache.provider import ResidentExpertProvider
    lm.model.set_provider(ResidentExpertProvider(lm.experts, CPU, torch.bfloat16))
    ours, theirs = prompt_logits(lm, ref, PROMPTS[2])
    torch.testing.assert_close(ours, theirs, rtol=0.0, atol=3e-2)
    # serve without --quantize: int8 experts, converted once
    os.environ["MOESERVE_HOME"] = str(tmp_path / "home")
    try:
        with caplog.at_level(logging.INFO, logger="moeserve"):
            got = resolve_quantized_dir(checkpoints["mxfp4"], EngineConfig(model=checkpoints["mxfp4"]),
                                        CPU, progress=False)
    finally:
        del os.environ["MOESERVE_HOME"]
    assert "an MXFP4 checkpoint" in caplog.text and got.endswith("-int8")


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_gpt_oss_offloaded_equals_resident(checkpoints: dict[str, str], tmp_path, kind: str) -> None:
    out = quantize.ensure_quantized(checkpoints["stacked"], kind, home=str(tmp_path), progress=False)
    lm = load_model(out, CPU, torch.bfloat16, context_length=64)
    want, _ = generate(lm, CacheConfig())
    assert len(set(want["0"][0])) >= 3
    for policy in POLICY_NAMES:
        got, stats = generate(lm, CacheConfig(expert_budget=str(one_layer_top_k_bytes(lm)),
                                              policy=policy, prefetch="on"))
        assert got == want, policy
        assert stats["misses"] > 0


def test_serving_a_stacked_checkpoint_converts_it_once(checkpoints: dict[str, str], tmp_path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    os.environ["MOESERVE_HOME"] = str(tmp_path)
    try:
        with caplog.at_level(logging.INFO):
            first = resolve_quantized_dir(checkpoints["stacked"], EngineConfig(model=checkpoints["stacked"]),
                                          CPU, progress=False)
            second = resolve_quantized_dir(checkpoints["stacked"], EngineConfig(model=checkpoints["stacked"]),
                                           CPU, progress=False)
    finally:
        del os.environ["MOESERVE_HOME"]
    assert first == second and first.endswith("-per-expert")
    assert caplog.text.count("converting") == 1 and "served converted once" in caplog.text
    lm = load_model(first, CPU, torch.float32, context_length=64)
    assert len(lm.experts) == 3 * 8 and lm.info.model_type == "gpt_oss"


def test_a_large_conversion_is_written_in_shards(checkpoints: dict[str, str], tmp_path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-expert conversions are written one shard in memory at a time, experts included."""
    whole = quantize.ensure_quantized(checkpoints["mxfp4"], "none", home=str(tmp_path / "a"), progress=False)
    monkeypatch.setattr(quantize, "DENSE_SHARD_BYTES", 40_000)
    sharded = quantize.ensure_quantized(checkpoints["mxfp4"], "none", home=str(tmp_path / "b"), progress=False)
    shards = sorted(f for f in os.listdir(sharded) if f.startswith("model-"))
    assert len(shards) >= 3 and not os.path.exists(os.path.join(sharded, "model.safetensors"))
    want = load_file(os.path.join(whole, "model.safetensors"))
    got: dict[str, torch.Tensor] = {}
    for f in shards:
        got.update(load_file(os.path.join(sharded, f)))
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert len(load_model(sharded, CPU, torch.bfloat16, context_length=32).experts) == 3 * 8


def test_int4_from_mxfp4_uses_its_blocks_of_32(checkpoints: dict[str, str], tmp_path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """int4 groups of 32 line up with MXFP4's scales: asked for explicitly for an MXFP4 source,
    through serve's conversion and moeserve quantize alike; other sources get the format's
    default (the largest of 128/64/32 dividing both dimensions)."""
    asked: list[object] = []
    real = quantize.resolve_format
    monkeypatch.setattr(quantize, "resolve_format", lambda kind, i, h, g, layout="cpu": (asked.append(g), real(kind, i, h, g, layout))[1])
    mx = quantize.ensure_quantized(checkpoints["mxfp4"], "int4", home=str(tmp_path), progress=False)
    assert mx.endswith("-int4-g32") and asked[-1] == 32
    os.makedirs(tmp_path / "out")
    assert quantize.quantize_checkpoint(checkpoints["mxfp4"], str(tmp_path / "out"), "int4", progress=False).group_size == 32
    assert asked[-1] == 32
    quantize.ensure_quantized(checkpoints["stacked"], "int4", home=str(tmp_path), progress=False)
    assert None in asked                     # the stacked bf16 source: the format's own default
