"""Ollama's own gpt-oss and GLM-4.7-Flash files (convert/gguf_ollama.py): read as llama.cpp's file of
the same model (gpt-oss with gpt-4o's pre-tokenizer and moeserve's harmony template); Ollama's
first gpt-oss files refused."""
from __future__ import annotations

import filecmp
import json
import os
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file

from convert.gguf_convert import ensure_gguf
from convert.model_store import BuildError
from tests.convert.gguf_cases import FAMILIES, OVERRIDES
from tests.convert.gguf_writer import write_gguf
from tests.convert.gguf_writer_ollama import as_ollama_glm4moelite, as_ollama_gpt_oss, with_tensor_type
from tests.engine.tiny_families import make_family_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _split(tok: dict[str, Any]) -> str:
    """The regex a converted tokenizer.json splits text with before its byte-level BPE."""
    return tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]


def _known_split(pre: str) -> str:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    return GGUF_PRE_TOKENIZER_SPLITS[pre]


def _config(out: str) -> dict[str, Any]:
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    return {k: v for k, v in cfg.items() if k != "moeserve_served_name"}


def _tokenizer(out: str) -> tuple[dict[str, Any], str]:
    """tokenizer.json, and the chat template transformers saved beside it ("": none)."""
    template = os.path.join(out, "chat_template.jinja")
    with open(os.path.join(out, "tokenizer.json")) as f:
        tok = json.load(f)
    if not os.path.isfile(template):
        return tok, ""
    with open(template) as g:
        return tok, g.read()


@pytest.fixture(scope="module")
def gpt_oss_pair(tiny: Callable[..., tuple[str, str]], tmp_path_factory: pytest.TempPathFactory
                 ) -> tuple[str, str, str]:
    """(llama.cpp's tiny gpt-oss file converted, the same file rewritten as Ollama's converted, and
    that file)."""
    _, path = tiny("gpt_oss", "Q8_0", "MXFP4")
    base = tmp_path_factory.mktemp("gpt-oss-pair")
    ollama = as_ollama_gpt_oss(path, str(base / "gpt-oss-20b.gguf"))
    return (ensure_gguf(path, home=str(base / "a"), progress=False),
            ensure_gguf(ollama, home=str(base / "b"), progress=False), ollama)


def test_ollamas_gpt_oss_file_converts_as_llama_cpps_does(gpt_oss_pair: tuple[str, str, str]) -> None:
    """The same model in llama.cpp's file and in Ollama's (its names, key prefix, missing keys):
    the same config, dense tensors and expert store, bit for bit (llama.cpp's file against the
    checkpoint: test_gguf_model.py)."""
    theirs, ours, _ = gpt_oss_pair
    assert _config(ours) == _config(theirs)
    assert _config(ours)["rope_scaling"]["rope_type"] == "yarn"         # gptoss files name no scaling type
    a, b = load_file(os.path.join(theirs, "model.safetensors")), load_file(os.path.join(ours, "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    store = _config(ours)["quantization_config"]["expert_store"]
    assert filecmp.cmp(os.path.join(theirs, store), os.path.join(ours, store), shallow=False)


def test_ollamas_gpt_oss_tokenizer_splits_as_gpt_4o_with_moeserves_harmony_template(
        gpt_oss_pair: tuple[str, str, str]) -> None:
    """Ollama's files name GPT-2's pre-tokenizer and carry no chat template: o200k's split and
    moeserve's harmony template replace them; llama.cpp's file keeps its own template."""
    from importlib.resources import files

    from server.tokenizer import TextTokenizer
    theirs, ours, _ = gpt_oss_pair
    (tok, template), (their_tok, their_template) = _tokenizer(ours), _tokenizer(theirs)
    assert _split(tok) == _known_split("gpt-4o")
    assert "pretokenizers" not in their_tok["pre_tokenizer"] or _split(their_tok) != _known_split("gpt-4o")
    harmony = (files("convert") / "data" / "harmony.jinja").read_text(encoding="utf-8")
    assert template == harmony and their_template != harmony
    text = TextTokenizer(ours).render_chat([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|start|>system<|message|>") and text.endswith("<|start|>user<|message|>Hi<|end|>"
                                                                            "<|start|>assistant")


def test_ollamas_first_gpt_oss_files_are_refused_asking_for_a_new_pull(gpt_oss_pair: tuple[str, str, str],
                                                                      tmp_path: Any) -> None:
    """Until late August 2025 Ollama stored MXFP4 under ggml type 4 (in OpenAI's nibble order), and
    until October each layer's expert gate and up in one tensor (or q, k and v)."""
    from convert.gguf_ollama import translate
    old = with_tensor_type(gpt_oss_pair[2], str(tmp_path / "old.gguf"), "blk.0.ffn_down_exps.weight", 4)
    with pytest.raises(BuildError, match="type 4 is how Ollama's first gpt-oss files .* `ollama pull gpt-oss:20b`"):
        ensure_gguf(old, home=str(tmp_path), progress=False)
    for fused in ("blk.0.ffn_gate_up_exps.weight", "blk.0.attn_qkv.weight"):
        with pytest.raises(BuildError, match=f"oct.gguf: an Ollama gptoss file from before October 2025 .*{fused}"):
            translate("oct.gguf", "gptoss", {"token_embd.weight": None, fused: None}, lambda key, default: default)


def test_ollamas_glm_4_7_flash_file_converts_as_llama_cpps_does(tokenizer: dict[str, Any], tmp_path: Any) -> None:
    """GLM-4.7-Flash (DeepSeek's latent attention, sigmoid routing, one expert group) in llama.cpp's
    file and in Ollama's (glm4moelite, the heads' widths where llama.cpp keeps the latent's, no
    group keys, GPT-2's pre-tokenizer name): the same config, tensors and experts, bit for bit, and
    GLM's split."""
    hf = make_family_checkpoint("deepseek_v3", str(tmp_path / "hf"), overrides={
        **OVERRIDES, **FAMILIES["deepseek_v3"], "n_group": 1, "topk_group": 1})
    path = write_gguf(hf, str(tmp_path / "glm.gguf"), tokenizer, "F32", "Q8_0")
    with open(os.path.join(hf, "config.json")) as f:
        cfg = json.load(f)
    ollama = as_ollama_glm4moelite(path, str(tmp_path / "glm-4.7-flash.gguf"), cfg)
    theirs = ensure_gguf(path, home=str(tmp_path / "a"), progress=False)
    ours = ensure_gguf(ollama, home=str(tmp_path / "b"), progress=False)
    assert _config(ours) == _config(theirs) and _config(ours)["model_type"] == "deepseek_v3"
    a, b = load_file(os.path.join(theirs, "model.safetensors")), load_file(os.path.join(ours, "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    store = _config(ours)["quantization_config"]["expert_store"]
    assert filecmp.cmp(os.path.join(theirs, store), os.path.join(ours, store), shallow=False)
    assert _split(_tokenizer(ours)[0]) == _known_split("llama-bpe")       # GLM's, as llama.cpp splits it
