"""Where GGUF files come from and how their producers lay them out: Ollama's store, folders and
per-quantization subfolders, split parts, refused files, older llama.cpp layouts (DeepSeek's whole
kv_b_proj, Qwen3-Next's in_proj_qkvz), Ollama's Qwen3.5, files without DeepSeek's gating key,
DeepSeek's pre-tokenizers (the other names: test_gguf_pre.py), and fused expert gate/up tensors."""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from configs.models import model_name
from convert.gguf_convert import ensure_gguf
from convert.model_store import BuildError
from moeserve.model_ref import resolve_in_child, resolve_model
from tests.convert.gguf_cases import FAMILIES, OVERRIDES, logits
from tests.convert.gguf_writer import write_gguf
from tests.engine.tiny_families import make_family_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_served_from_an_ollama_store_by_name(tiny: Callable[..., tuple[str, str]], tmp_path: Any,
                                             monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                             capfd: pytest.CaptureFixture[str]) -> None:
    _, path = tiny("olmoe")
    store = tmp_path / "ollama"
    digest = "sha256:" + "ab" * 32
    (store / "blobs").mkdir(parents=True)
    os.link(path, store / "blobs" / digest.replace(":", "-"))
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / "tiny-olmoe" / "q8"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.template", "digest": "x"},
                                               {"mediaType": "application/vnd.ollama.image.model", "digest": digest}]}))
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    monkeypatch.setenv("MOESERVE_HOME", str(tmp_path / "home"))
    out = resolve_model("tiny-olmoe:q8", progress=False)
    assert os.path.basename(out) == "ollama--tiny-olmoe-q8-float32"
    assert model_name(out) == "tiny-olmoe:q8"            # served under the name Ollama's clients use
    assert resolve_model("tiny-olmoe:q8", progress=False) == out          # converted once, reused
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="moeserve"):
        assert resolve_in_child("tiny-olmoe:q8") == out       # as `serve` resolves it: in a child process
    assert (caplog.text + capfd.readouterr().err).count("the GGUF Ollama pulled") == 1      # the child's line
    with pytest.raises(FileNotFoundError, match="not a model Ollama has pulled"):
        resolve_model("tiny-olmoe:latest")
    hf = store / "manifests" / "hf.co" / "Org" / "Tiny-GGUF" / "Q8_0"     # `ollama pull hf.co/Org/Tiny-GGUF:Q8_0`
    hf.parent.mkdir(parents=True)
    hf.write_text(manifest.read_text())
    assert model_name(resolve_model("hf.co/Org/Tiny-GGUF:Q8_0", progress=False)) == "hf.co/Org/Tiny-GGUF:Q8_0"
    manifest.write_text(json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.model",
                                                "digest": "sha256:../../etc/passwd"}]}))
    with pytest.raises(FileNotFoundError, match="not a sha256 digest"):
        resolve_model("tiny-olmoe:q8")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve_model("tiny-olmoe")                  # no tag and no 'latest': not Ollama's


