"""GGUF files served as checkpoints (convert/gguf_model.py): tiny GGUFs of every family written as
llama.cpp writes them (tests/convert/gguf_writer.py), their quantized experts, serving them, and the
packaged SmolLM2 GGUF read against transformers. Where files come from and how other producers lay
them out: test_gguf_sources.py."""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file

from convert.gguf_convert import default_quantize, ensure_gguf
from convert.gguf_model import GgufModel
from tests.convert.gguf_cases import FAMILIES, OVERRIDES, VOCAB, logits
from tests.convert.gguf_writer import write_gguf
from tests.engine.tiny_families import engine_dir, make_family_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


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
    from cache.quant import format_from_config, unpack_int4_cpu
    from cache.quantizers import dequantize_int4
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
