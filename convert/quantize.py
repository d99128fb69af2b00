"""Quantize a checkpoint's routed experts into the aligned expert store (``moeserve quantize``).

Output directory: config.json (+ ``quantization_config``: method, format, bits, group size,
pack layout, which modules), ``model.safetensors`` (every dense tensor, unchanged),
``experts.safetensors`` (cache/expert_store.py) and the tokenizer / chat template files.
``ensure_quantized`` converts on first use into $MOESERVE_HOME, atomically and under a lock
(convert/model_store.py), and reuses the result afterwards.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol, Union

import torch
from safetensors.torch import save_file
from convert.progress import progress as tqdm  # a bar on a terminal, log lines otherwise

from cache.expert_store import STORE_FILE, write_store
from cache.provider import ExpertSource, TensorRef, read_tensor
from cache.quant import ExpertFormat, default_group_size, fill_slot, repack_slot
from cache.safetensors_file import CheckpointError, read_checkpoint_index
from configs.models import storage_name
from convert.fp8 import Fp8Reader, block_size
from convert.gpt_oss import GptOssExperts
from convert.gguf_import import write_json
from convert.model_store import BuildError, build_atomically, moeserve_home
from engine.loader import (CONVERTED_METHODS, MXFP4_METHOD, QUANT_METHOD, QUANT_VERSION, is_expert_tensor,
                           load_config, needs_conversion, quant_method, quantization)
from engine.models import skeleton
from engine.models.base import ExpertLayout, HFConfig

log = logging.getLogger(__name__)
DENSE_INDEX = "model.safetensors.index.json"
SKIP_FILES = (DENSE_INDEX, "config.json", "moeserve-build.json")
DENSE_SHARD_BYTES = 2 << 30
BITS = {"int8": 8, "int4": 4}
MXFP4_GROUP = 32
RATIOS = {"bf16": {"int8": 0.5, "int4": 0.33}, "stacked": {"none": 1.05, "int8": 0.5, "int4": 0.33},
          "fp8": {"int8": 1.1, "int4": 0.65}, "mxfp4": {"none": 3.3, "int8": 1.8, "int4": 1.1}}


class CheckpointExperts:
    """A checkpoint's routed experts by position in ``keys`` ((MoE layer, expert)), each read as
    gate [I, H], up [I, H], down [H, I] through ``read`` (FP8 weights dequantized)."""

    def __init__(self, sources: list[ExpertSource], read: Callable[[TensorRef], torch.Tensor]) -> None:
        self.sources, self._read = sources, read
        self.keys = [(s.layer, s.expert) for s in sources]
        self.inter, self.hidden = sources[0].inter_hidden

    def read(self, i: int) -> dict[str, torch.Tensor]:
        s = self.sources[i]
        return {"gate": self._read(s.gate), "up": self._read(s.up), "down": self._read(s.down)}


Experts = Union[CheckpointExperts, GptOssExperts]


def _layout(model_dir: str) -> tuple[ExpertLayout, dict[str, TensorRef], tuple[str, ...]]:
    """The model's expert layout, the checkpoint's tensors, and the tensor name prefixes the
    family skips (multi-token-prediction layers: not copied)."""
    cfg = load_config(model_dir)
    model = skeleton(cfg, 16)
    if model.layout is None:
        raise BuildError(f"{model_dir}: a dense model ({cfg.raw['model_type']}) has no routed "
                         "experts to quantize")
    return model.layout, read_checkpoint_index(model_dir), model.skipped_prefixes


def _expert_shape(model_dir: str) -> tuple[int, int]:
    """(inter, hidden) of the checkpoint's experts."""
    layout, index, _ = _layout(model_dir)
    experts = _experts(index, layout)
    return experts.inter, experts.hidden


def _experts(index: dict[str, TensorRef], layout: ExpertLayout,
             read: Callable[[TensorRef], torch.Tensor] = read_tensor) -> Experts:
    from engine.loader import expert_sources
    if needs_conversion(index, layout):
        return GptOssExperts(index, layout)
    return CheckpointExperts(expert_sources(index, layout), read)


