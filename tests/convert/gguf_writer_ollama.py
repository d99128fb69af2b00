"""GGUF files in Ollama's own layouts, rewritten from llama.cpp-style ones (tests/convert/gguf_writer.py):
gpt-oss and GLM-4.7-Flash as the files `ollama pull` fetches hold them, by Ollama's converters
(convert_gptoss.go) and what its llama.cpp compatibility layer maps back
(llama/compat/llama-ollama-compat.cpp)."""
from __future__ import annotations

import struct
from typing import Any, Callable, Optional

import numpy as np

# llama.cpp's tensor names -> Ollama's, in its gpt-oss files
OLLAMA_NAMES = ((".attn_output.", ".attn_out."), (".post_attention_norm.", ".ffn_norm."),
                (".attn_sinks.weight", ".attn_sinks"))
# keys Ollama's gpt-oss files lack (llama.cpp's converter writes them)
OLLAMA_LACKS = ("gpt-oss.expert_feed_forward_length", "gpt-oss.rope.scaling.type",
                "gpt-oss.rope.scaling.yarn_beta_fast", "gpt-oss.rope.scaling.yarn_beta_slow", "tokenizer.chat_template")


def as_ollama_gpt_oss(src: str, dst: str) -> str:
    """llama.cpp's gpt-oss GGUF ``src`` rewritten at ``dst`` as Ollama's: architecture "gptoss" and
    its key prefix, Ollama's tensor names, GPT-2's pre-tokenizer name, no chat template, no expert
    FFN length nor rope scaling type; the tensors' bytes unchanged (MXFP4 in ggml's layout, as
    Ollama's converter writes it since August 2025)."""
    def key(k: str, value: Any) -> Optional[tuple[str, Any]]:
        return None if k in OLLAMA_LACKS else (k.replace("gpt-oss.", "gptoss.", 1), value)
    return _rewrite(src, dst, "gptoss", key, OLLAMA_NAMES)


def as_ollama_glm4moelite(src: str, dst: str, cfg: dict[str, Any]) -> str:
    """llama.cpp's deepseek2 GGUF ``src`` of GLM-4.7-Flash's shape (config ``cfg``) rewritten at ``dst``
    as Ollama's published GLM-4.7-Flash files are: architecture "glm4moelite" and its prefix, the
    heads' own key and value widths in key/value_length and the latent's in the *_mla keys (the
    reverse of llama.cpp's), its KV head count, no expert group keys, no chat template."""
    rope, lora = cfg["qk_rope_head_dim"], cfg["kv_lora_rank"]
    widths = {"attention.key_length": cfg["qk_nope_head_dim"] + rope, "attention.value_length": cfg["v_head_dim"],
              "attention.key_length_mla": lora + rope, "attention.value_length_mla": lora,
              "attention.head_count_kv": cfg["num_key_value_heads"]}
    dropped = ("expert_group_count", "expert_group_used_count")

    def key(k: str, value: Any) -> Optional[tuple[str, Any]]:
        name = k.removeprefix("deepseek2.")
        if name in dropped or k == "tokenizer.chat_template":
            return None
        return f"glm4moelite.{name}" if name != k else k, widths.get(name, value)
    return _rewrite(src, dst, "glm4moelite", key, ())


def _rewrite(src: str, dst: str, arch: str, key: Callable[[str, Any], Optional[tuple[str, Any]]],
             names: tuple[tuple[str, str], ...]) -> str:
    """``src`` written at ``dst`` with architecture ``arch``, each metadata key and value as ``key``
    maps it (None: left out), tensor names with ``names``' replacements, GPT-2's pre-tokenizer
    name; the tensors' bytes unchanged."""
    import gguf

    from convert.gguf_reader import FastGGUFReader
    reader = FastGGUFReader(src)
    w = gguf.GGUFWriter(dst, arch)
    for k, field in reader.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        mapped = key(k, "default" if k == "tokenizer.ggml.pre" else field.contents())
        if mapped is not None:
            sub = field.types[1] if len(field.types) > 1 else None
            w.add_key_value(mapped[0], mapped[1], field.types[0], sub)
    for t in reader.tensors:
        name = t.name
        for old, new in names:
            name = name.replace(old, new)
        plain = t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        w.add_tensor(name, np.array(t.data), raw_dtype=None if plain else t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def with_tensor_type(src: str, dst: str, tensor: str, qtype: int) -> str:
    """``src`` copied to ``dst`` with ``tensor``'s ggml type id set to ``qtype`` in its tensor info
    (the name, its dimensions, then the type): Ollama's first gpt-oss files put MXFP4 under type 4."""
    with open(src, "rb") as f:
        data = bytearray(f.read())
    name = tensor.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * dims, qtype)
    with open(dst, "wb") as f:
        f.write(data)
    return dst
