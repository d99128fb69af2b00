"""GGUF files (llama.cpp's format: what Ollama and LM Studio download) served as checkpoints.

A GGUF is converted once, on first use, into $MOESERVE_HOME/models (``ensure_gguf``):
- config.json from the file's metadata, under llama.cpp's key names (``{arch}.block_count``...);
- tokenizer.json and the chat template from its vocabulary, by transformers' GGUF tokenizer
  conversion (the one the built-in default model is made with);
- every dense tensor dequantized by gguf-py (llama.cpp's own reader: it maps the file and
  dequantizes every ggml type), in bf16, or as they are where the file holds F32 or F16;
- the routed experts (stacked ``ffn_*_exps`` tensors) dequantized one expert at a time into the
  aligned expert store, int8 or int4 (cache/quant.py), or per-expert tensors (``none``).
llama.cpp's converter permutes the q/k rows of llama-architecture models for its rotary layout;
they are permuted back, as transformers does. Architectures: llama (dense, or Mixtral when it has
experts), qwen2moe, qwen3moe, olmoe.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from configs.models import SERVED_NAME_KEY
from convert.model_store import BuildError

log = logging.getLogger(__name__)

# GGUF general.architecture -> model_type (llama with experts is Mixtral)
ARCHS = {"llama": "llama", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "olmoe": "olmoe"}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "olmoe": "OlmoeForCausalLM"}
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
EXPERTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")      # gate [E, I, H], up, down [E, H, I]
FLOAT_TYPES = ("F32", "F16", "BF16")
STORED = {"F32": torch.float32, "F16": torch.float16}    # kept as they are; bf16 for the rest
BITS4 = ("Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_XXS",
         "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M", "MXFP4", "TQ1_0", "TQ2_0")


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
            raise BuildError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.tensors = {t.name: t for t in self._reader.tensors}
        self.arch = str(self.meta("general.architecture"))

    def meta(self, key: str, default: Any = KeyError) -> Any:
        field = self._reader.fields.get(key)
        if field is None:
            if default is KeyError:
                raise BuildError(f"{self.path}: the GGUF metadata has no {key!r}")
            return default
        return field.contents()

    def arch_meta(self, key: str, default: Any = KeyError) -> Any:
        return self.meta(f"{self.arch}.{key}", default)

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in torch order (ggml lists dimensions innermost first)."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape))

    def read(self, name: str, index: Optional[int] = None) -> torch.Tensor:
        """The tensor (or its ``index``-th slice along the first dimension), dequantized, fp32."""
        from gguf import GGMLQuantizationType, dequantize
        t = self.tensors[name]
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
    if g.arch not in ARCHS:
        raise BuildError(f"{g.path}: GGUF architecture {g.arch!r} is not supported; moeserve reads "
                         f"GGUF files of {', '.join(sorted(ARCHS))} (for other models, give their "
                         "Hugging Face safetensors release)")
    a = g.arch_meta
    layers, heads, hidden = int(a("block_count")), a("attention.head_count"), int(a("embedding_length"))
    kv_heads = a("attention.head_count_kv", heads)
    if isinstance(heads, list) or isinstance(kv_heads, list):
        raise BuildError(f"{g.path}: per-layer head counts are not supported")
    experts = int(a("expert_count", 0))
    if any(f"blk.0.{n}.0.weight" in g.tensors for n in ("ffn_gate", "ffn_up")) and experts:
        raise BuildError(f"{g.path}: experts stored one tensor each (GGUF files from before "
                         "llama.cpp merged them, early 2024); convert the model again with a current "
                         "llama.cpp, or give its safetensors release")
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
    if rope:
        raw["rope_scaling"] = rope
    if experts:
        raw.update(_moe_config(g, model_type, experts, layers))
    return raw


def _rope_scaling(g: GgufFile) -> Optional[dict[str, Any]]:
    kind = str(g.arch_meta("rope.scaling.type", "none"))
    if kind == "none":
        return None
    factor = float(g.arch_meta("rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings":
                int(g.arch_meta("rope.scaling.original_context_length"))}
    raise BuildError(f"{g.path}: rope scaling {kind!r} is not supported (linear and yarn are)")


def _moe_config(g: GgufFile, model_type: str, experts: int, layers: int) -> dict[str, Any]:
    """The MoE fields: counts, expert sizes read off the tensors, and the dense layers (those
    without a router)."""
    moe = [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" in g.tensors]
    if not moe:
        raise BuildError(f"{g.path}: the metadata says {experts} experts, but no layer has a router")
    _, inter, _ = g.shape(f"blk.{moe[0]}.ffn_gate_exps.weight")
    top_k = int(g.arch_meta("expert_used_count"))
    if model_type == "mixtral":
        if len(moe) != layers:
            raise BuildError(f"{g.path}: Mixtral-style layers without experts are not supported")
        return {"num_local_experts": experts, "num_experts_per_tok": top_k, "intermediate_size": inter}
    out: dict[str, Any] = {"num_experts": experts, "num_experts_per_tok": top_k,
                           # llama.cpp normalises the top-k weights of qwen3moe, not of qwen2moe/olmoe
                           "norm_topk_prob": model_type == "qwen3_moe"}
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


def hf_name(gguf_name: str, moe_module: str) -> Optional[str]:
    """The HF name of a dense GGUF tensor; None for an expert tensor; BuildError if unknown."""
    if gguf_name in TOP:
        return TOP[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit():
        if parts[2] in EXPERTS:
            return None
        if parts[2] in BLOCK and parts[3] in ("weight", "bias"):
            return f"model.layers.{parts[1]}.{BLOCK[parts[2]].format(moe=moe_module)}.{parts[3]}"
    if gguf_name == "rope_freqs.weight":           # llama 3's rope factors: computed from the config
        return ""
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

    def dense(self) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
        """(HF name, read) of every dense tensor, in its ``stored_dtype``."""
        for name in self.file.tensors:
            target = hf_name(name, self.moe_module)
            if target:
                yield target, (lambda n=name, t=target: self._dense(n, t))

    def _dense(self, name: str, target: str) -> torch.Tensor:
        w = self.file.read(name)
        if self.file.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = self.config["num_attention_heads" if "attn_q" in name else "num_key_value_heads"]
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
        expert = sum(int(t.n_elements) for n, t in self.file.tensors.items() if n.split(".")[2:3] and
                     n.split(".")[2] in EXPERTS)
        return sum(int(t.n_elements) for t in self.file.tensors.values()) - expert, expert

    def expert_names(self, i: int) -> dict[str, str]:
        mi, e = self.keys[i]
        p = self.layout.prefix(self.layout.moe_layers[mi])
        return {proj: f"{p}.{e}.{name}.weight" for proj, name in zip(("gate", "up", "down"), self.layout.names)}


def default_quantize(expert_type: Optional[str]) -> str:
    """The expert format a GGUF's experts keep about their quality in: none for float files,
    int4 for 4 bits and fewer, int8 otherwise (Q5, Q6_K, Q8_0)."""
    if expert_type is None or expert_type in FLOAT_TYPES:
        return "none"
    return "int4" if expert_type in BITS4 else "int8"


def save_tokenizer(path: str, out_dir: str) -> None:
    """tokenizer.json, tokenizer_config.json and the chat template, by transformers."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise BuildError("reading a GGUF's tokenizer needs transformers: pip install "
                         "'moeserve[build]'") from e
    folder, name = os.path.split(os.path.abspath(path))
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise BuildError(f"{path}: its tokenizer cannot be converted ({e})") from None
    if not getattr(tok, "chat_template", None):
        log.warning("%s carries no chat template (tokenizer.chat_template): only /v1/completions "
                    "will work", path)
    tok.save_pretrained(out_dir)


