"""The HF config.json of a GGUF model, from its metadata under llama.cpp's key names
(``{arch}.block_count``...) and the shapes of its tensors."""
from __future__ import annotations

from typing import Any, Optional

from convert.gguf_file import GgufFile, as_written, stored_dtype
from convert.gguf_hybrid import ARCHS as HYBRID_ARCHS, linear_config
from convert.model_store import BuildError

# GGUF general.architecture -> model_type (llama with experts is Mixtral; deepseek2 with sigmoid
# gating is DeepSeek-V3)
ARCHS = {"llama": "llama", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "olmoe": "olmoe", "gpt-oss": "gpt_oss",
         "glm4moe": "glm4_moe", "deepseek2": "deepseek_v2", "qwen3next": "qwen3_next",
         "qwen35moe": "qwen3_5_moe_text", "ernie4_5-moe": "ernie4_5_moe", "minimax-m2": "minimax_m2"}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "olmoe": "OlmoeForCausalLM", "gpt_oss": "GptOssForCausalLM", "glm4_moe": "Glm4MoeForCausalLM",
                 "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
                 "qwen3_next": "Qwen3NextForCausalLM", "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
                 "ernie4_5_moe": "Ernie4_5_MoeForCausalLM", "minimax_m2": "MiniMaxM2ForCausalLM"}
SOFTMAX, SIGMOID = 1, 2         # llama.cpp's expert_gating_func values
GATE_UP = "ffn_gate_up_exps"    # gate and up in one [E, 2I, H] (llama.cpp's --fuse-gate-up-exps)
ALL_MOE = ("mixtral", "gpt_oss", "olmoe", "qwen3_5_moe_text", "minimax_m2")      # families without dense layers


