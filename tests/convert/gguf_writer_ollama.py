"""GGUF files in Ollama's own layouts, rewritten from llama.cpp-style ones (tests/convert/gguf_writer.py):
gpt-oss as the files `ollama pull gpt-oss` fetches hold it, by Ollama's converter (convert_gptoss.go)
and the names its llama.cpp compatibility layer maps back (llama/compat/llama-ollama-compat.cpp)."""
from __future__ import annotations

import struct
from typing import Any

import numpy as np

# llama.cpp's tensor names -> Ollama's, in its gpt-oss files
OLLAMA_NAMES = ((".attn_output.", ".attn_out."), (".post_attention_norm.", ".ffn_norm."),
                (".attn_sinks.weight", ".attn_sinks"))
# keys Ollama's gpt-oss files lack (llama.cpp's converter writes them)
OLLAMA_LACKS = ("gpt-oss.expert_feed_forward_length", "gpt-oss.rope.scaling.type", "tokenizer.chat_template")


def as_ollama_gpt_oss(src: str, dst: str) -> str:
    """llama.cpp's gpt-oss GGUF ``src`` rewritten at ``dst`` as Ollama's: architecture "gptoss" and
    its key prefix, Ollama's tensor names, GPT-2's pre-tokenizer name, no chat template, no expert
    FFN length nor rope scaling type; the tensors' bytes unchanged (MXFP4 in ggml's layout, as
    Ollama's converter writes it since August 2025)."""
    import gguf
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, "gptoss")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in OLLAMA_LACKS:
            continue
        value: Any = "default" if key == "tokenizer.ggml.pre" else field.contents()
        sub = field.types[1] if len(field.types) > 1 else None
        w.add_key_value(key.replace("gpt-oss.", "gptoss.", 1), value, field.types[0], sub)
    for t in reader.tensors:
        name = t.name
        for old, new in OLLAMA_NAMES:
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
    data = bytearray(open(src, "rb").read())
    name = tensor.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * dims, qtype)
    with open(dst, "wb") as f:
        f.write(data)
    return dst
