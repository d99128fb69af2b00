"""Load a Hugging Face checkpoint directory straight from its safetensors files.

Dense weights are read into the model on the device; routed experts are only located
(ExpertSource: file + offsets) and handed to whichever ExpertProvider the caller wires in.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from cache.packed import packs
from cache.expert_store import STORE_FILE, locate_experts
from cache.provider import ExpertSource, TensorRef, read_tensor
from cache.quant import ExpertFormat, format_from_config
from cache.safetensors_file import CheckpointError, read_checkpoint_index, slice_leading
from configs.models import model_name
from engine.kernels import pack_linears, quantize_linears
from engine.models import family, skeleton
from engine.models.base import DecoderLM, ExpertLayout, HFConfig
from engine.protocol import ModelInfo

log = logging.getLogger("moeserve.loader")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_CONTEXT_CAP = 2048
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
QUANT_METHOD = "moeserve"     # quantization_config.quant_method of checkpoints moeserve wrote
QUANT_VERSION = 1
FP8_METHOD = "fp8"            # block-scaled FP8 checkpoints (DeepSeek-V3...): converted by convert/fp8.py
MXFP4_METHOD = "mxfp4"        # gpt-oss's MXFP4 experts: converted by convert/gpt_oss.py
# quantization methods of checkpoints served converted, never as they are: what each one is
CONVERTED_METHODS = {FP8_METHOD: "an FP8 checkpoint (its dense weights dequantized to bf16)",
                     MXFP4_METHOD: "an MXFP4 checkpoint (gpt-oss)"}


def quant_method(raw: dict) -> Optional[str]:
    """config.json's quantization_config.quant_method, or None."""
    qc = raw.get("quantization_config")
    return qc.get("quant_method") if isinstance(qc, dict) else None


@dataclass
class LoadedModel:
    model: DecoderLM
    info: ModelInfo
    experts: list[ExpertSource]
    device: torch.device
    dtype: torch.dtype


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("invalid device='cuda': no CUDA device is available (use --device cpu)")
    return torch.device(name)


def resolve_dtype(name: str, cfg: HFConfig, device: torch.device) -> torch.dtype:
    """'auto': bf16 for quantized experts (the int8/int4 kernels take bf16 activations), else the
    checkpoint's own dtype; fp32 instead of bf16 on a CPU without native bf16 (oneDNN) support."""
    if name != "auto":
        return DTYPES[name]
    if cfg.get("quantization_config"):
        return torch.bfloat16
    dtype = DTYPES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"), torch.bfloat16)
    if device.type == "cpu" and dtype != torch.float32 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.float32
    return dtype


def load_config(model_dir: str) -> HFConfig:
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"{model_dir}: model directory not found")
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found (a checkpoint directory needs config.json)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise CheckpointError(f"{path}: no model_type field")
    return HFConfig(raw)


def _eos_ids(model_dir: str, cfg: HFConfig) -> tuple[int, ...]:
    ids: list[int] = []
    sources = [cfg.text().raw]             # a vision-language config keeps them in text_config
    gen = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen):
        try:
            with open(gen) as f:
                sources.insert(0, json.load(f))
        except (OSError, ValueError):
            log.warning("%s: unreadable, ignoring it", gen)
    for src in sources:
        eos = src.get("eos_token_id")
        for e in (eos if isinstance(eos, list) else [eos]):
            if isinstance(e, int) and e not in ids:
                ids.append(e)
    return tuple(ids)