def resolve_format(kind: str, inter: int, hidden: int, group_size: Optional[int],
                   layout: str = "cpu") -> ExpertFormat:
    if kind not in BITS:
        raise BuildError(f"invalid quantize={kind!r}: choose int8 or int4")
    if kind == "int8":
        return ExpertFormat("int8", inter, hidden)
    g = group_size or min(default_group_size(hidden), default_group_size(inter))
    try:
        return ExpertFormat("int4", inter, hidden, group_size=g, layout=layout)
    except ValueError as e:
        raise BuildError(str(e)) from None


def quantize_checkpoint(model_dir: str, out_dir: str, kind: str, group_size: Optional[int] = None,
                        layout: str = "cpu", progress: bool = True) -> ExpertFormat:
    """Write the quantized checkpoint of ``model_dir`` into the existing, empty ``out_dir``."""
    cfg = load_config(model_dir)
    block = block_size(cfg.raw, os.path.join(model_dir, "config.json"))
    src_fmt = None if block or _is_mxfp4(cfg.raw) else quantization(model_dir, cfg)
    if src_fmt is not None:
        return _repack_checkpoint(model_dir, out_dir, src_fmt, layout, progress)
    layout_info, index, skipped = _layout(model_dir)
    fp8 = Fp8Reader(index, block) if block else None
    read = fp8.read if fp8 else read_tensor
    experts = _experts(index, layout_info, read)
    if kind == "int4" and not group_size and _is_mxfp4(cfg.raw):
        group_size = MXFP4_GROUP
    fmt = resolve_format(kind, experts.inter, experts.hidden, group_size, layout)
    write_tensors(out_dir, ((n, lambda ref=ref: read(ref)) for n, ref in index.items()
                             if not is_expert_tensor(n, layout_info) and not (fp8 and fp8.is_scale(n))
                             and not n.startswith(skipped)))
    write_experts(out_dir, fmt, experts, progress)
    _write_config(model_dir, out_dir, _unquantized_config(cfg.raw), fmt,
                  (len(layout_info.moe_layers), layout_info.num_experts))
    return fmt


class ExpertReader(Protocol):
    keys: list[tuple[int, int]]          # (MoE layer, expert), in store order
    def read(self, i: int) -> dict[str, torch.Tensor]: ...


class NamedExperts(Protocol):
    """Experts written as per-expert tensors: read in a dtype, and named."""
    keys: list[tuple[int, int]]
    def read(self, i: int, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]: ...
    def expert_names(self, i: int) -> dict[str, str]: ...


def write_experts(out_dir: str, fmt: ExpertFormat, experts: ExpertReader, progress: bool) -> None:
    """Quantize every expert of ``experts``, one at a time, into ``out_dir``'s expert store."""
    bar = tqdm(total=len(experts.keys), unit="expert", desc=f"quantizing experts to {fmt.describe()}",
               disable=not progress)

    def slots() -> Iterator[torch.Tensor]:
        buf = torch.empty(fmt.slot_bytes, dtype=torch.uint8)
        for i in range(len(experts.keys)):
            fill_slot(fmt, buf, experts.read(i))
            bar.update(1)
            yield buf
    try:
        write_store(os.path.join(out_dir, STORE_FILE), fmt, experts.keys, slots(),
                    {"format": "moeserve-expert-store", "quantize": fmt.kind})
    finally:
        bar.close()


def _is_mxfp4(raw: dict[str, Any]) -> bool:
    return quant_method(raw) == MXFP4_METHOD


