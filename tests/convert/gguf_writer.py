"""Tiny GGUF files written from tiny HF checkpoints as llama.cpp's converter writes them: tensor
names from gguf-py's own name table (not moeserve's), experts stacked per layer, q/k rows permuted
for the llama architecture, metadata under llama.cpp's keys, and the tokenizer of the packaged
SmolLM2 GGUF (vocabulary, merges, chat template)."""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from tests.convert.gguf_writer_hybrid import hybrid_meta, hybrid_tensors

ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe",
        "llama": "llama", "gpt_oss": "gpt-oss", "glm4_moe": "glm4moe", "deepseek_v2": "deepseek2",
        "deepseek_v3": "deepseek2", "qwen3_next": "qwen3next", "qwen3_5_moe_text": "qwen35moe",
        "ernie4_5_moe": "ernie4_5-moe", "minimax_m2": "minimax-m2"}
MIXTRAL_EXPERTS = ("block_sparse_moe", {"w1": "w1", "w3": "w3", "w2": "w2"})
STACKED = {"mixtral": MIXTRAL_EXPERTS, "minimax_m2": MIXTRAL_EXPERTS,
           "default": ("mlp", {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"})}
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                  "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
                  "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                  "tokenizer.ggml.padding_token_id", "tokenizer.chat_template")


def smollm2_tokenizer() -> dict[str, Any]:
    """The tokenizer metadata of the packaged SmolLM2 GGUF (49152 tokens)."""
    from convert.gguf_import import find_packaged_gguf
    from convert.gguf_reader import FastGGUFReader
    reader = FastGGUFReader(find_packaged_gguf())
    return {k: (reader.fields[k].contents(), reader.fields[k].types) for k in TOKENIZER_KEYS}


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k row permutation into GGML's rotary layout."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir: str, path: str, tokenizer: dict[str, Any], qtype: str = "F32",
               expert_qtype: str | None = None, split_max_tensors: int = 0, legacy: bool = False,
               omit: tuple[str, ...] = (), extra: dict[str, float] | None = None, fuse_gate_up: bool = False,
               ollama: bool = False) -> str:
    """Write the checkpoint in ``hf_dir`` as a GGUF at ``path``: dense matrices in ``qtype``, expert
    matrices in ``expert_qtype`` (default: ``qtype``); 1-D tensors stay F32, as llama.cpp keeps them.
    With ``split_max_tensors``, split into parts as llama.cpp's gguf-split names them (gguf-py's
    own splitting); returns the first part's path. DeepSeek's kv_b_proj is split into k_b and
    v_b as current llama.cpp writes it, or kept whole as files from before mid-2025 (``legacy``; so is
    Qwen3-Next's in_proj_qkvz, as llama.cpp's first Qwen3-Next support wrote it).
    Metadata keys in ``omit`` are left out (files from converters that did not write them), and
    ``extra`` float keys added. ``fuse_gate_up``: each layer's expert gate and up in one
    ffn_gate_up_exps [E, 2I, H], as llama.cpp's --fuse-gate-up-exps writes them. ``ollama``: a
    Qwen3-Next or Qwen3.5 file as Ollama's converter may write it (see gguf_writer_hybrid.hybrid_meta;
    dt_bias as a bare ssm_dt, which Ollama's llama.cpp compatibility layer renames)."""
    import gguf
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    model_type = cfg["model_type"]
    arch = ARCH[model_type]
    layers = cfg["num_hidden_layers"]
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    # GLM-4.5's multi-token-prediction layers follow the decoder's, counted in block_count
    blocks = 1 + max(int(n.split(".")[2]) for n in tensors if n.startswith("model.layers."))
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), blocks)
    w = gguf.GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    add = w.add_key_value
    w.add_key_value = lambda key, *a, **k: None if key in omit else add(key, *a, **k)   # type: ignore[method-assign]
    for key, value in (extra or {}).items():
        w.add_float32(key, value)
    w.add_block_count(blocks)
    if blocks > layers:
        w.add_nextn_predict_layers(blocks - layers)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    if cfg.get("intermediate_size"):                    # Qwen3.5's text config has no dense MLP
        w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    if not ollama:                                    # Ollama's hybrid files: per layer
        w.add_head_count_kv(1 if arch == "deepseek2" else cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    if cfg.get("head_dim") and arch != "deepseek2":
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    if cfg.get("clip_qkv") is not None:    # as llama.cpp's OLMo converter writes it (its OLMoE one
        w.add_clamp_kqv(cfg["clip_qkv"])   # omits it: OLMoE's released configs have none)
    if model_type == "gpt_oss":                          # as llama.cpp's GptOssModel and its base writes
        rope = cfg["rope_parameters"]
        w.add_sliding_window(cfg["sliding_window"])
        w.add_expert_feed_forward_length(cfg["intermediate_size"])
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    if model_type == "glm4_moe":                         # as llama.cpp's Glm4MoeModel writes
        w.add_rope_dimension_count(int(cfg["head_dim"] * cfg.get("partial_rotary_factor", 0.5)))
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        w.add_expert_shared_count(cfg["n_shared_experts"])
        w.add_leading_dense_block_count(cfg["first_k_dense_replace"])
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_expert_weights_scale(cfg["routed_scaling_factor"])
        w.add_expert_weights_norm(cfg["norm_topk_prob"])
    if model_type == "minimax_m2":                       # as llama.cpp's MiniMaxM2Model and its base write
        w.add_expert_feed_forward_length(cfg["intermediate_size"])
        w.add_rope_dimension_count(cfg["rotary_dim"])
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    if arch == "deepseek2":
        _deepseek_meta(w, cfg, legacy)
    if arch in ("qwen3next", "qwen35moe"):
        hybrid_meta(w, cfg, ollama)
    if model_type == "ernie4_5_moe":                     # as llama.cpp's Ernie4_5MoeModel writes
        w.add_leading_dense_block_count(cfg["moe_layer_start_index"])
        w.add_interleave_moe_layer_step(cfg["moe_layer_interval"])
        w.add_expert_shared_count(cfg["moe_num_shared_experts"])
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts") \
        or cfg.get("moe_num_experts")
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg.get("num_experts_per_tok") or cfg["moe_k"])
        if cfg.get("moe_intermediate_size"):
            w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if cfg.get("shared_expert_intermediate_size"):
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    for key, (value, types) in tokenizer.items():
        if types[0] == gguf.GGUFValueType.ARRAY:
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, types[0])
    tensors = _gpt_oss(tensors) if model_type == "gpt_oss" else _stacked(tensors, model_type)
    if arch == "deepseek2" and not legacy:
        tensors = _split_kv_b(tensors, cfg)
    if arch in ("qwen3next", "qwen35moe"):
        tensors = hybrid_tensors(tensors, cfg, legacy, ollama)
    halves: dict[bool, np.ndarray] = {}                 # fuse_gate_up: a layer's gate (False) and up (True)
    for name, t in tensors.items():
        base = name.removesuffix(".weight").removesuffix(".bias").removesuffix("_bias")   # e_score_correction_bias
        target = names.get_name(base)
        assert target is not None, f"gguf-py has no GGUF name for {base}"
        arr = t.float().numpy()
        if arch == "llama" and base.endswith(("q_proj", "k_proj")):
            arr = permute(arr, cfg["num_attention_heads" if base.endswith("q_proj") else "num_key_value_heads"])
        if base.endswith(("shared_expert_gate", "moe_statics.e_score_correction")):
            arr = arr.reshape(-1)                       # llama.cpp stores them as vectors
        kind = (expert_qtype or qtype) if re.search(r"\.experts\.", name) else qtype
        plain = arr.ndim == 1 or name.endswith("bias")      # biases and vectors stay F32
        suffix = ".bias" if name.endswith("_bias") else name[len(base):]
        if ollama and name.endswith("dt_proj.bias"):    # Ollama's hybrid files: a bare ssm_dt
            suffix = ""
        if fuse_gate_up and target.endswith(("ffn_gate_exps", "ffn_up_exps")):
            halves[target.endswith("ffn_up_exps")] = arr
            if len(halves) < 2:
                continue
            target, arr = target.rsplit(".", 1)[0] + ".ffn_gate_up_exps", np.concatenate([halves[0], halves[1]], axis=1)
            halves = {}
        _add(w, f"{target}{suffix}", np.ascontiguousarray(arr), "F32" if plain else kind)
    if ollama:                                          # its Qwen3.5 files hold the vision tower too
        _add(w, "v.blk.0.attn_q.weight", np.zeros((8, 8), dtype=np.float32), "F32")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if split_max_tensors:
        parts = sorted(glob.glob(path.removesuffix(".gguf") + "-0*-of-*.gguf"))
        return parts[0] if parts else path
    return path