def expert_sources(index: dict[str, TensorRef], layout: ExpertLayout) -> list[ExpertSource]:
    """Locate every routed expert, per-expert keys or stacked [E, ...] tensors alike."""
    out: list[ExpertSource] = []
    for mi, li in enumerate(layout.moe_layers):
        p = layout.prefix(li)
        stacked = next((f"{p}.gate_up_proj{s}" for s in ("", ".weight") if f"{p}.gate_up_proj{s}" in index), None)
        for e in range(layout.num_experts):
            if stacked is not None:
                gu = index[stacked]
                down_name = stacked.replace("gate_up_proj", "down_proj")
                if down_name not in index:
                    raise CheckpointError(f"{gu.path}: missing tensor {down_name}")
                if len(gu.shape) != 3 or gu.shape[0] != layout.num_experts:
                    raise CheckpointError(f"{gu.path}: tensor {stacked} has shape {list(gu.shape)}, "
                                          f"expected [{layout.num_experts}, 2*intermediate, hidden]")
                inter = gu.shape[1] // 2
                gate, up = slice_leading(gu, e, (0, inter)), slice_leading(gu, e, (inter, 2 * inter))
                down = slice_leading(index[down_name], e)
            else:
                refs = []
                for n in layout.names:
                    key = f"{p}.{e}.{n}.weight"
                    if key not in index:
                        raise CheckpointError(f"checkpoint is missing tensor {key} (expert {e} of layer {li})")
                    refs.append(index[key])
                gate, up, down = refs
            src = ExpertSource(mi, e, gate, up, down)
            inter, hidden = gate.shape
            if up.shape != (inter, hidden) or down.shape != (hidden, inter):
                raise CheckpointError(f"{down.path}: expert {e} of layer {li} has mismatched shapes "
                                      f"gate {list(gate.shape)}, up {list(up.shape)}, down {list(down.shape)}")
            out.append(src)
    return out


def quantization(model_dir: str, cfg: HFConfig) -> Optional[ExpertFormat]:
    """The expert format a quantized checkpoint's ``quantization_config`` names (None: not
    quantized); anything moeserve did not write is a clear error naming config.json."""
    qc = cfg.get("quantization_config")
    if not qc:
        return None
    where = os.path.join(model_dir, "config.json")
    method = quant_method(cfg.raw)
    if method in CONVERTED_METHODS:
        raise CheckpointError(f"{where}: {CONVERTED_METHODS[method]} is served converted, not as it "
                              f"is: moeserve serve converts it once on first use (int8 experts, or "
                              f"--quantize int4), or run moeserve quantize")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise CheckpointError(f"{where}: unsupported quantization_config (quant_method {method!r}); "
                              f"moeserve loads unquantized checkpoints and its own "
                              f"quant_method {QUANT_METHOD!r} (moeserve quantize)")
    if qc.get("version") != QUANT_VERSION:
        raise CheckpointError(f"{where}: quantization_config version {qc.get('version')!r} is not "
                              f"{QUANT_VERSION}; re-run moeserve quantize")
    try:
        inter, hidden = (int(v) for v in qc["expert_shape"])
        return format_from_config(qc, inter, hidden, torch.bfloat16)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid quantization_config {qc!r} ({e})") from None


def _store_experts(model_dir: str, fmt: ExpertFormat, layout: ExpertLayout,
                   cfg: HFConfig) -> list[ExpertSource]:
    qc = cfg.get("quantization_config")
    path = os.path.join(model_dir, str(qc.get("expert_store") or STORE_FILE))
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: expert store not found (named by config.json's "
                              "quantization_config)")
    return locate_experts(path, fmt, len(layout.moe_layers), layout.num_experts)


def is_expert_tensor(name: str, layout: Optional[ExpertLayout]) -> bool:
    if layout is None or name.endswith(layout.dense_suffixes):
        return False
    return any(name.startswith(layout.prefix(li) + ".") for li in layout.moe_layers)


STACKED_SUFFIXES = (".gate_up_proj", ".gate_up_proj_blocks")


def needs_conversion(index: dict[str, TensorRef], layout: Optional[ExpertLayout]) -> bool:
    """Whether the checkpoint stacks its experts in a layout the family serves converted
    (gpt-oss: [E, H, 2I] with gate and up interleaved, or MXFP4 blocks)."""
    if layout is None or not layout.converted:
        return False
    p = layout.prefix(layout.moe_layers[0])
    return any(p + s in index for s in STACKED_SUFFIXES)


# int4 dense layers use the smallest groups: on the default model groups of 64 cost 6% perplexity
# and groups of 32 nothing, at about the same speed (dense layers are a small share of the bytes)
DENSE_INT4_GROUP = 32


