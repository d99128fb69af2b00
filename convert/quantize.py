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
import json
import logging
import os
import shutil
import time
from typing import Any, Callable, Iterator, Optional

import torch
from safetensors.torch import save_file
from convert.progress import progress as tqdm  # a bar on a terminal, log lines otherwise

from cache.expert_store import STORE_FILE, write_store
from cache.provider import ExpertSource, TensorRef, read_tensor
from cache.quant import ExpertFormat, default_group_size, fill_slot, repack_slot
from cache.safetensors_file import CheckpointError, read_checkpoint_index
from configs.models import storage_name
from convert.fp8 import Fp8Reader, block_size
from convert.gguf_import import write_json
from convert.model_store import BuildError, build_atomically, moeserve_home
from engine.loader import QUANT_METHOD, QUANT_VERSION, is_expert_tensor, load_config, quantization
from engine.models import family

log = logging.getLogger(__name__)
DENSE_INDEX = "model.safetensors.index.json"
SKIP_FILES = (DENSE_INDEX, "config.json", "moeserve-build.json")
DENSE_SHARD_BYTES = 2 << 30
BITS = {"int8": 8, "int4": 4}


def _layout_and_experts(model_dir: str) -> tuple[Any, dict, list[ExpertSource], tuple[str, ...]]:
    """The model's expert layout, the checkpoint's tensors, its experts, and the tensor name
    prefixes the family skips (GLM's multi-token-prediction layer: not copied)."""
    from engine.loader import expert_sources
    cfg = load_config(model_dir)
    with torch.device("meta"):
        model = family(cfg.raw["model_type"]).build(cfg, 16)
    if model.layout is None:
        raise BuildError(f"{model_dir}: a dense model ({cfg.raw['model_type']}) has no routed "
                         "experts to quantize")
    index = read_checkpoint_index(model_dir)
    return model.layout, index, expert_sources(index, model.layout), model.skipped_prefixes


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
    src_fmt = None if block else quantization(model_dir, cfg)
    if src_fmt is not None:
        return _repack_checkpoint(model_dir, out_dir, src_fmt, layout, progress)
    layout_info, index, sources, skipped = _layout_and_experts(model_dir)
    inter, hidden = sources[0].inter_hidden
    fmt = resolve_format(kind, inter, hidden, group_size, layout)
    fp8 = Fp8Reader(index, block) if block else None
    read = fp8.read if fp8 else read_tensor
    _write_dense(out_dir, {n: ref for n, ref in index.items() if not is_expert_tensor(n, layout_info)
                           and not (fp8 and fp8.is_scale(n)) and not n.startswith(skipped)}, read)
    keys = [(s.layer, s.expert) for s in sources]
    bar = tqdm(total=len(sources), unit="expert", desc=f"quantizing experts to {fmt.describe()}",
               disable=not progress)

    def slots() -> Iterator[torch.Tensor]:
        buf = torch.empty(fmt.slot_bytes, dtype=torch.uint8)
        for s in sources:
            fill_slot(fmt, buf, {"gate": read(s.gate), "up": read(s.up), "down": read(s.down)})
            bar.update(1)
            yield buf
    try:
        write_store(os.path.join(out_dir, STORE_FILE), fmt, keys, slots(),
                    {"format": "moeserve-expert-store", "quantize": fmt.kind})
    finally:
        bar.close()
    raw = cfg.raw if not block else {**{k: v for k, v in cfg.raw.items() if k != "quantization_config"},
                                     "torch_dtype": "bfloat16"}     # the FP8 weights are bf16 now
    _write_config(model_dir, out_dir, raw, fmt, (len(layout_info.moe_layers), layout_info.num_experts))
    return fmt