def _unquantized_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The config of an FP8 or MXFP4 source as that of its bf16 dequantization."""
    if not source_quantized(raw):
        return raw
    return {**{k: v for k, v in raw.items() if k != "quantization_config"}, "torch_dtype": "bfloat16"}


def unstack_checkpoint(model_dir: str, out_dir: str, progress: bool = True) -> None:
    """A gpt-oss checkpoint with its experts as per-expert tensors (MXFP4 dequantized to bf16,
    otherwise in the checkpoint's dtype), loadable as it is; the dense tensors unchanged."""
    cfg = load_config(model_dir)
    layout_info, index, skipped = _layout(model_dir)
    experts = _experts(index, layout_info)
    dense = [(n, lambda ref=ref: read_tensor(ref)) for n, ref in index.items()
             if not is_expert_tensor(n, layout_info) and not n.startswith(skipped)]
    write_per_expert(out_dir, dense, experts, progress)
    write_json(os.path.join(out_dir, "config.json"), _unquantized_config(cfg.raw))
    _copy_side_files(model_dir, out_dir)


def write_per_expert(out_dir: str, dense: Iterable[tuple[str, Callable[[], torch.Tensor]]],
                     experts: NamedExperts, progress: bool, dtype: Optional[torch.dtype] = None) -> None:
    """The dense tensors, then every expert as per-expert tensors (``experts.expert_names``),
    read one expert at a time (in ``dtype``, or as read)."""
    bar = tqdm(total=len(experts.keys), unit="expert", desc="writing experts one by one",
               disable=not progress)

    def expert_tensors() -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
        for i in range(len(experts.keys)):
            weights = experts.read(i, dtype)
            bar.update(1)
            for proj, name in experts.expert_names(i).items():
                yield name, lambda w=weights[proj]: w
    try:
        write_tensors(out_dir, itertools.chain(dense, expert_tensors()))   # lazily: one shard in memory
    finally:
        bar.close()


def write_tensors(out_dir: str, items: Iterable[tuple[str, Callable[[], torch.Tensor]]]) -> None:
    """Tensors (name, read) as model.safetensors, or, when they are larger than DENSE_SHARD_BYTES
    (a DeepSeek-V3's dense weights are ~34 GB in bf16), in shards of at most that with an index,
    one shard in memory at a time."""
    shard: dict[str, torch.Tensor] = {}
    files: list[list[str]] = []      # the tensor names of each shard written
    size = 0

    def flush() -> None:
        save_file(shard, os.path.join(out_dir, f"dense-{len(files) + 1}.tmp"), metadata={"format": "pt"})
        files.append(list(shard))
        shard.clear()
    for name, read in items:
        t = read()
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > DENSE_SHARD_BYTES:
            flush()
            size = 0
        shard[name] = t
        size += nbytes
    if not files:
        save_file(shard, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    flush()
    weight_map = {}
    for i, names in enumerate(files, 1):
        file = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        os.replace(os.path.join(out_dir, f"dense-{i}.tmp"), os.path.join(out_dir, file))
        weight_map.update(dict.fromkeys(names, file))
    write_json(os.path.join(out_dir, DENSE_INDEX), {"metadata": {}, "weight_map": weight_map})


def _repack_checkpoint(model_dir: str, out_dir: str, src: ExpertFormat, layout: str,
                       progress: bool) -> ExpertFormat:
    """An int4 store in the cpu pack layout -> the same experts in ``layout`` (once per device)."""
    from cache.expert_store import locate_experts
    cfg = load_config(model_dir)
    qc = cfg.raw["quantization_config"]
    dst = ExpertFormat("int4", src.inter, src.hidden, group_size=src.group_size, layout=layout)
    n_layers, n_exp = int(qc["num_moe_layers"]), int(qc["num_experts"])
    sources = locate_experts(os.path.join(model_dir, qc.get("expert_store") or STORE_FILE), src,
                             n_layers, n_exp)
    store = qc.get("expert_store") or STORE_FILE
    for name in os.listdir(model_dir):       # the dense weights: model.safetensors, or shards + index
        if (name.endswith(".safetensors") and name != store) or name == DENSE_INDEX:
            shutil.copy2(os.path.join(model_dir, name), os.path.join(out_dir, name))
    bar = tqdm(total=len(sources), unit="expert", desc=f"repacking int4 experts for {layout}",
               disable=not progress)

    def slots() -> Iterator[torch.Tensor]:
        out = torch.empty(dst.slot_bytes, dtype=torch.uint8)
        for s in sources:
            repack_slot(src, dst, read_tensor(s.packed), out)
            bar.update(1)
            yield out
    try:
        write_store(os.path.join(out_dir, STORE_FILE), dst, [(s.layer, s.expert) for s in sources],
                    slots(), {"format": "moeserve-expert-store", "quantize": "int4"})
    finally:
        bar.close()
    raw = {k: v for k, v in cfg.raw.items() if k != "quantization_config"}
    _write_config(model_dir, out_dir, raw, dst, (n_layers, n_exp))
    return dst


def _write_config(model_dir: str, out_dir: str, raw: dict, fmt: ExpertFormat,
                  counts: tuple[int, int]) -> None:
    """config.json with ``quantization_config`` (counts: MoE layers, experts per layer), and
    every non-weight file of ``model_dir`` (tokenizer, chat template, card)."""
    write_json(os.path.join(out_dir, "config.json"), {**raw, "quantization_config": quant_config(fmt, counts)})
    _copy_side_files(model_dir, out_dir)


def quant_config(fmt: ExpertFormat, counts: tuple[int, int]) -> dict[str, Any]:
    """config.json's ``quantization_config`` of an expert store (counts: MoE layers, experts)."""
    return {"quant_method": QUANT_METHOD, "version": QUANT_VERSION, "format": fmt.kind,
            "bits": BITS[fmt.kind], "group_size": fmt.group_size or None,
            "layout": fmt.layout if fmt.kind == "int4" else None,
            "symmetric": fmt.kind == "int8", "modules": ["routed_experts"],
            "expert_shape": [fmt.inter, fmt.hidden], "expert_store": STORE_FILE,
            "num_moe_layers": counts[0], "num_experts": counts[1]}


def _copy_side_files(model_dir: str, out_dir: str) -> None:
    """Every non-weight file of ``model_dir`` (tokenizer, chat template, card)."""
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path) and not name.endswith(".safetensors") and name not in SKIP_FILES:
            shutil.copy2(path, os.path.join(out_dir, name))    # tokenizer, chat template, card


def source_quantized(raw: dict[str, Any]) -> bool:
    """Whether a config names FP8 or MXFP4 weights (served dequantized and re-quantized)."""
    return quant_method(raw) in CONVERTED_METHODS


def source_conversion(model_dir: str, raw: dict[str, Any]) -> Optional[str]:
    """How a checkpoint that is never loaded as it is must be converted: "fp8" (block-scaled
    FP8), "mxfp4" (gpt-oss as OpenAI ships it), "stacked" (gpt-oss unquantized, experts stacked
    in its own layout); None for every other checkpoint."""
    if block_size(raw, os.path.join(model_dir, "config.json")) is not None:
        return "fp8"
    if _is_mxfp4(raw):
        return "mxfp4"
    try:
        layout = skeleton(HFConfig(raw), 16).layout
    except Exception:                 # noqa: BLE001 - any malformed config: the loader says what is wrong
        return None
    if layout is not None and layout.converted and needs_conversion(read_checkpoint_index(model_dir), layout):
        return "stacked"
    return None


def _source_id(model_dir: str) -> dict[str, Any]:
    """What identifies the source checkpoint: its path and every weight file's size and mtime."""
    files = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors") or n == "config.json")
    sig = hashlib.sha256(json.dumps([(n, os.path.getsize(os.path.join(model_dir, n)),
                                      int(os.path.getmtime(os.path.join(model_dir, n))))
                                     for n in files]).encode()).hexdigest()[:16]
    return {"source": os.path.abspath(model_dir), "source_signature": sig}


def ensure_quantized(model_dir: str, kind: str, group_size: Optional[int] = None,
                     layout: str = "cpu", home: Optional[str] = None, progress: bool = True) -> str:
    """``model_dir`` in format ``kind`` (and int4 pack ``layout``): itself if it already is,
    else converted once into $MOESERVE_HOME/models and reused. A checkpoint quantized
    differently is an error, never converted twice or silently mixed."""
    cfg = load_config(model_dir)
    conv = source_conversion(model_dir, cfg.raw)
    have = None if conv else quantization(model_dir, cfg)
    if have is not None:
        if kind == "none" or have.kind != kind or (group_size and group_size != have.group_size):
            want = kind + (f" group {group_size}" if group_size else "")
            raise BuildError(f"{model_dir} is already quantized ({have.describe()}); it cannot be "
                             f"served as {want}: quantize the unquantized checkpoint instead")
        if have.kind != "int4" or have.layout == layout:
            return model_dir
    if kind == "none":
        if conv == "fp8":
            raise BuildError(f"{model_dir} is an FP8 checkpoint: moeserve serves it converted "
                             f"(--quantize int8 or int4)")
        if conv is None:
            return model_dir
    if kind == "int4" and not group_size:     # resolved now: implicit and explicit share a build
        # MXFP4's scales cover 32 weights: int4 groups of 32 line up with them (re-quantization
        # error about 3/4 of groups of 64's on MXFP4-like weights)
        group_size = have.group_size if have else MXFP4_GROUP if conv == "mxfp4" else resolve_format(
            kind, *_expert_shape(model_dir), None).group_size
    params = {"quantize": kind, "group_size": group_size,
              "layout": layout if kind == "int4" else None, "version": QUANT_VERSION,
              **_source_id(model_dir)}
    tag = "per-expert" if kind == "none" else kind + (f"-g{params['group_size']}" if params["group_size"] else "") + \
        ("-cuda" if kind == "int4" and layout == "cuda" else "")
    name = f"{storage_name(model_dir)}-{tag}"
    target = os.path.join(moeserve_home(home), "models", name)
    # bytes per source byte: int8 and int4 experts from bf16 ~1/2 and ~1/3.5; from FP8 ~1 and
    # ~0.6 (the FP8 dense weights, a few percent, double in bf16); from MXFP4 (4.25 bits) ~1.9,
    # ~1.1 and in bf16 ~3.7; an int4 repack for CUDA ~1
    ratio = 1.05 if have is not None else RATIOS[conv or "bf16"][kind]
    need = int(sum(os.path.getsize(os.path.join(model_dir, n)) for n in os.listdir(model_dir)
                   if n.endswith(".safetensors")) * ratio) + 50_000_000

    def build(tmp: str) -> None:
        log.info("%s %s to %s into %s (first use; reused afterwards)",
                 "converting" if kind == "none" else "quantizing", model_dir, tag, target)
        if kind == "none":
            unstack_checkpoint(model_dir, tmp, progress)
        else:
            quantize_checkpoint(model_dir, tmp, kind, group_size, layout, progress)
    return build_atomically(target, params, build, need_bytes=need)


def run_quantize(args: argparse.Namespace) -> int:
    """CLI body of ``moeserve quantize``: prints the quantized directory; 1 on an error."""
    t0 = time.monotonic()
    try:
        if args.group_size and args.quantize != "int4":
            raise BuildError(f"invalid group_size={args.group_size}: applies to --quantize int4 only")
        if args.out:
            cfg = load_config(args.model)
            have = None if source_conversion(args.model, cfg.raw) else quantization(args.model, cfg)
            if have is not None and (have.kind != args.quantize or have.layout == args.layout):
                raise BuildError(f"{args.model} is already quantized ({have.describe()})")
            params = {"quantize": args.quantize, "group_size": args.group_size,
                      "layout": args.layout, "version": QUANT_VERSION, **_source_id(args.model)}
            path = build_atomically(args.out, params, lambda tmp: quantize_checkpoint(
                args.model, tmp, args.quantize, args.group_size, args.layout, args.progress))
        else:
            path = ensure_quantized(args.model, args.quantize, args.group_size, args.layout,
                                    progress=args.progress)
    except (BuildError, CheckpointError, ValueError, RuntimeError) as e:
        log.error("%s", e)
        return 1
    log.info("quantized checkpoint ready in %.0fs", time.monotonic() - t0)
    print(path)
    return 0
