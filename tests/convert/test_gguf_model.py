"""GGUF files served as checkpoints (convert/gguf_model.py): tiny GGUFs written as llama.cpp writes
them (tests/convert/gguf_writer.py), and the packaged SmolLM2 GGUF read against transformers."""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from configs.models import model_name
from convert.gguf_convert import default_quantize, ensure_gguf
from convert.gguf_model import GgufModel
from convert.model_store import BuildError
from cache.provider import ResidentExpertProvider
from engine.loader import load_model
from engine.models.common import Batch, KVCache
from moeserve.model_ref import resolve_model
from tests.convert.gguf_writer import smollm2_tokenizer, write_gguf
from tests.engine.tiny_families import engine_dir, make_family_checkpoint

CPU = torch.device("cpu")
VOCAB = 49152                   # the SmolLM2 tokenizer's, which the tiny GGUFs carry
# all layers MoE, as llama.cpp's qwen2moe/qwen3moe graphs have them
OVERRIDES = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
ALL_MOE = {"mlp_only_layers": []}
# llama with q/k/v biases: llama.cpp permutes the q/k biases with the weights
# gpt-oss: the SwiGLU limit every gpt-oss GGUF has (llama.cpp does not store it)
FAMILIES = {"mixtral": {}, "qwen2_moe": ALL_MOE, "qwen3_moe": ALL_MOE, "olmoe": {}, "llama": {"attention_bias": True},
            "gpt_oss": {"swiglu_limit": 7.0},
            # GLM-4.5: one expert group, as released (llama.cpp's GLM graph has none)
            "glm4_moe": {"n_group": 1, "topk_group": 1},
            # DeepSeek: mscale == mscale_all_dim, as every release has it (a GGUF carries only the latter)
            "deepseek_v2": {}, "deepseek_v2_grouped": {}, "qwen3_next": ALL_MOE, "qwen3_5_moe_text": {},
            # ERNIE-4.5 as released: no biases (llama.cpp's graph has no LM head bias)
            "ernie4_5_moe": {"use_bias": False},
            "deepseek_v3": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                                "original_max_position_embeddings": 32, "mscale": 0.8,
                                                "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}}}
PROMPT = (1, 17, 402, 9, 2211, 88, 3016, 5, 44)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def tokenizer() -> dict[str, Any]:
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tokenizer: dict[str, Any]) -> Callable[..., tuple[str, str]]:
    """tiny(family, qtype, expert_qtype) -> (HF checkpoint dir, GGUF path), written once."""
    made: dict[tuple[str, str, Any], tuple[str, str]] = {}

    def get(name: str, qtype: str = "F32", expert_qtype: Any = None) -> tuple[str, str]:
        key = (name, qtype, expert_qtype)
        if key not in made:
            base = tmp_path_factory.mktemp(f"{name}-{qtype}-{expert_qtype}")
            hf = make_family_checkpoint(name, str(base / "hf"), overrides={**OVERRIDES, **FAMILIES[name]})
            made[key] = (hf, write_gguf(hf, str(base / f"{name}.gguf"), tokenizer, qtype, expert_qtype))
        return made[key]
    return get