def _write_dense(out_dir: str, refs: dict[str, TensorRef],
                 read: Callable[[TensorRef], torch.Tensor]) -> None:
    """The dense tensors as model.safetensors, or, when they are larger than DENSE_SHARD_BYTES
    (a DeepSeek-V3's are ~34 GB in bf16), in shards of at most that with an index, one shard in
    memory at a time."""
    shard: dict[str, torch.Tensor] = {}
    files: list[list[str]] = []      # the tensor names of each shard written
    size = 0

    def flush() -> None:
        save_file(shard, os.path.join(out_dir, f"dense-{len(files) + 1}.tmp"), metadata={"format": "pt"})
        files.append(list(shard))
        shard.clear()
    for name, ref in refs.items():
        t = read(ref)
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
    qc = {"quant_method": QUANT_METHOD, "version": QUANT_VERSION, "format": fmt.kind,
          "bits": BITS[fmt.kind], "group_size": fmt.group_size or None,
          "layout": fmt.layout if fmt.kind == "int4" else None,
          "symmetric": fmt.kind == "int8", "modules": ["routed_experts"],
          "expert_shape": [fmt.inter, fmt.hidden], "expert_store": STORE_FILE,
          "num_moe_layers": counts[0], "num_experts": counts[1]}
    write_json(os.path.join(out_dir, "config.json"), {**raw, "quantization_config": qc})
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path) and not name.endswith(".safetensors") and name not in SKIP_FILES:
            shutil.copy2(path, os.path.join(out_dir, name))    # tokenizer, chat template, card


def source_is_fp8(model_dir: str, raw: dict[str, Any]) -> bool:
    """Whether ``model_dir`` is an FP8 block-scaled checkpoint (converted, never loaded as is)."""
    return block_size(raw, os.path.join(model_dir, "config.json")) is not None


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
    fp8 = source_is_fp8(model_dir, cfg.raw)
    have = None if fp8 else quantization(model_dir, cfg)
    if have is not None:
        if kind == "none" or have.kind != kind or (group_size and group_size != have.group_size):
            want = kind + (f" group {group_size}" if group_size else "")
            raise BuildError(f"{model_dir} is already quantized ({have.describe()}); it cannot be "
                             f"served as {want}: quantize the unquantized checkpoint instead")
        if have.kind != "int4" or have.layout == layout:
            return model_dir
    if kind == "none":
        if fp8:
            raise BuildError(f"{model_dir} is an FP8 checkpoint: moeserve serves it converted "
                             f"(--quantize int8 or int4)")
        return model_dir
    if kind == "int4" and not group_size:     # resolved now: implicit and explicit share a build
        group_size = have.group_size if have else resolve_format(
            kind, *_layout_and_experts(model_dir)[2][0].inter_hidden, None).group_size
    params = {"quantize": kind, "group_size": group_size,
              "layout": layout if kind == "int4" else None, "version": QUANT_VERSION,
              **_source_id(model_dir)}
    tag = kind + (f"-g{params['group_size']}" if params["group_size"] else "") + \
        ("-cuda" if kind == "int4" and layout == "cuda" else "")
    name = f"{storage_name(model_dir)}-{tag}"
    target = os.path.join(moeserve_home(home), "models", name)
    # bytes per source byte: int8 and int4 experts from bf16 ~1/2 and ~1/3.5; from FP8 ~1 and ~0.6
    # (the FP8 dense weights, a few percent, double in bf16); an int4 repack for CUDA ~1
    ratio = 1.05 if have is not None else \
        {False: {"int8": 0.5, "int4": 0.33}, True: {"int8": 1.1, "int4": 0.65}}[fp8][kind]   # repack: ~1
    need = int(sum(os.path.getsize(os.path.join(model_dir, n)) for n in os.listdir(model_dir)
                   if n.endswith(".safetensors")) * ratio) + 50_000_000

    def build(tmp: str) -> None:
        log.info("quantizing %s to %s into %s (first use; reused afterwards)", model_dir, tag, target)
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
            have = None if source_is_fp8(args.model, cfg.raw) else quantization(args.model, cfg)
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