def hf_config(g: GgufFile) -> dict[str, Any]:
    """The HF config.json of the model in ``g``; a BuildError names what cannot be served."""
    if g.arch not in ARCHS:
        raise BuildError(f"{g.path}: GGUF architecture {g.arch!r} is not supported; moeserve reads "
                         f"GGUF files of {', '.join(sorted(ARCHS))} (for other models, give their "
                         "Hugging Face safetensors release)")
    a = g.arch_meta
    layers, heads, hidden = int(a("block_count")), a("attention.head_count"), int(a("embedding_length"))
    layers -= int(a("nextn_predict_layers", 0))      # multi-token-prediction layers (GLM-4.5's, Qwen's): not served
    kv_heads = a("attention.head_count_kv", heads)
    if g.arch in HYBRID_ARCHS and isinstance(kv_heads, list):     # Ollama's: 0 in the linear layers
        kv_heads = max(kv_heads)
    if isinstance(heads, list) or isinstance(kv_heads, list):
        raise BuildError(f"{g.path}: per-layer head counts are not supported")
    experts = int(a("expert_count", 0))
    if any(f"blk.0.{n}.0.weight" in g.tensors for n in ("ffn_gate", "ffn_up")) and experts:
        raise BuildError(f"{g.path}: experts stored one tensor each (GGUF files from before "
                         "llama.cpp merged them, early 2024); convert the model again with a current "
                         "llama.cpp, or give its safetensors release")
    if "rope_freqs.weight" in g.tensors:
        raise BuildError(f"{g.path}: per-dimension rope factors (rope_freqs, Llama 3.1's rope "
                         "scaling) are not supported; give the model's safetensors release")
    model_type = _model_type(g, experts)
    vocab, emb_hidden = g.shape("token_embd.weight")
    raw: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": vocab,
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": int(heads),
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(a("attention.key_length", hidden // int(heads))),
        "intermediate_size": int(a("feed_forward_length", 0)),
        "max_position_embeddings": int(a("context_length", 4096)),
        "rms_norm_eps": as_written(a("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(a("rope.freq_base", 10000.0)), "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "torch_dtype": str(stored_dtype(g.type_name("token_embd.weight"))).removeprefix("torch."),
        "attention_bias": "blk.0.attn_q.bias" in g.tensors,
    }
    if emb_hidden != hidden:
        raise BuildError(f"{g.path}: token_embd.weight is {[vocab, emb_hidden]}, the metadata says "
                         f"hidden size {hidden}")
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        value = g.meta(f"tokenizer.ggml.{name}", None)
        if value is not None:
            raw[key] = int(value)
    rope = _rope_scaling(g)
    if rope and model_type == "gpt_oss" and rope["rope_type"] == "yarn":
        rope["truncate"] = False        # gpt-oss's config: no rounding of yarn's ramp (not in the GGUF)
    if rope:
        raw["rope_scaling"] = rope
    if g.arch == "deepseek2":
        raw.update(_mla_config(g, raw))
    if g.arch in HYBRID_ARCHS:          # Qwen3-Next and Qwen3.5: Gated DeltaNet beside gated attention
        raw.update(linear_config(g, layers),
                   partial_rotary_factor=int(a("rope.dimension_count", raw["head_dim"])) / raw["head_dim"])
    if experts:
        raw.update(_moe_config(g, raw, experts))
    return raw


def expert_gate(g: GgufFile, layer: int) -> tuple[str, int, int]:
    """(the tensor holding ``layer``'s expert gates, I, H): ffn_gate_exps [E, I, H], or gate and
    up fused [E, 2I, H]."""
    fused = f"blk.{layer}.{GATE_UP}.weight"
    if fused in g.tensors:
        _, both, hidden = g.shape(fused)
        return fused, both // 2, hidden
    name = f"blk.{layer}.ffn_gate_exps.weight"
    _, inter, hidden = g.shape(name)
    return name, inter, hidden


def _model_type(g: GgufFile, experts: int) -> str:
    if g.arch == "llama" and experts:
        return "mixtral"
    if g.arch == "deepseek2":
        # without the key: DeepSeek-V2's and V2.5's softmax, as llama.cpp reads old files, unless
        # the routers have a selection bias, which only sigmoid routing has (GLM-4.7-Flash's
        # files lack the key; llama.cpp recognises them by their shape)
        biased = any(n.endswith(".exp_probs_b.bias") for n in g.tensors)
        gating = int(g.arch_meta("expert_gating_func", SIGMOID if biased else SOFTMAX))
        if gating not in (SOFTMAX, SIGMOID) or (gating == SOFTMAX and biased):
            raise BuildError(f"{g.path}: deepseek2 with expert gating function {gating}"
                             f"{' and a selection bias (exp_probs_b)' if biased else ''} is not supported "
                             "(softmax: DeepSeek-V2; sigmoid with the bias: V3, R1, Kimi-K2)")
        if g.arch_meta("attention.temperature_scale", None) is not None:
            raise BuildError(f"{g.path}: deepseek2 with attention temperature scaling (Mistral Large 3's) "
                             "is not supported")
        return "deepseek_v3" if gating == SIGMOID else "deepseek_v2"
    if g.arch == "qwen35moe" and any(n.endswith(".ssm_ba.weight") for n in g.tensors):
        raise BuildError(f"{g.path}: Ollama's conversion of Qwen3-Next labelled qwen35moe (ssm_ba) is not "
                         "supported; use a llama.cpp GGUF (qwen3next) or the safetensors release")
    return ARCHS[g.arch]


def _mla_config(g: GgufFile, raw: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek's latent attention. llama.cpp writes it as one KV head as wide as the latent
    (key_length: kv_lora_rank + rope), the heads' own widths under key/value_length_mla; files
    from before that (and before kv_b_proj was split into k_b and v_b) have them in key/value_length."""
    a = g.arch_meta
    rope, kv_lora = int(a("rope.dimension_count")), int(a("attention.kv_lora_rank"))
    k_len = int(a("attention.key_length_mla", None) or a("attention.key_length"))
    v_len = int(a("attention.value_length_mla", None) or a("attention.value_length"))
    q_lora = int(a("attention.q_lora_rank")) if "blk.0.attn_q_a.weight" in g.tensors else None
    if k_len <= rope:
        raise BuildError(f"{g.path}: key length {k_len} leaves no room beside the rope part ({rope})")
    raw.pop("head_dim")
    return {"num_key_value_heads": raw["num_attention_heads"], "qk_rope_head_dim": rope,
            "qk_nope_head_dim": k_len - rope, "v_head_dim": v_len, "kv_lora_rank": kv_lora, "q_lora_rank": q_lora}


def _rope_scaling(g: GgufFile) -> Optional[dict[str, Any]]:
    kind = str(g.arch_meta("rope.scaling.type", "none"))
    if kind == "none":
        return None
    factor = float(g.arch_meta("rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        ext = g.arch_meta("rope.scaling.yarn_ext_factor", None)
        if ext is not None and float(ext) != 1.0:
            raise BuildError(f"{g.path}: yarn with extrapolation factor {ext} is not supported")
        out = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings":
               int(g.arch_meta("rope.scaling.original_context_length"))}
        for key, name in (("yarn_attn_factor", "attention_factor"), ("yarn_beta_fast", "beta_fast"),
                          ("yarn_beta_slow", "beta_slow")):       # as llama.cpp's converter writes them
            value = g.arch_meta(f"rope.scaling.{key}", None)
            if value is not None:
                out[name] = float(value)
        log_mul = g.arch_meta("rope.scaling.yarn_log_multiplier", None)
        if log_mul is not None and g.arch == "deepseek2":
            # llama.cpp's converter writes 0.1 * mscale_all_dim, and its graph applies no other
            # mscale (DeepSeek's configs have mscale == mscale_all_dim: attention factor 1)
            m = float(f"{float(log_mul) / 0.1:.6g}")
            out.update(mscale=m, mscale_all_dim=m)
        return out
    raise BuildError(f"{g.path}: rope scaling {kind!r} is not supported (linear and yarn are)")


def _leading_dense_moe(g: GgufFile, experts: int, top_k: int, inter: int, first: int, shared: int,
                       norm: bool, groups: int) -> dict[str, Any]:
    """The fields DeepSeek's and GLM-4.5's configs share (routed and shared experts after
    ``first`` dense layers, scaled and maybe normalised weights, expert groups), read from the
    file's keys, with these families' defaults where a key is absent."""
    return {"n_routed_experts": experts, "num_experts_per_tok": top_k, "moe_intermediate_size": inter,
            "n_shared_experts": int(g.arch_meta("expert_shared_count", shared)), "first_k_dense_replace": first,
            "routed_scaling_factor": float(g.arch_meta("expert_weights_scale", 1.0)),
            "norm_topk_prob": bool(g.arch_meta("expert_weights_norm", norm)),
            "n_group": int(g.arch_meta("expert_group_count", groups) or groups),
            "topk_group": int(g.arch_meta("expert_group_used_count", groups) or groups)}


def _moe_config(g: GgufFile, raw: dict[str, Any], experts: int) -> dict[str, Any]:
    """The MoE fields of the config ``raw`` (its dense fields): counts, expert sizes read off
    the tensors, and the dense layers (those without a router)."""
    model_type, layers = raw["model_type"], raw["num_hidden_layers"]
    moe = [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" in g.tensors]
    if not moe:
        raise BuildError(f"{g.path}: the metadata says {experts} experts, but no layer has a router")
    _, inter, _ = expert_gate(g, moe[0])
    top_k = int(g.arch_meta("expert_used_count"))
    first = int(g.arch_meta("leading_dense_block_count", 0))
    if model_type in ("glm4_moe", "deepseek_v2", "deepseek_v3") and moe != list(range(first, layers)):
        raise BuildError(f"{g.path}: MoE layers {moe} do not follow the {first} leading dense ones")
    if model_type in ALL_MOE and len(moe) != layers:
        raise BuildError(f"{g.path}: {model_type} layers without experts are not supported")
    if model_type in ("deepseek_v2", "deepseek_v3"):
        groups = int(g.arch_meta("expert_group_count", 1) or 1)
        out = {**_leading_dense_moe(g, experts, top_k, inter, first, shared=0, norm=False, groups=groups),
               "moe_layer_freq": 1}
        if model_type == "deepseek_v3":         # llama.cpp rotates DeepSeek's rope pairs interleaved
            return {**out, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "rope_interleave": True}
        if out["norm_topk_prob"] and out["routed_scaling_factor"] != 1.0:
            # DeepSeek's V2 code normalises instead of scaling; llama.cpp does both (no release has both)
            raise BuildError(f"{g.path}: softmax routing with normalised weights and a scale "
                             f"({out['routed_scaling_factor']}) is not supported")
        # V2's group_limited_greedy ranks groups by their best expert, as DeepSeek's code does
        # (llama.cpp ranks them by their two best, as for V3)
        return {**out, "topk_method": "group_limited_greedy" if groups > 1 else "greedy"}
    if model_type == "ernie4_5_moe":
        every = int(g.arch_meta("interleave_moe_layer_step", 1) or 1)
        if moe != [i for i in range(first, layers) if (i + 1) % every == 0]:
            raise BuildError(f"{g.path}: MoE layers {moe} are not every {every}th from layer {first}")
        # the selection bias (moe_statics) of checkpoints trained without an auxiliary loss
        return {"moe_num_experts": experts, "moe_k": top_k, "moe_intermediate_size": inter,
                "moe_num_shared_experts": int(g.arch_meta("expert_shared_count", 0)),
                "moe_layer_start_index": first, "moe_layer_end_index": -1, "moe_layer_interval": every,
                "moe_use_aux_free": f"blk.{moe[0]}.exp_probs_b.bias" in g.tensors,
                "use_bias": raw["attention_bias"]}
    if model_type == "glm4_moe":
        head_dim = raw["head_dim"]
        rot = int(g.arch_meta("rope.dimension_count", head_dim // 2))
        shared = f"blk.{moe[0]}.ffn_gate_shexp.weight"
        gating = g.arch_meta("expert_gating_func", SIGMOID)
        if int(gating) != SIGMOID:
            raise BuildError(f"{g.path}: expert gating function {gating} (GLM-4.5's is 2, sigmoid)")
        # llama.cpp's GLM-4.5 graph has no expert groups (the released configs use one)
        return {**_leading_dense_moe(g, experts, top_k, inter, first, shared=int(shared in g.tensors),
                                     norm=True, groups=1),
                "partial_rotary_factor": rot / head_dim, "use_qk_norm": f"blk.{moe[0]}.attn_q_norm.weight" in g.tensors}
    if model_type in ("mixtral", "gpt_oss", "minimax_m2"):
        out = {"num_local_experts": experts, "num_experts_per_tok": top_k, "intermediate_size": inter}
        if model_type == "gpt_oss":     # every other layer slides (transformers' default layer_types)
            out["sliding_window"] = int(g.arch_meta("attention.sliding_window"))
        if model_type == "minimax_m2":  # sigmoid scores, chosen with the selection bias; rope on part of each head
            gating = int(g.arch_meta("expert_gating_func", SIGMOID))
            if gating != SIGMOID:
                raise BuildError(f"{g.path}: expert gating function {gating} (MiniMax-M2's is 2, sigmoid)")
            out.update(scoring_func="sigmoid", use_routing_bias=True,
                       rotary_dim=int(g.arch_meta("rope.dimension_count", raw["head_dim"])))
        return out
    # llama.cpp normalises the top-k weights of qwen3moe, qwen3next and qwen35moe, not of
    # qwen2moe/olmoe, unless the file says
    norm = g.arch_meta("expert_weights_norm", None)
    out: dict[str, Any] = {"num_experts": experts, "num_experts_per_tok": top_k,
                           "norm_topk_prob": bool(norm) if norm is not None else
                           model_type in ("qwen3_moe", "qwen3_next", "qwen3_5_moe_text")}
    if model_type == "olmoe":
        clip = g.arch_meta("attention.clamp_kqv", None)
        return {**out, "intermediate_size": inter, "clip_qkv": float(clip) if clip else None}
    out.update(moe_intermediate_size=inter, decoder_sparse_step=1,
               mlp_only_layers=[i for i in range(layers) if i not in moe])
    if model_type in ("qwen2_moe", "qwen3_next", "qwen3_5_moe_text"):
        out["qkv_bias"] = "blk.0.attn_q.bias" in g.tensors
        shared = f"blk.{moe[0]}.ffn_gate_shexp.weight"
        out["shared_expert_intermediate_size"] = g.shape(shared)[0] if shared in g.tensors else 0
    return out