def logits(model_dir: str) -> torch.Tensor:
    """Prompt logits [T, V] of the model in ``model_dir``, fp32, all experts resident."""
    loaded = load_model(model_dir, CPU, torch.float32, context_length=32)
    kv = KVCache.for_model(loaded.model.kv_spec, 1, 32, torch.float32, CPU)
    batch = Batch(torch.arange(len(PROMPT))[None], torch.tensor([0]), len(PROMPT), single_slot=0)
    loaded.model.set_provider(ResidentExpertProvider(loaded.experts, CPU, torch.float32))
    with torch.inference_mode():
        return loaded.model(torch.tensor([PROMPT]), batch, kv, all_logits=True)[0]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_f32_gguf_converts_to_the_checkpoint_it_was_written_from(name: str, tiny: Callable[..., tuple[str, str]],
                                                                  tmp_path: Any) -> None:
    hf, path = tiny(name)
    out = ensure_gguf(path, home=str(tmp_path), progress=False)      # F32 experts: kept unquantized
    assert out.endswith("-float32")
    hf = engine_dir(hf)                  # gpt-oss: its stacked experts one by one, as moeserve loads them
    theirs = load_file(os.path.join(hf, "model.safetensors"))
    ours = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for k, t in theirs.items():                      # names, stacking and the q/k permutation undone
        if k.endswith(("norm.weight", "A_log")) and name.startswith("qwen3_"):
            # stored as w + 1 and -exp(A_log) in f32: back within an ulp of those
            torch.testing.assert_close(ours[k], t, rtol=1e-6, atol=2e-7, msg=k)
        else:
            assert torch.equal(ours[k], t), k
    with open(os.path.join(hf, "config.json")) as f:
        want = json.load(f)
    with open(os.path.join(out, "config.json")) as f:
        got = json.load(f)
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "rms_norm_eps", "num_experts_per_tok", "tie_word_embeddings", "norm_topk_prob",
                "moe_intermediate_size", "shared_expert_intermediate_size", "clip_qkv", "max_position_embeddings",
                "attention_bias", "intermediate_size", "sliding_window", "head_dim", "n_routed_experts",
                "n_shared_experts", "first_k_dense_replace", "routed_scaling_factor", "use_qk_norm",
                "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_group",
                "topk_group", "topk_method", "layer_types", "linear_conv_kernel_dim", "linear_key_head_dim",
                "linear_num_key_heads", "linear_num_value_heads", "linear_value_head_dim", "moe_num_experts",
                "moe_k", "moe_num_shared_experts", "moe_layer_start_index", "moe_layer_interval", "use_bias"):
        if want.get(key) is None or (key == "sliding_window" and not want[key]) or \
                (key == "norm_topk_prob" and name == "mixtral") or \
                (key == "head_dim" and name.startswith("deepseek")) or \
                (key == "layer_types" and not name.startswith(("qwen3_next", "qwen3_5"))):
            continue                     # unset, off, or implied by the family (attention kinds: the window)
        assert got.get(key) == want[key], key
    count = ("num_local_experts", "num_experts", "n_routed_experts")   # transformers 5 writes two for some
    assert next((got[k] for k in count if k in got), 0) == next((want[k] for k in count if k in want), 0)
    torch.testing.assert_close(logits(out), logits(hf), rtol=0, atol=1e-5)


def test_glm_multi_token_prediction_layers_are_left_out(tokenizer: dict[str, Any], tmp_path: Any) -> None:
    from tests.engine.tiny_families import add_mtp_layer
    plain = make_family_checkpoint("glm4_moe", str(tmp_path / "plain"), overrides={**OVERRIDES, **FAMILIES["glm4_moe"]})
    add_mtp_layer(plain, str(tmp_path / "mtp"))
    path = write_gguf(str(tmp_path / "mtp"), str(tmp_path / "glm.gguf"), tokenizer)
    out = ensure_gguf(path, home=str(tmp_path / "home"), progress=False)
    n = json.load(open(os.path.join(plain, "config.json")))["num_hidden_layers"]
    assert not [k for k in load_file(os.path.join(out, "model.safetensors")) if k.startswith(f"model.layers.{n}.")]
    torch.testing.assert_close(logits(out), logits(plain), rtol=0, atol=1e-5)


