"""llama.cpp's own convert_hf_to_gguf.py (from the installed llama-cpp-python's source, as the
benchmarks use it) on each family's tiny checkpoint, then moeserve's GGUF conversion: the same
logits as moeserve on the checkpoint itself. Skipped unless llama-cpp-python is installed
(`make bench-install`); the first run downloads its source distribution for the converter."""
from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from typing import Any

import pytest
import torch

from convert.gguf_convert import ensure_gguf
from tests.convert.gguf_cases import FAMILIES, OVERRIDES, PROMPT, logits
from tests.engine.tiny_families import engine_dir, make_family_checkpoint

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python is not installed (make bench-install)"),
              pytest.mark.filterwarnings("ignore::UserWarning")]
# llama.cpp's OLMoE converter does not carry clip_qkv (OLMoE's released configs have none); its
# GLM converter looks up GLM's special tokens, added here (and room for them in the vocabulary);
# its DeepSeek and MiniMax converters write the gating function from scoring_func, which their
# released config.json files name (transformers' config classes leave it out)
EXTRA = {"olmoe": {"clip_qkv": None}, "glm4_moe": {"vocab_size": 49160}, "deepseek_v3": {"scoring_func": "sigmoid"},
         "minimax_m2": {"scoring_func": "sigmoid"}}