def source_id(path: str) -> dict[str, Any]:
    st = os.stat(path)
    sig = hashlib.sha256(json.dumps([st.st_size, int(st.st_mtime)]).encode()).hexdigest()[:16]
    return {"source": os.path.abspath(path), "source_signature": sig}


def convert_gguf(model: GgufModel, out_dir: str, kind: str, group_size: Optional[int],
                 served: str, progress: bool = True) -> None:
    """Write ``model`` as a checkpoint directory into the existing, empty ``out_dir``: experts in
    ``kind`` (int8, int4: the expert store; none: per-expert tensors), served as ``served``."""
    from convert.gguf_import import write_json
    from convert.quantize import quant_config, resolve_format, write_experts, write_per_expert, write_tensors
    save_tokenizer(model.file.path, out_dir)
    raw = {**model.config, SERVED_NAME_KEY: served}
    if kind == "none" or not model.keys:
        write_per_expert(out_dir, model.dense(), model, progress, model.stored_dtype())
    else:
        fmt = resolve_format(kind, model.inter, model.hidden, group_size)
        write_tensors(out_dir, model.dense())
        write_experts(out_dir, fmt, model, progress)
        raw = {**raw, "quantization_config": quant_config(fmt, (len(model.layout.moe_layers),
                                                                model.layout.num_experts))}
    write_json(os.path.join(out_dir, "config.json"), raw)
    gen = {k: raw[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in raw}
    write_json(os.path.join(out_dir, "generation_config.json"), gen)


def ensure_gguf(path: str, quantize: Optional[str] = None, group_size: Optional[int] = None,
                name: Optional[str] = None, served: Optional[str] = None, home: Optional[str] = None,
                progress: bool = True) -> str:
    """The checkpoint directory of GGUF ``path`` with its experts in ``quantize`` (by default the
    format that keeps their quality: ``default_quantize``), converted once into
    $MOESERVE_HOME/models under ``name`` (by default the file's name without .gguf) and reused;
    served as ``served`` (by default that name too)."""
    from convert.model_store import build_atomically, moeserve_home
    from convert.quantize import BITS, resolve_format
    from engine.loader import QUANT_VERSION
    model = GgufModel(path)
    expert_type = model.expert_type()
    if expert_type is None and quantize not in (None, "none"):
        raise BuildError(f"{path}: a dense model ({model.config['model_type']}) has no routed experts "
                         f"to quantize (--quantize {quantize})")
    kind = quantize or default_quantize(expert_type)
    if expert_type is not None:
        log.info("%s: %s experts in %s, served as %s%s", path, model.config["model_type"], expert_type,
                 kind, "" if quantize else " (--quantize int8, int4 or none to choose)")
    if kind == "int4" and not group_size:
        # ggml's blocks and K-quant sub-blocks cover 32 (or 16) weights: groups of 32 follow them
        try:
            group_size = resolve_format("int4", model.inter, model.hidden, GGUF_GROUP).group_size
        except BuildError:              # dimensions that groups of 32 do not divide
            group_size = resolve_format("int4", model.inter, model.hidden, None).group_size
    if kind != "int4":
        group_size = None
    tag = {"none": str(model.stored_dtype()).removeprefix("torch.")}.get(kind, kind) + \
        (f"-g{group_size}" if group_size else "")
    stem = name or os.path.basename(path).removesuffix(".gguf")
    served = served or stem
    target = os.path.join(moeserve_home(home), "models", f"{stem}-{tag}")
    params = {"quantize": kind, "group_size": group_size, "layout": "cpu" if kind == "int4" else None,
              "version": QUANT_VERSION, "from": "gguf", "served": served, **source_id(path)}
    dense, expert = model.weight_count()
    per_weight = {"none": model.stored_dtype().itemsize}.get(kind, BITS.get(kind, 16) / 8 * 1.1)
    need = int(dense * 2 + expert * per_weight) + 50_000_000

    def build(tmp: str) -> None:
        log.info("converting %s to %s into %s (first use; reused afterwards)", path, tag, target)
        convert_gguf(model, tmp, kind, group_size, served, progress)
    return build_atomically(target, params, build, need_bytes=need)


GGUF_GROUP = 32
