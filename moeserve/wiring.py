"""Composition root of the engine side: model + expert cache + engine, from the configs.

This is the one place that chooses a concrete ExpertProvider for the engine.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from convert.progress import progress as tqdm  # a bar on a terminal, log lines otherwise

from cache.eam import EAMCollection
from cache.offload import OffloadedExpertProvider
from cache.policies import make_policy
from cache.provider import ExpertProvider, ResidentExpertProvider, expert_format
from cache.store import CollectionStore
from cache.trace import ActivationTracer
from configs import CacheConfig, EngineConfig
from engine.engine import Engine
from engine.kernels import expert_forward
from engine.loader import (DTYPES, LoadedModel, load_config, load_model, quantization, resolve_device,
                           resolve_dtype)
from moeserve.model_ref import resolve_model
from moeserve.trace_files import check_trace_store, open_tracer

log = logging.getLogger("moeserve")


def resolve_model_dir(ecfg: EngineConfig) -> str:
    """--model, or the built-in default model (built on first use)."""
    if ecfg.model:
        return resolve_model(ecfg.model, ecfg.quantize, ecfg.group_size)
    from convert.default_model import ensure_default_model
    return ensure_default_model(ecfg.default_preset)


def resolve_quantized_dir(model_dir: str, ecfg: EngineConfig, device: torch.device,
                          progress: bool = True) -> str:
    """The directory to load: ``model_dir``, or its --quantize conversion (made on first use),
    or an int4 store re-packed once for this device's kernel."""
    cfg = load_config(model_dir)
    from convert.quantize import ensure_quantized, source_conversion
    conv = source_conversion(model_dir, cfg.raw)
    if conv in ("fp8", "mxfp4"):
        kind = ecfg.quantize or "int8"     # FP8 and MXFP4 experts keep about their quality in int8
        log.info("%s: an %s checkpoint: served with %s experts and bf16 dense weights, converted "
                 "once%s", model_dir, conv.upper(), kind,
                 "" if ecfg.quantize else " (--quantize int4 for half the bytes)")
        return ensure_quantized(model_dir, kind, ecfg.group_size, device.type, progress=progress)
    if conv == "stacked":
        kind = ecfg.quantize or "none"
        log.info("%s: experts stacked in the %s layout: served converted once (%s)", model_dir,
                 cfg.raw["model_type"], "per-expert, unquantized" if kind == "none" else kind)
        return ensure_quantized(model_dir, kind, ecfg.group_size, device.type, progress=progress)
    fmt = quantization(model_dir, cfg)
    kind = ecfg.quantize
    needs_repack = fmt is not None and fmt.kind == "int4" and fmt.layout != device.type
    if kind is None and not needs_repack:
        return model_dir
    return ensure_quantized(model_dir, kind or fmt.kind, ecfg.group_size, device.type,
                            progress=progress)


def load(ecfg: EngineConfig, progress: bool = True) -> LoadedModel:
    if ecfg.threads:
        torch.set_num_threads(ecfg.threads)
    device = resolve_device(ecfg.device)
    model_dir = resolve_quantized_dir(resolve_model_dir(ecfg), ecfg, device, progress)
    dtype = resolve_dtype(ecfg.dtype, load_config(model_dir), device)
    bar: Optional[Any] = None

    def on_progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading dense weights",
                       disable=not progress)
        bar.update(done - bar.n)

    log.info("loading %s on %s in %s", model_dir, device, dtype)
    loaded = load_model(model_dir, device, dtype, ecfg.context_length, on_progress,
                        dense_quantize=ecfg.dense_quantize)
    if bar is not None:
        bar.close()
    return loaded


def expert_bytes(loaded: LoadedModel) -> int:
    """Bytes of all routed experts in their slot format (the compute dtype when unquantized)."""
    if not loaded.experts:
        return 0
    return expert_format(loaded.experts, loaded.dtype).slot_bytes * len(loaded.experts)


def make_tracer(loaded: LoadedModel, ccfg: CacheConfig) -> Optional[ActivationTracer]:
    """Per-request activation matrices: needed by --record-trace (the predicting policies keep
    their own per-request matrices)."""
    info = loaded.info
    if not ccfg.record_trace or not info.num_experts:
        return None
    one = expert_format(loaded.experts, loaded.dtype).slot_bytes if loaded.experts else None
    return open_tracer(ccfg.record_trace, info.num_moe_layers, info.num_experts, info.top_k,
                       info.name, expert_bytes=one)


def make_provider(loaded: LoadedModel, ccfg: CacheConfig, progress: bool = True) -> ExpertProvider:
    """All experts resident when --expert-budget holds them all ('all', '100%' or a size at
    least their bytes: resolved here, once); otherwise the offloading cache."""
    tracer = make_tracer(loaded, ccfg)
    total = expert_bytes(loaded)
    if not loaded.experts or ccfg.expert_budget_bytes(total) >= total:
        with tqdm(total=sum(s.nbytes for s in loaded.experts), unit="B", unit_scale=True,
                  desc="loading experts", disable=not progress or not loaded.experts) as bar:
            return ResidentExpertProvider(
                loaded.experts, loaded.device, loaded.dtype, tracer=tracer, progress=bar.update,
                routers=loaded.model.lookahead_routers() if tracer is not None else None,
                top_k=loaded.info.top_k)
    info = loaded.info
    L, E, k = info.num_moe_layers, info.num_experts, info.top_k
    collection: Optional[EAMCollection] = None
    store: Optional[CollectionStore] = None
    if ccfg.policy in ("moe-infinity", "auto"):
        if ccfg.trace_store:
            check_trace_store(ccfg.trace_store, L, E)
        collection = (EAMCollection.load(ccfg.trace_store, L, E, ccfg.collection_capacity)
                      if ccfg.trace_store else EAMCollection(L, E, ccfg.collection_capacity))
        if ccfg.trace_store:
            log.info("trace store %s: %d past activation matrices", ccfg.trace_store, len(collection))
            store = CollectionStore(collection, ccfg.trace_store)
    policy = make_policy(ccfg.policy, L, E, k, collection)
    provider = OffloadedExpertProvider(loaded.experts, loaded.device, loaded.dtype, ccfg, policy,
                                       tracer=tracer, routers=loaded.model.lookahead_routers(), store=store,
                                       cpu_compute=expert_forward)
    stats = provider.stats()
    log.info("expert cache: %d of %d experts (%s of %s, %s) in %s slots, policy %s, prefetch %s, "
             "%d I/O threads, %s disk reads", int(stats["slots"]), len(loaded.experts),
             _gib(stats["allocated_bytes"]), _gib(provider.expert_bytes * len(loaded.experts)),
             provider.fmt.describe(), loaded.device,
             ccfg.policy, "on" if provider.prefetch_on else "off", ccfg.io_threads,
             "O_DIRECT" if provider.reader.uses_direct(loaded.experts[0].path)
             else "buffered (pages dropped)")
    return provider


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def build_engine(ecfg: EngineConfig, ccfg: CacheConfig, progress: bool = True) -> Engine:
    """Picklable factory (via functools.partial) for the engine process."""
    loaded = load(ecfg, progress)
    return Engine(loaded, make_provider(loaded, ccfg, progress), ecfg.max_batch, ecfg.prefill_chunk,
                  ecfg.prefix_cache)


__all__ = ["build_engine", "load", "make_provider", "make_tracer", "expert_bytes", "resolve_model_dir", "DTYPES"]
