"""GGUF files converted once into checkpoint directories (``ensure_gguf``): what
``--model FILE.gguf`` and ``--model name:tag`` (a model Ollama has pulled) serve. The file is read
by convert/gguf_model.py; here its experts' format is chosen, the tokenizer converted, and the
directory built atomically into $MOESERVE_HOME/models (convert/model_store.py)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Callable, Optional

from configs.models import SERVED_NAME_KEY
from convert.gguf_file import FLOAT_TYPES, as_written
from convert.gguf_model import GgufModel
from convert.gguf_parts import model_stem
from convert.gguf_pre import conversion_params, split_like_llama_cpp
from convert.model_store import BuildError

log = logging.getLogger(__name__)
INT4_MAX_BITS = 5.0     # experts stored in at most this many bits per weight on average: int4
GGUF_GROUP = 32         # ggml's blocks and K-quant sub-blocks: int4 groups of 32 follow them


def default_quantize(model: GgufModel) -> str:
    """The expert format a GGUF's experts keep about their quality in: none for float files, int4
    where they average at most INT4_MAX_BITS bits per weight (Q4_K_M, Q4_0, Q3_K...), int8 above
    (Q5, Q6_K, Q8_0) and for gpt-oss's MXFP4, as its safetensors release is served."""
    expert_type = model.expert_type()
    if expert_type is None or expert_type in FLOAT_TYPES:
        return "none"
    if expert_type == "MXFP4":          # e2m1 levels are not evenly spaced: int8 keeps them (1.3% off)
        return "int8"
    return "int4" if model.expert_bits() <= INT4_MAX_BITS else "int8"


# chat templates moeserve writes for families whose files may carry none (Ollama's gpt-oss: Ollama
# renders harmony in its own code), in convert/data
OWN_TEMPLATES = {"gpt_oss": "harmony.jinja"}


def save_tokenizer(path: str, out_dir: str, pre: Optional[str] = None, model_type: str = "") -> None:
    """tokenizer.json, tokenizer_config.json and the chat template, by transformers (``pre``: the
    file's tokenizer.ggml.pre); a file without a chat template gets moeserve's own for
    ``model_type``'s format where it has one (OWN_TEMPLATES)."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise BuildError("reading a GGUF's tokenizer needs transformers: pip install "
                         "'moeserve[build]'") from e
    folder, name = os.path.split(os.path.abspath(path))
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name)
    except Exception as e:      # noqa: BLE001 - whatever transformers raises on this file's vocabulary
        raise BuildError(f"{path}: its tokenizer cannot be converted ({type(e).__name__}: {e})") from None
    split_like_llama_cpp(tok, path, pre)
    if not getattr(tok, "chat_template", None) and model_type in OWN_TEMPLATES:
        from importlib.resources import files
        tok.chat_template = (files("convert") / "data" / OWN_TEMPLATES[model_type]).read_text(encoding="utf-8")
        log.info("%s carries no chat template: %s's format is written by moeserve's own "
                 "(convert/data/%s)", path, model_type, OWN_TEMPLATES[model_type])
    if not getattr(tok, "chat_template", None):
        log.warning("%s carries no chat template (tokenizer.chat_template): only /v1/completions "
                    "will work, unless the server is given one (--chat-template FILE)", path)
    tok.save_pretrained(out_dir)


def source_id(parts: list[str]) -> dict[str, Any]:
    """The model's first file, and a signature of every part's size and time (a part replaced
    by another download: a new conversion)."""
    stats = [[st.st_size, int(st.st_mtime)] for st in map(os.stat, parts)]
    # one file: its [size, mtime] alone, as before split files, so earlier conversions are reused
    sig = hashlib.sha256(json.dumps(stats if len(stats) > 1 else stats[0]).encode()).hexdigest()[:16]
    return {"source": os.path.abspath(parts[0]), "source_signature": sig}


def convert_gguf(model: GgufModel, out_dir: str, kind: str, group_size: Optional[int],
                 served: str, progress: bool = True) -> None:
    """Write ``model`` as a checkpoint directory into the existing, empty ``out_dir``: experts in
    ``kind`` (int8, int4: the expert store; none: per-expert tensors), served as ``served``."""
    from convert.gguf_import import write_json
    from convert.quantize import quant_config, resolve_format, write_experts, write_per_expert, write_tensors
    save_tokenizer(model.file.path, out_dir, model.pre, model.config["model_type"])
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
    gen.update(sampling_defaults(model.file.meta))
    ends = stop_ids(model, raw.get("eos_token_id"))
    if len(ends) > 1:
        gen["eos_token_id"] = ends
    write_json(os.path.join(out_dir, "generation_config.json"), gen)


# the sampling defaults llama.cpp's converter copies from the model's generation_config.json, and
# llama.cpp's server applies: read back into generation_config.json (server/defaults.py applies them)
SAMPLING_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_k": "top_k",
                 "general.sampling.top_p": "top_p", "general.sampling.min_p": "min_p",
                 "general.sampling.penalty_repeat": "repetition_penalty"}


def sampling_defaults(meta: Callable[[str, Any], Any]) -> dict[str, Any]:
    """generation_config.json's sampling values from the file's general.sampling.* keys."""
    values = {name: meta(key, None) for key, name in SAMPLING_KEYS.items()}
    return {name: as_written(v) if isinstance(v, float) else v for name, v in values.items() if v is not None}


# tokens llama.cpp stops on by their text, beside the file's ids (gpt-oss's GGUF names only
# <|return|>; a tool call ends at <|call|>)
STOP_TEXTS = {"gpt_oss": ("<|return|>", "<|call|>", "<|endoftext|>")}


def stop_ids(model: GgufModel, eos: Optional[int]) -> list[int]:
    """Every token that ends a reply: eos, the file's eos list, end of turn and of message
    (tokenizer.ggml.eot/eom_token_id), and the family's own stop tokens."""
    meta = model.file.meta
    ends: list[Any] = [eos, *(meta("tokenizer.ggml.eos_token_ids", None) or []),
                       meta("tokenizer.ggml.eot_token_id", None), meta("tokenizer.ggml.eom_token_id", None)]
    texts = STOP_TEXTS.get(model.config["model_type"], ())
    if texts:
        tokens = meta("tokenizer.ggml.tokens", [])
        ends += [i for i, t in enumerate(tokens) if t in texts]
    return list(dict.fromkeys(int(e) for e in ends if e is not None))


