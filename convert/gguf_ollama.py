"""Ollama's own GGUF layouts, read as llama.cpp's.

Ollama converted gpt-oss before llama.cpp could (August 2025), under its own names, and the files
``ollama pull gpt-oss:20b`` fetches still carry them:
- the architecture "gptoss", its metadata under ``gptoss.*``;
- ``attn_out`` for llama.cpp's ``attn_output``, ``ffn_norm`` for the post-attention norm, and
  ``attn_sinks`` without its ``.weight``;
- no ``expert_feed_forward_length`` (read off the tensors here anyway) nor rope scaling type
  (gpt-oss's is yarn);
- GPT-2's pre-tokenizer name, although the vocabulary splits text as gpt-4o's (o200k) does;
- no chat template: Ollama renders harmony in its own code (convert/data/harmony.jinja serves it).
Its GLM-4.7-Flash files ("glm4moelite") are DeepSeek's latent attention (llama.cpp's deepseek2)
under their own prefix, with the heads' own key and value widths where llama.cpp keeps the
latent's (and the latent's in llama.cpp's ``*_mla`` keys), and GLM's pre-tokenizer.
Ollama translates these files the same way when it hands them to llama.cpp (its llama-ollama-compat
layer); GgufFile does so on opening, before anything reads them.

Ollama's gpt-oss files from before October 2025 are refused, asking for a new ``ollama pull`` (the
files Ollama publishes were re-made then, and Ollama itself no longer loads the old ones): until late
August 2025 they stored MXFP4 under ggml type 4 in OpenAI's nibble order (which gguf-py cannot parse,
``LEGACY_HINT``), and until October each layer's expert gate and up interleaved in one tensor, or the
attention's q, k and v in one (``FUSED``).
"""
from __future__ import annotations

from typing import Any, Callable

from convert.model_store import BuildError

# Ollama's architecture name -> llama.cpp's
LLAMA_CPP_ARCH = {"gptoss": "gpt-oss", "glm4moelite": "deepseek2"}
# per architecture: (Ollama's tensor name part, llama.cpp's)
RENAMES = {"gptoss": ((".attn_out.", ".attn_output."), (".ffn_norm.", ".post_attention_norm."))}
SUFFIXLESS = {"gptoss": (".attn_sinks",)}   # tensors Ollama names without their .weight
# metadata llama.cpp's loader needs that Ollama's files lack: (key under the file's prefix, value);
# gpt-oss's yarn ramp is llama.cpp's default one (the files name none)
DEFAULTS = {"gptoss": {"rope.scaling.type": "yarn", "rope.scaling.yarn_beta_fast": 32.0,
                       "rope.scaling.yarn_beta_slow": 1.0}}
# tensors of Ollama's older layouts, which it no longer loads: gate and up interleaved in one, q|k|v in one
FUSED = {"gptoss": ("ffn_gate_up_exps", "attn_qkv")}
# metadata read from another of the file's keys: Ollama's GLM-4.7-Flash files hold the heads' own
# widths where llama.cpp keeps the latent's, and the latent's in llama.cpp's *_mla keys
MOVED = {"glm4moelite": {"attention.key_length_mla": "attention.key_length",
                         "attention.value_length_mla": "attention.value_length"}}
PRE_TOKENIZER = {"gptoss": "gpt-4o", "glm4moelite": "glm4"}
LEGACY_HINT = ("; ggml type 4 is how Ollama's first gpt-oss files (August 2025) stored MXFP4, "
               "a layout Ollama itself no longer loads: `ollama pull gpt-oss:20b` (or :120b) fetches "
               "the current file")


def translate(path: str, arch: str, tensors: dict[str, Any], meta: Callable[[str, Any], Any]
              ) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(llama.cpp's architecture, the tensors under llama.cpp's names, metadata values to read
    instead of the file's) for the file ``path`` of architecture ``arch`` whose metadata
    ``meta(key, default)`` reads; unchanged for llama.cpp's own."""
    if arch not in LLAMA_CPP_ARCH:
        return arch, tensors, {}
    fused = [n for n in tensors if set(n.split(".")[2:3]) & set(FUSED.get(arch, ()))]
    if fused:
        raise BuildError(f"{path}: an Ollama {arch} file from before October 2025 ({fused[0]}: its older "
                         "layout, which Ollama itself no longer loads); `ollama pull` the model again "
                         "for the current file")
    renamed: dict[str, Any] = {}
    for name, t in tensors.items():
        for old, new in RENAMES.get(arch, ()):
            name = name.replace(old, new)
        if name.endswith(SUFFIXLESS.get(arch, ())):
            name += ".weight"
        renamed[name] = t
    overrides = {f"{arch}.{k}": v for k, v in DEFAULTS.get(arch, {}).items() if meta(f"{arch}.{k}", None) is None}
    for key, source in MOVED.get(arch, {}).items():
        value = meta(f"{arch}.{source}", None)
        if value is not None:
            overrides[f"{arch}.{key}"] = value
    overrides["tokenizer.ggml.pre"] = PRE_TOKENIZER[arch]
    return LLAMA_CPP_ARCH[arch], renamed, overrides