def test_packaged_smollm2_gguf_reads_as_transformers_reads_it(tmp_path: Any) -> None:
    """A real llama.cpp file (Q4_1, Q8_0 embeddings, q/k permuted): the same weights as
    transformers' GGUF loader gives, and the same chat prompt ids."""
    from convert.gguf_import import find_packaged_gguf, load_gguf_llama
    from server.tokenizer import TextTokenizer
    path = find_packaged_gguf()
    out = ensure_gguf(path, home=str(tmp_path), progress=False)
    model, tok = load_gguf_llama(path)
    theirs = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    ours = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for k, t in theirs.items():
        torch.testing.assert_close(ours[k].float(), t, rtol=2 ** -8, atol=1e-6, msg=k)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert (cfg["model_type"], cfg["tie_word_embeddings"], cfg["num_key_value_heads"]) == ("llama", True, 3)
    messages = [{"role": "user", "content": "Name three MoE models."}]
    assert TextTokenizer(out).encode_chat(messages) == tok.apply_chat_template(messages, add_generation_prompt=True,
                                                                             tokenize=True, return_dict=False)


@pytest.mark.parametrize("family,expert_qtype,kind,bound", [
    ("qwen3_moe", "Q8_0", "int8", 0.02), ("qwen3_moe", "Q4_1", "int4", 0.02), ("qwen3_moe", "Q4_0", "int4", 0.01),
    ("gpt_oss", "MXFP4", "int8", 0.02)])       # gpt-oss as OpenAI and Ollama ship it