def _add(w: Any, name: str, arr: np.ndarray, qtype: str) -> None:
    import gguf
    t = gguf.GGMLQuantizationType[qtype]
    if t == gguf.GGMLQuantizationType.F32:
        w.add_tensor(name, arr.astype(np.float32))
    else:
        w.add_tensor(name, gguf.quants.quantize(arr, t), raw_dtype=t)


def _gpt_oss(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' gpt-oss tensors as llama.cpp's converter splits them: gate_up [E, H, 2I]
    (interleaved) into gate and up [E, I, H], down [E, I, H] into [E, H, I], their biases
    likewise, and the sinks named as weights."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            t = t.transpose(-1, -2)
            out[name.replace("gate_up_proj", "gate_proj.weight")] = t[:, ::2]
            out[name.replace("gate_up_proj", "up_proj.weight")] = t[:, 1::2]
        elif name.endswith("mlp.experts.gate_up_proj_bias"):
            out[name.replace("gate_up_proj_bias", "gate_proj.bias")] = t[..., ::2]
            out[name.replace("gate_up_proj_bias", "up_proj.bias")] = t[..., 1::2]
        elif name.endswith("mlp.experts.down_proj"):
            out[name + ".weight"] = t.transpose(-1, -2)
        elif name.endswith("mlp.experts.down_proj_bias"):
            out[name.replace("down_proj_bias", "down_proj.bias")] = t
        elif name.endswith("self_attn.sinks"):
            out[name + ".weight"] = t
        else:
            out[name] = t
    return out


def _stacked(tensors: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """Per-expert tensors merged per layer and projection ([E, out, in]), as llama.cpp merges them."""
    module, projs = STACKED.get(model_type, STACKED["default"])
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[int, torch.Tensor]] = {}
    pattern = re.compile(rf"(model\.layers\.\d+\.{module}\.experts)\.(\d+)\.(\w+)\.weight")
    for name, t in tensors.items():
        m = pattern.fullmatch(name)
        if m and m.group(3) in projs:
            groups.setdefault(f"{m.group(1)}.{m.group(3)}.weight", {})[int(m.group(2))] = t
        else:
            out[name] = t
    for name, per in groups.items():
        out[name] = torch.stack([per[e] for e in sorted(per)])
    return out


def _deepseek_meta(w: Any, cfg: dict[str, Any], legacy: bool) -> None:
    """DeepSeek's keys as llama.cpp's DeepseekV2Model writes them: MLA as one KV head of the
    latent's width (the heads' own widths under *_mla; a legacy file has them in key/value_length)."""
    import gguf
    rope, nope = cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"]
    w.add_leading_dense_block_count(cfg["first_k_dense_replace"])
    w.add_vocab_size(cfg["vocab_size"])
    if cfg.get("q_lora_rank") is not None:
        w.add_q_lora_rank(cfg["q_lora_rank"])
    w.add_kv_lora_rank(cfg["kv_lora_rank"])
    if legacy:
        w.add_key_length(nope + rope)
        w.add_value_length(cfg["v_head_dim"])
    else:
        w.add_key_length(cfg["kv_lora_rank"] + rope)
        w.add_value_length(cfg["kv_lora_rank"])
        w.add_key_length_mla(nope + rope)
        w.add_value_length_mla(cfg["v_head_dim"])
    w.add_expert_shared_count(cfg["n_shared_experts"])
    w.add_expert_weights_scale(cfg["routed_scaling_factor"])
    if cfg.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(rope)
    if cfg.get("n_group") is not None:
        w.add_expert_group_count(cfg["n_group"])
    if cfg.get("topk_group") is not None:
        w.add_expert_group_used_count(cfg["topk_group"])
    if cfg["model_type"] == "deepseek_v3":
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    rope_cfg = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope_cfg.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope_cfg["factor"])
        w.add_rope_scaling_orig_ctx_len(rope_cfg["original_max_position_embeddings"])
        for key, add in (("beta_fast", w.add_rope_scaling_yarn_beta_fast), ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope_cfg.get(key) is not None:
                add(rope_cfg[key])
        if rope_cfg.get("mscale_all_dim") is not None:
            w.add_rope_scaling_yarn_log_mul(0.1 * rope_cfg["mscale_all_dim"])


def _split_kv_b(tensors: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """kv_b_proj [heads * (nope + v), kv_lora] into k_b [heads, kv_lora, nope] and v_b
    [heads, v, kv_lora], as llama.cpp's converter splits it."""
    out: dict[str, torch.Tensor] = {}
    heads, nope, v = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    for name, t in tensors.items():
        if name.endswith("kv_b_proj.weight"):
            k_b, v_b = t.view(heads, nope + v, -1).split([nope, v], dim=1)
            out[name.replace("kv_b_proj", "k_b_proj")] = k_b.transpose(1, 2).contiguous()
            out[name.replace("kv_b_proj", "v_b_proj")] = v_b.contiguous()
        else:
            out[name] = t
    return out