ADDED = {"glm4_moe": ["[gMASK]", "<|user|>", "<|endoftext|>", "<|observation|>"]}
# the tiny Qwen3-Next/3.5 checkpoints have no multi-token-prediction layers, which the converter
# otherwise counts on; transformers loads any tokenizer beside a Qwen3.5 config as Qwen3.5's own,
# whose split the converter cannot match to a known hash: the file names Qwen3.5's pre-tokenizer;
# ERNIE's converter reads only SentencePiece vocabularies: SmolLM2's BPE one is read as GPT-2's
# (the tensors are what these tests check)
ARGS = {"qwen3_next": ["--no-mtp"], "qwen3_5_moe_text": ["--no-mtp"]}
PRE = {"qwen3_5_moe_text": "qwen35"}
GPT2_VOCAB = {"ernie4_5_moe": "ernie.Ernie4_5Model"}
PATCHED = ("import importlib, runpy, sys; sys.path.insert(0, sys.argv[1]); import conversion.base as base; "
           "pre, cls = sys.argv[2], sys.argv[3]; "
           "pre == '-' or setattr(base.TextModel, 'get_vocab_base_pre', lambda self, tok: pre); "
           "mod, _, name = cls.partition('.'); "
           "cls == '-' or setattr(getattr(importlib.import_module('conversion.' + mod), name), 'set_vocab', "
           "base.TextModel._set_vocab_gpt2); "
           "sys.argv = sys.argv[4:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def converter_command(name: str, converter: str) -> list[str]:
    """python and llama.cpp's converter, patched as ``name``'s tiny checkpoint needs (PRE, GPT2_VOCAB)."""
    if name not in PRE and name not in GPT2_VOCAB:
        return [sys.executable, converter]
    return [sys.executable, "-c", PATCHED, os.path.dirname(converter), PRE.get(name, "-"),
            GPT2_VOCAB.get(name, "-"), converter]


@pytest.fixture(scope="module")
def converter() -> str:
    from bench.e2e_gguf import converter_path
    try:
        return converter_path()
    except RuntimeError as e:          # no network for the source distribution
        pytest.skip(str(e))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_llama_cpp_conversion_serves_the_same_logits(name: str, converter: str,
                                                     smollm2_hf_tokenizer: Any, tmp_path: Any) -> None:
    hf = make_family_checkpoint(name, str(tmp_path / "hf"), overrides={**OVERRIDES, **FAMILIES[name],
                                                                      **EXTRA.get(name, {})})
    tok = copy.deepcopy(smollm2_hf_tokenizer)
    if name in ADDED:
        tok.add_special_tokens({"additional_special_tokens": ADDED[name]})
    tok.save_pretrained(hf)
    out = str(tmp_path / "m.gguf")
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(converter), "gguf-py"))
    r = subprocess.run([*converter_command(name, converter), "--outtype", "f32", *ARGS.get(name, []), "--outfile", out, hf],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    served = ensure_gguf(out, home=str(tmp_path / "home"), progress=False)
    torch.testing.assert_close(logits(served), logits(engine_dir(hf)), rtol=0, atol=1e-5)


EQUAL_HEADS = {"linear_key_head_dim": 16, "linear_value_head_dim": 16}
# tiny shapes llama.cpp's runtime takes: DeepSeek-V2 with a q LoRA (it reads V2 without one only at
# V2-Lite's depth), Qwen3-Next/3.5 with equal key and value head sizes, Qwen3.5 with rope sections
# that fit its rotary width, ERNIE with the dense size its converter derives the shared experts'
# from (intermediate_size / kv heads, as in the released models)
RUNNABLE = {"qwen3_moe": {}, "glm4_moe": {}, "deepseek_v2": {"q_lora_rank": 32}, "deepseek_v3": {},
            "ernie4_5_moe": {"intermediate_size": 64}, "minimax_m2": {},
            "qwen3_next": EQUAL_HEADS,
            "qwen3_5_moe_text": {**EQUAL_HEADS, "rope_parameters": {
                "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                "mrope_section": [2, 1, 1], "mrope_interleaved": True}}}


@pytest.mark.parametrize("name", list(RUNNABLE))
def test_llama_cpp_runs_its_split_q8_0_file_as_moeserve_serves_it(name: str, converter: str,
                                                                  smollm2_hf_tokenizer: Any, tmp_path: Any) -> None:
    """llama.cpp's converter writes a Q8_0 file split in parts; llama.cpp runs it, and moeserve
    serves it (named by its last part): both see the same Q8_0 weights, so moeserve's logits are
    as close to the F32 checkpoint's as llama.cpp's, and close to llama.cpp's."""
    import glob

    import llama_cpp
    import numpy as np
    hf = make_family_checkpoint(name, str(tmp_path / "hf"), overrides={**OVERRIDES, **FAMILIES[name],
                                                                      **EXTRA.get(name, {}), **RUNNABLE[name]})
    tok = copy.deepcopy(smollm2_hf_tokenizer)
    if name in ADDED:
        tok.add_special_tokens({"additional_special_tokens": ADDED[name]})
    tok.save_pretrained(hf)
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(converter), "gguf-py"))
    r = subprocess.run([*converter_command(name, converter), "--outtype", "q8_0", *ARGS.get(name, []), "--split-max-tensors", "20",
                        "--outfile", str(tmp_path / "tiny-Q8_0.gguf"), hf], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    parts = sorted(glob.glob(str(tmp_path / "tiny-Q8_0-*-of-*.gguf")))
    assert len(parts) > 1
    llm = llama_cpp.Llama(model_path=parts[0], logits_all=True, verbose=False, n_ctx=64)
    llm.eval(list(PROMPT))
    theirs = torch.tensor(np.array(llm.scores[:len(PROMPT)]))
    ours = logits(ensure_gguf(parts[-1], home=str(tmp_path / "home"), progress=False))
    ref = logits(engine_dir(hf))
    off = {"ours": (ours - ref).abs().max().item(), "theirs": (theirs - ref).abs().max().item(),
           "between": (ours - theirs).abs().max().item()}
    agree = int((ours.argmax(-1) == theirs.argmax(-1)).sum())
    print(f"{name}: {off}, argmax agree {agree}/{len(PROMPT)}, logits up to {ref.abs().max().item():.3f}")   # -s
    assert off["ours"] <= 1.25 * off["theirs"] and off["between"] <= 2 * off["theirs"], off


def add_qwen_mtp(src: str, dst: str) -> None:
    """Copy checkpoint ``src`` to ``dst`` with Qwen3-Next/3.5's multi-token-prediction block: a
    full-attention decoder layer (the checkpoint's layer 1, copied) under ``mtp.layers.0``, the fc
    joining embedding and hidden state, and its norms, as the released checkpoints carry them."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    hidden = tensors["model.embed_tokens.weight"].shape[1]
    mtp = {k.replace("model.layers.1.", "mtp.layers.0."): v.clone() for k, v in tensors.items()
           if k.startswith("model.layers.1.")}
    mtp["mtp.fc.weight"] = torch.randn(hidden, 2 * hidden) * 0.05
    for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        mtp[f"mtp.{norm}.weight"] = torch.randn(hidden) * 0.1
    save_file({**tensors, **mtp}, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump({**cfg, "mtp_num_hidden_layers": 1}, f)


@pytest.mark.parametrize("name", ["qwen3_next", "qwen3_5_moe_text"])
def test_llama_cpp_conversion_with_the_mtp_block_serves_the_same_logits(name: str, converter: str,
                                                                        smollm2_hf_tokenizer: Any, tmp_path: Any) -> None:
    """llama.cpp's converter exports Qwen's multi-token-prediction block by default, as the
    released GGUFs hold it: it is left out, and the logits are the checkpoint's."""
    import gguf
    plain = make_family_checkpoint(name, str(tmp_path / "plain"), overrides={**OVERRIDES, **FAMILIES[name]})
    hf = str(tmp_path / "mtp")
    add_qwen_mtp(plain, hf)
    copy.deepcopy(smollm2_hf_tokenizer).save_pretrained(hf)
    out = str(tmp_path / "m.gguf")
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(converter), "gguf-py"))
    r = subprocess.run([*converter_command(name, converter), "--outtype", "f32", "--outfile", out, hf], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    reader = gguf.GGUFReader(out)
    arch = reader.fields["general.architecture"].contents()
    assert reader.fields[f"{arch}.nextn_predict_layers"].contents() == 1
    assert any(t.name.startswith("blk.3.") for t in reader.tensors)          # the block, after the 3 layers
    served = ensure_gguf(out, home=str(tmp_path / "home"), progress=False)
    torch.testing.assert_close(logits(served), logits(engine_dir(plain)), rtol=0, atol=1e-5)