def test_quantized_experts_go_into_the_expert_store_near_the_files_values(
        family: str, expert_qtype: str, kind: str, bound: float, tiny: Callable[..., tuple[str, str]],
        tmp_path: Any) -> None:
    from cache.expert_store import locate_experts
    from cache.provider import read_tensor
    from cache.quant import format_from_config, dequantize_int4, unpack_int4_cpu
    _, path = tiny(family, "Q8_0", expert_qtype)
    model = GgufModel(path)
    assert default_quantize(model) == kind
    out = ensure_gguf(path, home=str(tmp_path), progress=False)
    with open(os.path.join(out, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert (qc["format"], qc["group_size"]) == (kind, 32 if kind == "int4" else None)
    fmt = format_from_config(qc, model.inter, model.hidden, torch.bfloat16)
    slots = locate_experts(os.path.join(out, qc["expert_store"]), fmt, qc["num_moe_layers"], qc["num_experts"])
    assert len(slots) == len(model.keys)
    worst = 0.0
    for i, s in enumerate(slots):
        want = model.read(i)
        views = fmt.views(read_tensor(s.packed).clone())
        for proj, w in want.items():
            v = getattr(views, proj)
            if kind == "int8":
                got = v.q.float() * v.scales.float()[:, None]
            else:
                got = dequantize_int4(unpack_int4_cpu(v.q, *w.shape), v.scales, fmt.group_size)
            worst = max(worst, float((got - w).norm() / w.norm()))
    assert worst < bound


def test_served_from_an_ollama_store_by_name(tiny: Callable[..., tuple[str, str]], tmp_path: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
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
    with pytest.raises(BuildError, match="Ollama's own gpt-oss conversion .*ggml-org/gpt-oss-20b-GGUF"):
        ensure_gguf(write("gptoss.gguf", "gptoss", embd), home=str(tmp_path))
    with pytest.raises(BuildError, match="rope_freqs"):     # Llama 3.1's rope factors: not silently dropped
        ensure_gguf(write("llama3.gguf", "llama", {**embd, "rope_freqs.weight": np.ones(2, dtype=np.float32)}),
                    home=str(tmp_path))
    from convert.gguf_import import find_packaged_gguf
    with pytest.raises(BuildError, match="no routed experts"):
        ensure_gguf(find_packaged_gguf(), "int4", home=str(tmp_path))


def test_generate_from_a_gguf_path_offloaded_equals_resident(tiny: Callable[..., tuple[str, str]], tmp_path: Any,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI as a user runs it on a GGUF with Q4_0 experts: converted to int4 on first use, and
    the same greedy tokens with a quarter of the experts in memory as with all of them."""
    from moeserve.cli import main
    _, path = tiny("qwen3_moe", "Q8_0", "Q4_0")
    monkeypatch.setenv("MOESERVE_HOME", str(tmp_path))
    outs = []
    for budget in ("all", "25%"):
        assert main(["generate", "--model", path, "--prompt", "Tell me about experts", "--chat",
                     "--max-tokens", "8", "--ignore-eos", "--json", "--expert-budget", budget]) == 0
        outs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert len(outs[0]["token_ids"]) == 8 and outs[0]["token_ids"] == outs[1]["token_ids"]
    built = [n for n in os.listdir(tmp_path / "models") if not n.startswith(".")]   # not the lock
    assert len(built) == 1 and built[0].startswith(os.path.basename(path)[:-5] + "-")   # converted once
    assert built[0].endswith("-int4-g32")


def test_serve_converts_a_gguf_in_a_child_so_the_http_process_never_imports_torch(
        tiny: Callable[..., tuple[str, str]], tmp_path: Any) -> None:
    import subprocess
    import sys
    _, path = tiny("olmoe")
    code = ("import sys; from moeserve.model_ref import resolve_in_child; "
            f"print(resolve_in_child({path!r})); print('torch' in sys.modules)")
    env = {**os.environ, "MOESERVE_HOME": str(tmp_path), "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    converted, torch_loaded = out.stdout.strip().splitlines()[-2:]
    assert torch_loaded == "False" and os.path.isfile(os.path.join(converted, "config.json"))
    assert converted.startswith(str(tmp_path))
    bad = subprocess.run([sys.executable, "-m", "moeserve.model_ref", str(tmp_path / "none.gguf")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no such directory" in bad.stderr      # as `moeserve` exits on it


def test_gpt_oss_stops_at_a_tool_call_as_llama_cpp_does(tokenizer: dict[str, Any], tmp_path: Any) -> None:
    """llama.cpp's gpt-oss file names only <|return|> as eos; <|call|> ends a reply too."""
    hf = make_family_checkpoint("gpt_oss", str(tmp_path / "hf"),
                                overrides={**OVERRIDES, **FAMILIES["gpt_oss"], "vocab_size": VOCAB + 3})
    tok = dict(tokenizer)                                # harmony's three, appended as control tokens
    tokens, kinds = tokenizer["tokenizer.ggml.tokens"], tokenizer["tokenizer.ggml.token_type"]
    tok["tokenizer.ggml.tokens"] = ([*tokens[0], "<|return|>", "<|call|>", "<|end|>"], tokens[1])
    tok["tokenizer.ggml.token_type"] = ([*kinds[0], 3, 3, 3], kinds[1])
    tok["tokenizer.ggml.eos_token_id"] = (VOCAB, tokenizer["tokenizer.ggml.eos_token_id"][1])
    out = ensure_gguf(write_gguf(hf, str(tmp_path / "oss.gguf"), tok), home=str(tmp_path / "home"), progress=False)
    with open(os.path.join(out, "generation_config.json")) as f:
        stops = json.load(f)["eos_token_id"]
    assert VOCAB in stops and VOCAB + 1 in stops and VOCAB + 2 not in stops   # <|end|>: not a stop in harmony


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


@pytest.mark.parametrize("name, kind", [("qwen3_next", "legacy"), ("qwen3_5_moe_text", "ollama")])
def test_qwen_hybrid_files_of_older_llama_cpp_and_of_ollama(name: str, kind: str, tokenizer: dict[str, Any],
                                                           tmp_path: Any) -> None:
    """llama.cpp's first Qwen3-Next files hold in_proj_qkvz whole (ssm_in); Ollama's Qwen3.5 files
    give KV heads per layer, may leave the value heads grouped (saying so), and carry the vision
    tower: each reads back to the same model."""
    hf = make_family_checkpoint(name, str(tmp_path / "hf"), overrides={**OVERRIDES, **FAMILIES[name]})
    path = write_gguf(hf, str(tmp_path / "m.gguf"), tokenizer, **{kind: True})
    out = ensure_gguf(path, home=str(tmp_path / "home"), progress=False)
    torch.testing.assert_close(logits(out), logits(hf), rtol=0, atol=1e-5)