def load_model(model_dir: str, device: torch.device, dtype: Optional[torch.dtype] = None,
               context_length: Optional[int] = None,
               progress: Optional[Callable[[int, int], None]] = None,
               dense_quantize: str = "off") -> LoadedModel:
    """Read config + safetensors of ``model_dir``; dense weights onto ``device`` in ``dtype``
    (``dense_quantize`` 'int4': the dense linear layers but the routers and the LM head in int4,
    groups of DENSE_INT4_GROUP)."""
    cfg = load_config(model_dir)
    family(cfg.raw["model_type"])            # an unsupported model_type: refused first
    dtype = dtype or resolve_dtype("auto", cfg, device)
    max_pos = int(cfg.text().get("max_position_embeddings") or DEFAULT_CONTEXT_CAP)
    context = context_length or min(max_pos, DEFAULT_CONTEXT_CAP)
    index = read_checkpoint_index(model_dir)
    fmt = quantization(model_dir, cfg)        # refuses what it cannot load before reading weights
    model = skeleton(cfg, context)
    if needs_conversion(index, model.layout):
        raise CheckpointError(f"{model_dir}: {cfg.raw['model_type']} checkpoints stack their experts "
                              f"in their own layout and are served converted: moeserve serve converts "
                              f"one once on first use (--quantize int8|int4, or none: bf16), or run "
                              f"moeserve quantize")
    model = model.to_empty(device=device).to(dtype)
    model.rotary.materialize(device)
    params = dict(model.named_parameters())
    names = {name: model.checkpoint_name(name) for name in params}      # -> checkpoint names
    total = sum(index[n].nbytes for n in names.values() if n in index)
    done = 0
    for name, param in params.items():
        ref = index.get(names[name])
        if ref is None:
            if name == "lm_head.weight" and (model.tie_embeddings or "lm_head.weight" not in index):
                param.data = params["model.embed_tokens.weight"].data
                continue
            raise CheckpointError(f"{model_dir}: checkpoint is missing tensor {names[name]} "
                                  f"(model_type {cfg.raw['model_type']})")
        if tuple(ref.shape) != tuple(param.shape):
            raise CheckpointError(f"{ref.path}: tensor {names[name]} has shape {list(ref.shape)}, "
                                  f"the config implies {list(param.shape)}")
        with torch.no_grad():
            # in the parameter's own dtype: a family may keep some in fp32 (DeepSeek routers)
            param.copy_(read_tensor(ref).to(param.dtype))
        done += ref.nbytes
        if progress is not None:
            progress(done, total)
    if model.layout is None:
        experts = []
    elif fmt is not None:
        if fmt.kind == "int4" and fmt.layout != device.type:
            raise CheckpointError(f"{model_dir}: int4 experts packed for {fmt.layout}, the device "
                                  f"is {device.type}; serve through moeserve (it converts the "
                                  f"store for the device once) or re-run moeserve quantize there")
        experts = _store_experts(model_dir, fmt, model.layout, cfg)
    else:
        experts = expert_sources(index, model.layout)
    skipped = [n for n in index if n.startswith(model.skipped_prefixes)]
    if skipped:
        log.info("%s: %d tensors under %s are not used for decoding; skipped", model_dir, len(skipped),
                 ", ".join(p.rstrip(".") for p in model.skipped_prefixes
                           if any(n.startswith(p) for n in skipped)))
    used = set(names.values())
    unused = [n for n in index if n not in used and not is_expert_tensor(n, model.layout)
              and not n.endswith(IGNORED_SUFFIXES) and not n.startswith(model.skipped_prefixes)]
    if unused:
        log.warning("%s: %d checkpoint tensors unused, e.g. %s", model_dir, len(unused), unused[:3])
    layout = model.layout
    info = ModelInfo(name=model_name(model_dir), path=os.path.abspath(model_dir),
                     model_type=cfg.raw["model_type"], context_length=context,
                     vocab_size=model.vocab_size, eos_token_ids=_eos_ids(model_dir, cfg),
                     num_moe_layers=len(layout.moe_layers) if layout else 0,
                     num_experts=layout.num_experts if layout else 0,
                     top_k=layout.top_k if layout else 0)
    model.eval()
    if dense_quantize == "int4":
        t0 = time.perf_counter()
        # the LM head stays, as llama.cpp's Q4_K_M keeps its output at 6 bits: in int4 it cost the
        # default model 5% perplexity, the rest nothing (README, Quantized experts)
        keep = [model.lm_head.weight, *(model.routers() if model.layout else ()), *model.gate_weights()]
        n = quantize_linears(model, keep, DENSE_INT4_GROUP)
        log.info("%d dense linear layers quantized to int4 in %.1f s", n, time.perf_counter() - t0)
    if packs(device, dtype):
        log.info("%d dense linear layers prepacked for oneDNN (bf16 on CPU)",
                 pack_linears(model, keep_plain=model.routers() if model.layout else ()))
    return LoadedModel(model, info, experts, device, dtype)
