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
GPT4O_DIGITS = "\\p{N}{1,3}"            # gpt-4o's split takes digits in threes (GPT-2's: any run)


def _config(out: str) -> dict[str, Any]:
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    return {k: v for k, v in cfg.items() if k != "moeserve_served_name"}


def _tokenizer(out: str) -> tuple[dict[str, Any], str]:
    """tokenizer.json, and the chat template transformers saved beside it."""
    with open(os.path.join(out, "tokenizer.json")) as f, open(os.path.join(out, "chat_template.jinja")) as g:
        return json.load(f), g.read()


def test_ollamas_gpt_oss_file_converts_as_llama_cpps_does(tiny: Callable[..., tuple[str, str]],
                                                          tmp_path: Any) -> None:
    """The same model in llama.cpp's file and in Ollama's (its names, key prefix, missing keys):
    the same config, dense tensors and expert store, bit for bit (llama.cpp's file against the
    checkpoint: test_gguf_model.py)."""
    _, path = tiny("gpt_oss", "Q8_0", "MXFP4")
    ollama = as_ollama_gpt_oss(path, str(tmp_path / "gpt-oss-20b.gguf"))
    theirs = ensure_gguf(path, home=str(tmp_path / "a"), progress=False)
    ours = ensure_gguf(ollama, home=str(tmp_path / "b"), progress=False)
    assert _config(ours) == _config(theirs)
    assert _config(ours)["rope_scaling"]["rope_type"] == "yarn"         # gptoss files name no scaling type
    a, b = load_file(os.path.join(theirs, "model.safetensors")), load_file(os.path.join(ours, "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    store = _config(ours)["quantization_config"]["expert_store"]
    assert filecmp.cmp(os.path.join(theirs, store), os.path.join(ours, store), shallow=False)


def test_ollamas_gpt_oss_tokenizer_splits_as_gpt_4o_with_moeserves_harmony_template(
        tiny: Callable[..., tuple[str, str]], tmp_path: Any) -> None:
    """Ollama's files name GPT-2's pre-tokenizer and carry no chat template: o200k's split and
    moeserve's harmony template replace them; llama.cpp's file keeps its own template."""
    from importlib.resources import files

    from server.tokenizer import TextTokenizer
    _, path = tiny("gpt_oss", "Q8_0", "MXFP4")
    ours = ensure_gguf(as_ollama_gpt_oss(path, str(tmp_path / "oss.gguf")), home=str(tmp_path / "b"),
                       progress=False)
    theirs = ensure_gguf(path, home=str(tmp_path / "a"), progress=False)
    (tok, template), (their_tok, their_template) = _tokenizer(ours), _tokenizer(theirs)
    assert GPT4O_DIGITS in json.dumps(tok["pre_tokenizer"])
    assert GPT4O_DIGITS not in json.dumps(their_tok["pre_tokenizer"])      # the file says smollm's
    harmony = (files("convert") / "data" / "harmony.jinja").read_text(encoding="utf-8")
    assert template == harmony and their_template != harmony
    text = TextTokenizer(ours).render_chat([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|start|>system<|message|>") and text.endswith("<|start|>user<|message|>Hi<|end|>"
                                                                            "<|start|>assistant")


def test_ollamas_first_gpt_oss_files_are_refused_asking_for_a_new_pull(tiny: Callable[..., tuple[str, str]],
                                                                      tmp_path: Any) -> None:
    """Before October 2025 Ollama stored MXFP4 under ggml type 4, in OpenAI's nibble order."""
    _, path = tiny("gpt_oss", "Q8_0", "MXFP4")
    ollama = as_ollama_gpt_oss(path, str(tmp_path / "new.gguf"))
    old = with_tensor_type(ollama, str(tmp_path / "old.gguf"), "blk.0.ffn_down_exps.weight", 4)
    with pytest.raises(BuildError, match="type 4 is how Ollama's first gpt-oss files .* `ollama pull gpt-oss:20b`"):
        ensure_gguf(old, home=str(tmp_path), progress=False)


def test_ollamas_glm_4_7_flash_file_converts_as_llama_cpps_does(tokenizer: dict[str, Any], tmp_path: Any) -> None:
    """GLM-4.7-Flash (DeepSeek's latent attention, sigmoid routing, one expert group) in llama.cpp's
    file and in Ollama's (glm4moelite, the heads' widths where llama.cpp keeps the latent's, no
    gating or group keys): the same config, tensors and experts, bit for bit."""
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
