"""GGUF files (llama.cpp's format: what Ollama and LM Studio download) read as checkpoints.

A GGUF is converted once, on first use, into $MOESERVE_HOME/models (convert/gguf_convert.py), from
what this module reads of it (through convert/gguf_file.py, which maps the file or its parts):
- config.json from the file's metadata, under llama.cpp's key names (convert/gguf_config.py);
- tokenizer.json and the chat template from its vocabulary, by transformers' GGUF tokenizer
  conversion (the one the built-in default model is made with);
- every dense tensor dequantized by gguf-py (llama.cpp's own reader: it maps the file and
  dequantizes every ggml type), in bf16, or as they are where the file holds F32 or F16;
- the routed experts (stacked ``ffn_*_exps`` tensors) dequantized one expert at a time into the
  aligned expert store, int8 or int4 (cache/quant.py), or per-expert tensors (``none``).
llama.cpp's converter permutes the q/k rows of llama-architecture models for its rotary layout;
they are permuted back, as transformers does. Architectures: llama (dense, or Mixtral when it has
experts), qwen2moe, qwen3moe, olmoe, gpt-oss (experts in MXFP4, gate and up split, biases apart),
glm4moe (GLM-4.5, its multi-token-prediction layers left out), deepseek2 (DeepSeek-V2 and V2-Lite;
V3, R1 and Kimi-K2 by their sigmoid gating; kv_b_proj rebuilt from llama.cpp's k_b and v_b),
qwen3next and qwen35moe (convert/gguf_hybrid.py), ernie4_5-moe (ERNIE-4.5's MoE models), minimax-m2
(MiniMax-M2 and M2.1).
A split GGUF is read from all its parts (convert/gguf_file.py), and Ollama's own gpt-oss (gptoss) and
GLM-4.7-Flash (glm4moelite) files as llama.cpp's (convert/gguf_ollama.py).
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from convert.gguf_config import GATE_UP, expert_gate, hf_config
from convert.gguf_file import GgufFile, stored_dtype
from convert.gguf_hybrid import VISION, handles as hybrid_handles, hybrid_tensor
from convert.gguf_pre import file_pre
from convert.model_store import BuildError

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
# DeepSeek's and GLM-4.5's: shared_experts (plural), the router's selection bias
SHARED_EXPERTS = {"ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
                  "ffn_down_shexp": "mlp.shared_experts.down_proj", "exp_probs_b": "mlp.gate.e_score_correction_bias"}
# gpt-oss's own names: the post-attention norm, the attention sinks ([heads], a bare parameter in
# HF) and the router (with a bias); GLM-4.5's post-attention norm; DeepSeek's latent attention
BLOCK_BY_ARCH = {"gpt-oss": {"post_attention_norm": "post_attention_layernorm", "attn_sinks": "self_attn.sinks",
                             "ffn_gate_inp": "mlp.router"},
                 "glm4moe": {"post_attention_norm": "post_attention_layernorm", **SHARED_EXPERTS},
                 "deepseek2": {"attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm",
                               "attn_q_b": "self_attn.q_b_proj", "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
                               "attn_kv_a_norm": "self_attn.kv_a_layernorm", "attn_kv_b": "self_attn.kv_b_proj",
                               **SHARED_EXPERTS},
                 "ernie4_5-moe": {**SHARED_EXPERTS, "exp_probs_b": "mlp.moe_statics.e_score_correction_bias"},
                 "minimax-m2": {"exp_probs_b": "{moe}.e_score_correction_bias"}}
# kv_b_proj as current llama.cpp files hold it: split per head into k_b (transposed) and v_b
KV_B_PARTS = ("attn_k_b", "attn_v_b")
MIXTRAL_NAMES = ("mixtral", "minimax_m2")     # MoE blocks named block_sparse_moe, as Mixtral's
BARE = ("self_attn.sinks", "e_score_correction_bias")      # HF parameters without a .weight suffix
EXPERTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")      # gate [E, I, H], up, down [E, H, I]


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (its converter's ``permute``) for ``heads`` heads."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def is_expert_weight(gguf_name: str) -> bool:
    """A stacked routed-expert weight (blk.N.ffn_*_exps.weight; not gpt-oss's expert biases)."""
    parts = gguf_name.split(".")
    return len(parts) == 4 and (parts[2] in EXPERTS or parts[2] == GATE_UP) and parts[3] == "weight"


def hf_name(gguf_name: str, moe_module: str, arch: str = "") -> Optional[str]:
    """The HF name of a dense GGUF tensor; None for an expert tensor (weights, and gpt-oss's
    biases, which GgufModel.dense stacks) and DeepSeek's k_b/v_b (which it joins); BuildError
    if unknown. The hybrid layers' changed tensors are convert/gguf_hybrid.py's."""
    if gguf_name in TOP:
        return TOP[gguf_name]
    parts = gguf_name.split(".")
    table = {**BLOCK, **BLOCK_BY_ARCH.get(arch, {})}
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit():
        if parts[2] in (*EXPERTS, GATE_UP) or (arch == "deepseek2" and parts[2] in KV_B_PARTS):
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
        self.pre = file_pre(self.file.path, self.file.meta("tokenizer.ggml.pre", None),
                            self.file.meta("tokenizer.ggml.model", None))
        from engine.models import skeleton
        from engine.models.base import HFConfig
        self.layout = skeleton(HFConfig(self.config), 16).layout
        self.moe_module = "block_sparse_moe" if self.config["model_type"] in MIXTRAL_NAMES else "mlp"
        moe = self.layout.moe_layers if self.layout else ()
        self.keys = [(mi, e) for mi in range(len(moe)) for e in range(self.layout.num_experts)] if moe else []
        if self.keys:
            self.gate_name, self.inter, self.hidden = expert_gate(self.file, moe[0])

    def served(self, name: str) -> bool:
        """Whether GGUF tensor ``name`` belongs to the model served: not to the layers past the
        decoder's (multi-token prediction), nor to a vision tower in the file (Ollama's Qwen3.5)."""
        parts = name.split(".")
        return not name.startswith(VISION) and not (parts[0] == "blk" and int(parts[1]) >= self.config["num_hidden_layers"])

    def expert_type(self) -> Optional[str]:
        """The ggml type of the first layer's expert weights; None for a dense model."""
        if not self.keys:
            return None
        return self.file.type_name(self.gate_name)

    def expert_bits(self) -> float:
        """Bits per weight of the routed experts in the file, on average (a Q4_K_M file mixes
        Q4_K with Q6_K, and falls back to Q5_0 where rows are not a multiple of 256)."""
        tensors = [t for n, t in self.file.tensors.items() if is_expert_weight(n) and self.served(n)]
        return 8 * sum(int(t.n_bytes) for t in tensors) / max(1, sum(int(t.n_elements) for t in tensors))

    def dense(self) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
        """(HF name, read) of every dense tensor, in its ``stored_dtype``."""
        layers = self.config["num_hidden_layers"]
        for name in self.file.tensors:
            if not self.served(name):
                continue
            if hybrid_handles(self.file, name):         # Qwen3-Next's and Qwen3.5's changed tensors
                item = hybrid_tensor(self.file, self.config, name)
                if item:
                    yield item
                continue
            target = hf_name(name, self.moe_module, self.file.arch)
            if target:
                yield target, (lambda n=name, t=target: self._dense(n, t))
        if self.config["model_type"] == "gpt_oss":      # expert biases: dense tensors of each layer
            for layer in self.layout.moe_layers:
                p = self.layout.prefix(layer)
                yield f"{p}.gate_up_proj_bias", lambda b=f"blk.{layer}": self._gate_up_bias(b)
                yield f"{p}.down_proj_bias", lambda b=f"blk.{layer}": self.file.read(f"{b}.ffn_down_exps.bias")
        tensors = self.file.tensors if self.file.arch == "deepseek2" else {}
        for layer in range(layers):
            b = f"blk.{layer}"
            # k_b and v_b joined, unless the file holds the whole attn_kv_b too (some do): that is read
            if f"{b}.attn_k_b.weight" in tensors and f"{b}.attn_kv_b.weight" not in tensors:
                yield f"model.layers.{layer}.self_attn.kv_b_proj.weight", lambda b=b: self._kv_b(b)

    def _kv_b(self, block: str) -> torch.Tensor:
        """DeepSeek's kv_b_proj [heads * (nope + v), kv_lora] from llama.cpp's k_b [heads, kv_lora,
        nope] and v_b [heads, v, kv_lora] (its converter's split undone)."""
        k_b, v_b = (self.file.read(f"{block}.{n}.weight") for n in KV_B_PARTS)
        kv_b = torch.cat([k_b.transpose(1, 2), v_b], dim=1)               # [heads, nope + v, kv_lora]
        dtype = torch.promote_types(*(stored_dtype(self.file.type_name(f"{block}.{n}.weight")) for n in KV_B_PARTS))
        return kv_b.reshape(-1, kv_b.shape[-1]).to(dtype)

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
        if target.endswith(("shared_expert_gate.weight", "moe_statics.e_score_correction_bias")):
            w = w.reshape(1, -1)                        # [H] in GGUF, a [1, H] linear in HF (ERNIE's [1, E])
        return w.to(stored_dtype(self.file.type_name(name)))

    def read(self, i: int, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
        """The ``i``-th expert of ``keys``: gate [I, H], up [I, H], down [H, I], fp32 or ``dtype``."""
        mi, e = self.keys[i]
        b = f"blk.{self.layout.moe_layers[mi]}"
        if f"{b}.{GATE_UP}.weight" in self.file.tensors:
            gate, up = self.file.read(f"{b}.{GATE_UP}.weight", e).split(self.inter)     # [2I, H]
            out = {"gate": gate, "up": up, "down": self.file.read(f"{b}.ffn_down_exps.weight", e)}
        else:
            out = {proj: self.file.read(f"{b}.{name}.weight", e) for proj, name in zip(("gate", "up", "down"), EXPERTS)}
        return {proj: w.to(dtype or torch.float32) for proj, w in out.items()}

    def stored_dtype(self) -> torch.dtype:
        """The dtype unquantized experts are written in (``stored_dtype`` of their type)."""
        return stored_dtype(self.expert_type() or "F32")

    def weight_count(self) -> tuple[int, int]:
        """(dense, routed expert) weights in the file."""
        served = {n: int(t.n_elements) for n, t in self.file.tensors.items() if self.served(n)}
        expert = sum(count for n, count in served.items() if is_expert_weight(n))
        return sum(served.values()) - expert, expert

    def expert_names(self, i: int) -> dict[str, str]:
        mi, e = self.keys[i]
        p = self.layout.prefix(self.layout.moe_layers[mi])
        return {proj: f"{p}.{e}.{name}.weight" for proj, name in zip(("gate", "up", "down"), self.layout.names)}
