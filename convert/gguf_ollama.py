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

Ollama's first gpt-oss files (before October 2025) stored MXFP4 under ggml type 4 in OpenAI's nibble
order, which gguf-py cannot parse and Ollama itself no longer loads: they are refused, asking for a
new ``ollama pull`` (``LEGACY_HINT``).
"""
from __future__ import annotations

from typing import Any, Callable

# Ollama's architecture name -> llama.cpp's
LLAMA_CPP_ARCH = {"gptoss": "gpt-oss", "glm4moelite": "deepseek2"}
# per architecture: (Ollama's tensor name part, llama.cpp's)
RENAMES = {"gptoss": ((".attn_out.", ".attn_output."), (".ffn_norm.", ".post_attention_norm."))}
BARE = {"gptoss": (".attn_sinks",)}         # tensors Ollama names without their .weight
# metadata llama.cpp's loader needs that Ollama's files lack: (key under the file's prefix, value)
DEFAULTS = {"gptoss": {"rope.scaling.type": "yarn"}}
# metadata read from another of the file's keys: Ollama's GLM-4.7-Flash files hold the heads' own
# widths where llama.cpp keeps the latent's, and the latent's in llama.cpp's *_mla keys
MOVED = {"glm4moelite": {"attention.key_length_mla": "attention.key_length",
                         "attention.value_length_mla": "attention.value_length"}}
PRE_TOKENIZER = {"gptoss": "gpt-4o", "glm4moelite": "glm4"}
LEGACY_HINT = ("; ggml type 4 is how Ollama's first gpt-oss files (August-September 2025) stored MXFP4, "
               "a layout Ollama itself no longer loads: `ollama pull gpt-oss:20b` (or :120b) fetches "
               "the current file")


def translate(arch: str, tensors: dict[str, Any], meta: Callable[[str, Any], Any]
              ) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(llama.cpp's architecture, the tensors under llama.cpp's names, metadata values to read
    instead of the file's) for a file of architecture ``arch`` whose metadata ``meta(key, default)``
    reads; unchanged for llama.cpp's own."""
    if arch not in LLAMA_CPP_ARCH:
        return arch, tensors, {}
    renamed: dict[str, Any] = {}
    for name, t in tensors.items():
        for old, new in RENAMES.get(arch, ()):
            name = name.replace(old, new)
        if name.endswith(BARE.get(arch, ())):
            name += ".weight"
        renamed[name] = t
    overrides = {f"{arch}.{k}": v for k, v in DEFAULTS.get(arch, {}).items() if meta(f"{arch}.{k}", None) is None}
    for key, source in MOVED.get(arch, {}).items():
        value = meta(f"{arch}.{source}", None)
        if value is not None:
            overrides[f"{arch}.{key}"] = value
    overrides["tokenizer.ggml.pre"] = PRE_TOKENIZER[arch]
    return LLAMA_CPP_ARCH[arch], renamed, overrides