def test_files_that_cannot_be_served_are_refused_naming_why(tiny: Callable[..., tuple[str, str]],
                                                            tmp_path: Any) -> None:
    import gguf
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(BuildError, match="not a readable GGUF"):
        ensure_gguf(str(bad), home=str(tmp_path))

    def write(name: str, arch: str, tensors: dict[str, np.ndarray]) -> str:
        w = gguf.GGUFWriter(str(tmp_path / name), arch)
        for add, value in ((w.add_block_count, 1), (w.add_embedding_length, 8), (w.add_head_count, 2)):
            add(value)
        for key, t in tensors.items():
            w.add_tensor(key, t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return str(tmp_path / name)
    embd = {"token_embd.weight": np.zeros((4, 8), dtype=np.float32)}
    with pytest.raises(BuildError, match="'gemma3' is not supported"):
        ensure_gguf(write("gemma.gguf", "gemma3", embd), home=str(tmp_path))
    with pytest.raises(BuildError, match="rope_freqs"):     # Llama 3.1's rope factors: not silently dropped
        ensure_gguf(write("llama3.gguf", "llama", {**embd, "rope_freqs.weight": np.ones(2, dtype=np.float32)}),
                    home=str(tmp_path))
    from convert.gguf_import import find_packaged_gguf
    with pytest.raises(BuildError, match="no routed experts"):
        ensure_gguf(find_packaged_gguf(), "int4", home=str(tmp_path))


def test_a_folder_holding_one_gguf_serves_it(tiny: Callable[..., tuple[str, str]], tmp_path: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`hf download ggml-org/...-GGUF` gives a folder with a GGUF and no config.json."""
    import shutil
    _, path = tiny("olmoe")
    folder = tmp_path / "release"
    folder.mkdir()
    shutil.copy(path, folder / "model-F32.gguf")
    monkeypatch.setenv("MOESERVE_HOME", str(tmp_path / "home"))
    out = resolve_model(str(folder), progress=False)
    assert model_name(out) == "model-F32" and os.path.isfile(os.path.join(out, "config.json"))
    shutil.copy(path, folder / "other.gguf")
    with pytest.raises(FileNotFoundError, match="2 GGUF models \\(model-F32.gguf, other.gguf\\): give one"):
        resolve_model(str(folder))
    quants = tmp_path / "quants"                  # a release of several quantizations, one per subfolder
    (quants / "Q4_K_M").mkdir(parents=True)
    shutil.copy(path, quants / "Q4_K_M" / "m-Q4_K_M.gguf")
    with pytest.raises(FileNotFoundError, match="its subfolders Q4_K_M: name one"):
        resolve_model(str(quants))


def test_a_split_gguf_is_read_from_all_its_parts(tiny: Callable[..., tuple[str, str]], tokenizer: dict[str, Any],
                                                tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Releases over ~50 GB come as <name>-00001-of-0000N.gguf parts (llama.cpp's gguf-split):
    any part, or the folder holding them, serves the model; a missing or foreign part is named."""
    import shutil
    hf, whole = tiny("olmoe")
    folder = tmp_path / "release"
    folder.mkdir()
    first = write_gguf(hf, str(folder / "Tiny-Q8_0.gguf"), tokenizer, split_max_tensors=8)
    parts = sorted(os.listdir(folder))
    assert len(parts) > 2 and first == str(folder / parts[0]) and parts[0].startswith("Tiny-Q8_0-00001-of-")
    monkeypatch.setenv("MOESERVE_HOME", str(tmp_path / "home"))
    out = resolve_model(str(folder / parts[1]), progress=False)            # any part names the model
    assert model_name(out) == "Tiny-Q8_0" and resolve_model(str(folder), progress=False) == out
    assert load_file(os.path.join(out, "model.safetensors")).keys() == \
        load_file(os.path.join(ensure_gguf(whole, home=str(tmp_path / "h2"), progress=False),
                               "model.safetensors")).keys()
    torch.testing.assert_close(logits(out), logits(hf), rtol=0, atol=1e-5)
    os.rename(folder / parts[0], tmp_path / parts[0])
    with pytest.raises(BuildError, match=f"1 of them are missing \\({parts[0]}\\)"):
        resolve_model(str(folder))                      # the folder's lowest part names the first
    os.rename(tmp_path / parts[0], folder / parts[0])
    other = tmp_path / "other"
    other.mkdir()
    write_gguf(hf, str(other / "x.gguf"), tokenizer, split_max_tensors=5)
    shutil.copy(sorted(other.iterdir())[-1], folder / parts[-1])          # a part of another split
    with pytest.raises(BuildError, match="not part .* by its metadata"):
        ensure_gguf(first, home=str(tmp_path / "h3"))


@pytest.mark.parametrize("pre, digits", [("deepseek-llm", ["12345"]), ("deepseek-v3", ["123", "45"])])
def test_deepseek_files_from_before_the_kv_b_split_and_deepseeks_pre_tokenizers(
        pre: str, digits: list[str], tokenizer: dict[str, Any], tmp_path: Any) -> None:
    """DeepSeek GGUFs made before mid-2025 hold kv_b_proj whole (and the heads' widths in
    key/value_length); DeepSeek's pre-tokenizers, which transformers' conversion does not know,
    split text by their own regexes (numbers alone, V3's in groups of three; GPT-2's rule would
    keep " 12345" whole)."""
    from transformers import PreTrainedTokenizerFast
    hf = make_family_checkpoint("deepseek_v2", str(tmp_path / "hf"), overrides=OVERRIDES)
    tok = {**tokenizer, "tokenizer.ggml.pre": (pre, tokenizer["tokenizer.ggml.pre"][1])}
    out = ensure_gguf(write_gguf(hf, str(tmp_path / "ds.gguf"), tok, legacy=True),
                      home=str(tmp_path / "home"), progress=False)
    torch.testing.assert_close(logits(out), logits(hf), rtol=0, atol=1e-5)
    split = PreTrainedTokenizerFast.from_pretrained(out).backend_tokenizer.pre_tokenizer
    pieces = [p for p, _ in split.pre_tokenize_str("Tokens 12345 here!")]
    assert [p for p in pieces if p.isdigit()] == digits, pieces


def test_deepseek_files_without_the_gating_key_route_by_their_selection_bias(tokenizer: dict[str, Any],
                                                                              tmp_path: Any) -> None:
    """GLM-4.7-Flash's files (deepseek2) carry no expert_gating_func: a router with a selection
    bias is sigmoid routing, not V2's softmax; attention temperature scaling (Mistral Large 3's
    deepseek2 files) is refused rather than ignored."""
    hf = make_family_checkpoint("deepseek_v3", str(tmp_path / "hf"), overrides={**OVERRIDES, **FAMILIES["deepseek_v3"]})
    path = write_gguf(hf, str(tmp_path / "v3.gguf"), tokenizer, omit=("deepseek2.expert_gating_func",))
    out = ensure_gguf(path, home=str(tmp_path / "home"), progress=False)
    assert json.load(open(os.path.join(out, "config.json")))["model_type"] == "deepseek_v3"
    torch.testing.assert_close(logits(out), logits(hf), rtol=0, atol=1e-5)
    scaled = write_gguf(hf, str(tmp_path / "m3.gguf"), tokenizer, extra={"deepseek2.attention.temperature_scale": 0.1})
    with pytest.raises(BuildError, match="temperature scaling"):
        ensure_gguf(scaled, home=str(tmp_path / "home"))


def test_fused_gate_up_experts_read_as_gate_and_up(tiny: Callable[..., tuple[str, str]], tokenizer: dict[str, Any],
                                                   tmp_path: Any) -> None:
    """llama.cpp's --fuse-gate-up-exps stores a layer's expert gates and ups as one tensor."""
    import gguf
    hf, whole = tiny("qwen3_moe", "F32", "Q4_0")
    fused = write_gguf(hf, str(tmp_path / "fused.gguf"), tokenizer, expert_qtype="Q4_0", fuse_gate_up=True)
    assert "blk.0.ffn_gate_up_exps.weight" in {t.name for t in gguf.GGUFReader(fused).tensors}
    a, b = (ensure_gguf(p, home=str(tmp_path / h), progress=False) for p, h in ((whole, "a"), (fused, "b")))
    assert json.load(open(os.path.join(b, "config.json")))["moe_intermediate_size"] == \
        json.load(open(os.path.join(a, "config.json")))["moe_intermediate_size"]
    ours, theirs = (load_file(os.path.join(d, "experts.safetensors")) for d in (a, b))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("name, kind", [("qwen3_next", "legacy"), ("qwen3_next", "ollama"),
                                        ("qwen3_5_moe_text", "ollama")])
def test_qwen_hybrid_files_of_older_llama_cpp_and_of_ollama(name: str, kind: str, tokenizer: dict[str, Any],
                                                           tmp_path: Any) -> None:
    """llama.cpp's first Qwen3-Next files hold in_proj_qkvz whole (ssm_in); Ollama's Qwen3-Next and
    Qwen3.5 files give KV heads per layer and a bare ssm_dt, may leave the value heads grouped
    (saying so), and carry the vision tower: each reads back to the same model."""
    hf = make_family_checkpoint(name, str(tmp_path / "hf"), overrides={**OVERRIDES, **FAMILIES[name]})
    path = write_gguf(hf, str(tmp_path / "m.gguf"), tokenizer, **{kind: True})
    out = ensure_gguf(path, home=str(tmp_path / "home"), progress=False)
    torch.testing.assert_close(logits(out), logits(hf), rtol=0, atol=1e-5)


def test_sampling_defaults_from_the_file_and_from_ollamas_parameters(tokenizer: dict[str, Any], tmp_path: Any,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp's converter copies the model's sampling defaults into general.sampling.*; Ollama
    keeps its own beside the model (its params layer): the server's defaults come from them."""
    from moeserve.model_ref import ollama_sampling
    from server.defaults import load_generation_defaults
    hf = make_family_checkpoint("olmoe", str(tmp_path / "hf"), overrides={**OVERRIDES, **FAMILIES["olmoe"]})
    path = write_gguf(hf, str(tmp_path / "m.gguf"), tokenizer, extra={
        "general.sampling.temp": 0.6, "general.sampling.top_p": 0.95, "general.sampling.min_p": 0.05})
    out = ensure_gguf(path, home=str(tmp_path / "home"), progress=False)
    assert load_generation_defaults(out).as_dict() == {"temperature": 0.6, "top_p": 0.95, "min_p": 0.05}
    store = tmp_path / "ollama"
    (store / "blobs").mkdir(parents=True)
    params = json.dumps({"temperature": 0.7, "top_k": 20, "repeat_penalty": 1.1, "stop": ["<|im_end|>"]})
    (store / "blobs" / ("sha256-" + "cd" * 32)).write_text(params)
    os.link(path, store / "blobs" / ("sha256-" + "ab" * 32))
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "latest"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:" + "ab" * 32},
        {"mediaType": "application/vnd.ollama.image.params", "digest": "sha256:" + "cd" * 32}]}))
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    monkeypatch.setenv("MOESERVE_HOME", str(tmp_path / "home"))
    assert ollama_sampling("tiny") == {"temperature": 0.7, "top_k": 20, "repetition_penalty": 1.1}
    assert ollama_sampling(str(tmp_path / "hf")) is None                 # not an Ollama name
    fallback = ollama_sampling("tiny")
    served = resolve_model("tiny", progress=False)
    # the file's values first (this one has general.sampling keys too), Ollama's where it has none
    assert load_generation_defaults(served, fallback=fallback).as_dict() == {
        "temperature": 0.6, "top_p": 0.95, "min_p": 0.05, "top_k": 20, "repetition_penalty": 1.1}
    (store / "blobs" / ("sha256-" + "cd" * 32)).unlink()            # optional: served without them
    assert ollama_sampling("tiny") is None
