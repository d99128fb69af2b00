"""GGUF files (llama.cpp's format: what Ollama and LM Studio download) read as checkpoints.

A GGUF is converted once, on first use, into $MOESERVE_HOME/models (convert/gguf_convert.py), from
what this module reads of it:
- config.json from the file's metadata, under llama.cpp's key names (``{arch}.block_count``...);
- tokenizer.json and the chat template from its vocabulary, by transformers' GGUF tokenizer
  conversion (the one the built-in default model is made with);
- every dense tensor dequantized by gguf-py (llama.cpp's own reader: it maps the file and
  dequantizes every ggml type), in bf16, or as they are where the file holds F32 or F16;
- the routed experts (stacked ``ffn_*_exps`` tensors) dequantized one expert at a time into the
  aligned expert store, int8 or int4 (cache/quant.py), or per-expert tensors (``none``).
llama.cpp's converter permutes the q/k rows of llama-architecture models for its rotary layout;
they are permuted back, as transformers does. Architectures: llama (dense, or Mixtral when it has
experts), qwen2moe, qwen3moe, olmoe, gpt-oss (experts in MXFP4, gate and up split, biases apart),
glm4moe (GLM-4.5, its multi-token-prediction layers left out).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from convert.model_store import BuildError

log = logging.getLogger(__name__)

# GGUF general.architecture -> model_type (llama with experts is Mixtral)
ARCHS = {"llama": "llama", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "olmoe": "olmoe", "gpt-oss": "gpt_oss",
         "glm4moe": "glm4_moe"}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "olmoe": "OlmoeForCausalLM", "gpt_oss": "GptOssForCausalLM", "glm4_moe": "Glm4MoeForCausalLM"}
TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
       "output.weight": "lm_head.weight"}
# per block: GGUF name -> HF name under model.layers.{i}; "{moe}" is the MoE block's module
BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
         "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
         "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj", "ffn_gate_inp": "{moe}.gate",
         "ffn_gate_inp_shexp": "mlp.shared_expert_gate", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
         "ffn_up_shexp": "mlp.shared_expert.up_proj", "ffn_down_shexp": "mlp.shared_expert.down_proj"}
# gpt-oss's own names: the post-attention norm, the attention sinks ([heads], a bare parameter in
# HF) and the router (with a bias)
# GLM-4.5's: the post-attention norm, shared_experts (plural), the router's selection bias
BLOCK_BY_ARCH = {"gpt-oss": {"post_attention_norm": "post_attention_layernorm", "attn_sinks": "self_attn.sinks",
                             "ffn_gate_inp": "mlp.router"},
                 "glm4moe": {"post_attention_norm": "post_attention_layernorm",
                             "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
                             "ffn_up_shexp": "mlp.shared_experts.up_proj",
                             "ffn_down_shexp": "mlp.shared_experts.down_proj",
                             "exp_probs_b": "mlp.gate.e_score_correction_bias"}}
BARE = ("self_attn.sinks", "e_score_correction_bias")      # HF parameters without a .weight suffix
EXPERTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")      # gate [E, I, H], up, down [E, H, I]
FLOAT_TYPES = ("F32", "F16", "BF16")
STORED = {"F32": torch.float32, "F16": torch.float16}    # kept as they are; bf16 for the rest

class GgufFile:
    """One GGUF file: metadata values by key, tensors by name (memory-mapped by gguf-py)."""

    def __init__(self, path: str) -> None:
        try:
            from gguf import GGUFReader
        except ImportError as e:  # pragma: no cover - depends on the installation
            raise BuildError("reading a GGUF file needs gguf: pip install 'moeserve[build]'") from e
        self.path = path
        try:
            self._reader = GGUFReader(path)
        except (ValueError, OSError, IndexError, KeyError, TypeError, OverflowError) as e:
            # gguf-py reads a truncated or foreign file until an index or a parse fails
            hint = ("; a tensor type gguf-py does not know, as in Ollama's own gpt-oss conversion (its "
                    "MXFP4 under type 4): use ggml-org/gpt-oss-20b-GGUF or openai/gpt-oss-20b instead"
                    if "GGMLQuantizationType" in str(e) else "")
            raise BuildError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}){hint}") from None
        self.tensors = {t.name: t for t in self._reader.tensors}
        self.arch = str(self.meta("general.architecture"))
        if int(self.meta("split.count", 1)) > 1:
            raise BuildError(f"{path}: one part of a split GGUF ({self.meta('split.count')} files); "
                             "merge them into one first (llama.cpp's llama-gguf-split --merge)")
        self._check_types()

    def _check_types(self) -> None:
        """Every ggml type in the file is one gguf-py can dequantize (found now, not an hour
        into a conversion)."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize
        for qtype in {t.tensor_type for t in self.tensors.values()}:
            if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                continue
            block, size = GGML_QUANT_SIZES[qtype]
            try:
                dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
            except NotImplementedError:
                raise BuildError(f"{self.path}: tensors of ggml type {qtype.name}, which gguf-py "
                                 "cannot dequantize") from None

    def meta(self, key: str, default: Any = KeyError) -> Any:
        field = self._reader.fields.get(key)
        if field is None:
            if default is KeyError:
                raise BuildError(f"{self.path}: the GGUF metadata has no {key!r}")
            return default
        return field.contents()

    def arch_meta(self, key: str, default: Any = KeyError) -> Any:
        return self.meta(f"{self.arch}.{key}", default)

    def tensor(self, name: str) -> Any:
        t = self.tensors.get(name)
        if t is None:
            raise BuildError(f"{self.path}: the file has no tensor {name!r}")
        return t

    def type_name(self, name: str) -> str:
        return self.tensor(name).tensor_type.name

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in torch order (ggml lists dimensions innermost first)."""
        return tuple(int(d) for d in reversed(self.tensor(name).shape))

    def read(self, name: str, index: Optional[int] = None) -> torch.Tensor:
        """The tensor (or its ``index``-th slice along the first dimension), dequantized, fp32."""
        from gguf import GGMLQuantizationType, dequantize
        t = self.tensor(name)
        data = t.data if index is None else t.data[index]
        shape = self.shape(name) if index is None else self.shape(name)[1:]
        if t.tensor_type == GGMLQuantizationType.F32:
            out = np.asarray(data, dtype=np.float32)
        else:
            out = dequantize(np.asarray(data), t.tensor_type)
        return torch.from_numpy(np.array(out, dtype=np.float32).reshape(shape))   # a copy: the file is read-only


def stored_dtype(type_name: str) -> torch.dtype:
    """The dtype a tensor of ggml type ``type_name`` is written in: F32 and F16 as they are,
    every other type in bf16 (BF16 exactly; a quantized type's values rounded to bf16, whose
    step is finer than theirs)."""
    return STORED.get(type_name, torch.bfloat16)


def hf_config(g: GgufFile) -> dict[str, Any]:
    """The HF config.json of the model in ``g``; a BuildError names what cannot be served."""
    if g.arch == "gptoss":
        raise BuildError(f"{g.path}: Ollama's own gpt-oss conversion (architecture 'gptoss': fused gate/up "
                         "experts, its own tensor names) is not supported; use llama.cpp's "
                         "(ggml-org/gpt-oss-20b-GGUF) or the safetensors release (openai/gpt-oss-20b)")
    if g.arch not in ARCHS:
        raise BuildError(f"{g.path}: GGUF architecture {g.arch!r} is not supported; moeserve reads "
                         f"GGUF files of {', '.join(sorted(ARCHS))} (for other models, give their "
                         "Hugging Face safetensors release)")
    a = g.arch_meta
    layers, heads, hidden = int(a("block_count")), a("attention.head_count"), int(a("embedding_length"))
    layers -= int(a("nextn_predict_layers", 0))      # GLM-4.5's multi-token-prediction layers: not served
    kv_heads = a("attention.head_count_kv", heads)
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
    model_type = "mixtral" if g.arch == "llama" and experts else ARCHS[g.arch]
    vocab, emb_hidden = g.shape("token_embd.weight")
    raw: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": vocab,
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": int(heads),
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(a("attention.key_length", hidden // int(heads))),
        "intermediate_size": int(a("feed_forward_length", 0)),
        "max_position_embeddings": int(a("context_length", 4096)),
        # stored as f32: 1e-6 reads 9.99999997e-07; 7 significant digits give the config's value
        "rms_norm_eps": float(f'{a("attention.layer_norm_rms_epsilon", 1e-6):.7g}'),
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
    if experts:
        raw.update(_moe_config(g, raw, experts))
    return raw


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
        return out
    raise BuildError(f"{g.path}: rope scaling {kind!r} is not supported (linear and yarn are)")


def _moe_config(g: GgufFile, raw: dict[str, Any], experts: int) -> dict[str, Any]:
    """The MoE fields of the config ``raw`` (its dense fields): counts, expert sizes read off
    the tensors, and the dense layers (those without a router)."""
    model_type, layers = raw["model_type"], raw["num_hidden_layers"]
    moe = [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" in g.tensors]
    if not moe:
        raise BuildError(f"{g.path}: the metadata says {experts} experts, but no layer has a router")
    _, inter, _ = g.shape(f"blk.{moe[0]}.ffn_gate_exps.weight")
    top_k = int(g.arch_meta("expert_used_count"))
    if model_type == "glm4_moe":
        first = int(g.arch_meta("leading_dense_block_count", 0))
        if moe != list(range(first, layers)):
            raise BuildError(f"{g.path}: MoE layers {moe} do not follow the {first} leading dense ones")
        head_dim = raw["head_dim"]
        rot = int(g.arch_meta("rope.dimension_count", head_dim // 2))
        shared = f"blk.{moe[0]}.ffn_gate_shexp.weight"
        gating = g.arch_meta("expert_gating_func", 2)
        if int(gating) != 2:
            raise BuildError(f"{g.path}: expert gating function {gating} (GLM-4.5's is 2, sigmoid)")
        return {"n_routed_experts": experts, "num_experts_per_tok": top_k, "moe_intermediate_size": inter,
                "n_shared_experts": int(g.arch_meta("expert_shared_count", 1 if shared in g.tensors else 0)),
                "first_k_dense_replace": first, "partial_rotary_factor": rot / head_dim,
                "routed_scaling_factor": float(g.arch_meta("expert_weights_scale", 1.0)),
                "norm_topk_prob": bool(g.arch_meta("expert_weights_norm", True)),
                # llama.cpp's GLM-4.5 graph has no expert groups (the released configs use one)
                "n_group": int(g.arch_meta("expert_group_count", 1) or 1),
                "topk_group": int(g.arch_meta("expert_group_used_count", 1) or 1),
                "use_qk_norm": f"blk.{moe[0]}.attn_q_norm.weight" in g.tensors}
    if model_type in ("mixtral", "gpt_oss"):
        if len(moe) != layers:
            raise BuildError(f"{g.path}: {model_type} layers without experts are not supported")
        out = {"num_local_experts": experts, "num_experts_per_tok": top_k, "intermediate_size": inter}
        if model_type == "gpt_oss":     # every other layer slides (transformers' default layer_types)
            out["sliding_window"] = int(g.arch_meta("attention.sliding_window"))
        return out
    # llama.cpp normalises the top-k weights of qwen3moe, not of qwen2moe/olmoe, unless the file says
    norm = g.arch_meta("expert_weights_norm", None)
    out: dict[str, Any] = {"num_experts": experts, "num_experts_per_tok": top_k,
                           "norm_topk_prob": bool(norm) if norm is not None else model_type == "qwen3_moe"}
    if model_type == "olmoe":
        if len(moe) != layers:
            raise BuildError(f"{g.path}: OLMoE layers without experts are not supported")
        clip = g.arch_meta("attention.clamp_kqv", None)
        return {**out, "intermediate_size": inter, "clip_qkv": float(clip) if clip else None}
    out.update(moe_intermediate_size=inter, decoder_sparse_step=1,
               mlp_only_layers=[i for i in range(layers) if i not in moe])
    if model_type == "qwen2_moe":
        out["qkv_bias"] = "blk.0.attn_q.bias" in g.tensors
        shared = f"blk.{moe[0]}.ffn_gate_shexp.weight"
        out["shared_expert_intermediate_size"] = g.shape(shared)[0] if shared in g.tensors else 0
    return out


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (its converter's ``permute``) for ``heads`` heads."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def is_expert_weight(gguf_name: str) -> bool:
    """A stacked routed-expert weight (blk.N.ffn_*_exps.weight; not gpt-oss's expert biases)."""
    parts = gguf_name.split(".")
    return len(parts) == 4 and parts[2] in EXPERTS and parts[3] == "weight"


def hf_name(gguf_name: str, moe_module: str, arch: str = "") -> Optional[str]:
    """The HF name of a dense GGUF tensor; None for an expert tensor (weights, and gpt-oss's
    biases, which GgufModel.dense stacks); BuildError if unknown."""
    if gguf_name in TOP:
        return TOP[gguf_name]
    parts = gguf_name.split(".")
    table = {**BLOCK, **BLOCK_BY_ARCH.get(arch, {})}
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit():
        if parts[2] in EXPERTS:
            return None
        if parts[2] in table and parts[3] in ("weight", "bias"):
            base = f"model.layers.{parts[1]}.{table[parts[2]].format(moe=moe_module)}"
            return base if base.endswith(BARE) else f"{base}.{parts[3]}"
    raise BuildError(f"tensor {gguf_name!r} has no counterpart in moeserve's models")


class GgufModel:
    """A GGUF model as a converter reads it: its HF config, dense tensors and routed experts."""

    def __init__(self, path: str) -> None:
        self.file = GgufFile(path)
        self.config = hf_config(self.file)
        from engine.models import family
        from engine.models.base import HFConfig
        with torch.device("meta"):
            self.layout = family(self.config["model_type"]).build(HFConfig(self.config), 16).layout
        self.moe_module = "block_sparse_moe" if self.config["model_type"] == "mixtral" else "mlp"
        moe = self.layout.moe_layers if self.layout else ()
        self.keys = [(mi, e) for mi in range(len(moe)) for e in range(self.layout.num_experts)] if moe else []
        if self.keys:
            _, self.inter, self.hidden = self.file.shape(f"blk.{moe[0]}.ffn_gate_exps.weight")

    def expert_type(self) -> Optional[str]:
        """The ggml type of the first layer's expert weights; None for a dense model."""
        if not self.keys:
            return None
        return self.file.type_name(f"blk.{self.layout.moe_layers[0]}.ffn_gate_exps.weight")

    def expert_bits(self) -> float:
        """Bits per weight of the routed experts in the file, on average (a Q4_K_M file mixes
        Q4_K with Q6_K, and falls back to Q5_0 where rows are not a multiple of 256)."""
        tensors = [t for n, t in self.file.tensors.items() if is_expert_weight(n)]
        return 8 * sum(int(t.n_bytes) for t in tensors) / max(1, sum(int(t.n_elements) for t in tensors))

    def dense(self) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
        """(HF name, read) of every dense tensor, in its ``stored_dtype``."""
        layers = self.config["num_hidden_layers"]
        for name in self.file.tensors:
            parts = name.split(".")
            if parts[0] == "blk" and int(parts[1]) >= layers:      # multi-token-prediction layers
                continue
            target = hf_name(name, self.moe_module, self.file.arch)
            if target:
                yield target, (lambda n=name, t=target: self._dense(n, t))
        if self.config["model_type"] == "gpt_oss":      # expert biases: dense tensors of each layer
            for layer in self.layout.moe_layers:
                p = self.layout.prefix(layer)
                yield f"{p}.gate_up_proj_bias", lambda b=f"blk.{layer}": self._gate_up_bias(b)
                yield f"{p}.down_proj_bias", lambda b=f"blk.{layer}": self.file.read(f"{b}.ffn_down_exps.bias")

    def _gate_up_bias(self, block: str) -> torch.Tensor:
        """gpt-oss's gate and up biases [E, I] each, interleaved as transformers stacks them [E, 2I]."""
        gate, up = self.file.read(f"{block}.ffn_gate_exps.bias"), self.file.read(f"{block}.ffn_up_exps.bias")
        return torch.stack([gate, up], dim=-1).reshape(gate.shape[0], -1)

    def _dense(self, name: str, target: str) -> torch.Tensor:
        w = self.file.read(name)
        if self.file.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias",
                                                        "attn_k.bias")):           # biases are permuted too
            heads = self.config["num_attention_heads" if ".attn_q." in name else "num_key_value_heads"]
            w = _unpermute(w, heads)
        if target.endswith("shared_expert_gate.weight"):
            w = w.reshape(1, -1)                        # [H] in GGUF, a [1, H] linear in HF
        return w.to(stored_dtype(self.file.type_name(name)))

    def read(self, i: int, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
        """The ``i``-th expert of ``keys``: gate [I, H], up [I, H], down [H, I], fp32 or ``dtype``."""
        mi, e = self.keys[i]
        layer = self.layout.moe_layers[mi]
        return {proj: self.file.read(f"blk.{layer}.{name}.weight", e).to(dtype or torch.float32)
                for proj, name in zip(("gate", "up", "down"), EXPERTS)}

    def stored_dtype(self) -> torch.dtype:
        """The dtype unquantized experts are written in (``stored_dtype`` of their type)."""
        return stored_dtype(self.expert_type() or "F32")

    def weight_count(self) -> tuple[int, int]:
        """(dense, routed expert) weights in the file."""
        expert = sum(int(t.n_elements) for n, t in self.file.tensors.items() if is_expert_weight(n))
        return sum(int(t.n_elements) for t in self.file.tensors.values()) - expert, expert

    def expert_names(self, i: int) -> dict[str, str]:
        mi, e = self.keys[i]
        p = self.layout.prefix(self.layout.moe_layers[mi])
        return {proj: f"{p}.{e}.{name}.weight" for proj, name in zip(("gate", "up", "down"), self.layout.names)}