def ensure_gguf(path: str, quantize: Optional[str] = None, group_size: Optional[int] = None,
                name: Optional[str] = None, served: Optional[str] = None, home: Optional[str] = None,
                progress: bool = True) -> str:
    """The checkpoint directory of GGUF ``path`` with its experts in ``quantize`` (by default the
    format that keeps their quality: ``default_quantize``), converted once into
    $MOESERVE_HOME/models under ``name`` (by default the file's name without .gguf and a hash of
    its path) and reused; served as ``served`` (by default the file's name without .gguf)."""
    from convert.model_store import build_atomically, moeserve_home
    from convert.quantize import BITS, resolve_format
    from engine.loader import QUANT_VERSION
    model = GgufModel(path)
    path = model.file.path             # a split GGUF: its first part, whichever part was named
    expert_type = model.expert_type()
    if expert_type is None and quantize not in (None, "none"):
        raise BuildError(f"{path}: a dense model ({model.config['model_type']}) has no routed experts "
                         f"to quantize (--quantize {quantize})")
    kind = quantize or default_quantize(model)
    if expert_type is not None:
        log.info("%s: %s experts in %s (%.2f bits per weight), served as %s%s", path,
                 model.config["model_type"], expert_type, model.expert_bits(), kind,
                 "" if quantize else " (--quantize int8, int4 or none to choose)")
    if kind == "int4" and not group_size:
        # ggml's blocks and K-quant sub-blocks cover 32 (or 16) weights: groups of 32 follow them
        try:
            group_size = resolve_format("int4", model.inter, model.hidden, GGUF_GROUP).group_size
        except BuildError:              # dimensions that groups of 32 do not divide
            group_size = resolve_format("int4", model.inter, model.hidden, None).group_size
    if kind != "int4":
        group_size = None
    # unquantized: the experts' dtype (a dense model: its weights')
    plain = str(model.stored_dtype()).removeprefix("torch.") if model.keys else model.config["torch_dtype"]
    tag = (plain if kind == "none" else kind) + (f"-g{group_size}" if group_size else "")
    stem = model_stem(path)
    served = served or stem
    if name is None:                # two files of one name in different folders: two conversions
        name = f"{stem}-{hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:8]}"
    target = os.path.join(moeserve_home(home), "models", f"{name}-{tag}")
    params = {"quantize": kind, "group_size": group_size, "layout": "cpu" if kind == "int4" else None,
              "version": QUANT_VERSION, "from": "gguf", "served": served, **source_id(model.file.parts),
              **conversion_params(model.pre)}
    dense, expert = model.weight_count()
    per_weight = {"none": model.stored_dtype().itemsize}.get(kind, BITS.get(kind, 16) / 8 * 1.1)
    need = int(dense * 2 + expert * per_weight) + 50_000_000

    def build(tmp: str) -> None:
        log.info("converting %s to %s into %s (first use; reused afterwards)", path, tag, target)
        convert_gguf(model, tmp, kind, group_size, served, progress)
    return build_atomically(target, params, build, need_bytes=need)

