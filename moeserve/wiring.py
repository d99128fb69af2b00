"""Composition root of the engine side: model + expert cache + engine, from the configs.

This is the one place that chooses a concrete ExpertProvider for the engine.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from tqdm import tqdm

from cache.provider import ExpertProvider, ResidentExpertProvider
from configs import CacheConfig, EngineConfig
from engine.engine import Engine
from engine.loader import DTYPES, LoadedModel, load_config, load_model, resolve_device, resolve_dtype

log = logging.getLogger("moeserve")


def resolve_model_dir(ecfg: EngineConfig) -> str:
    """--model, or the built-in default model (built on first use)."""
    if ecfg.model:
        return ecfg.model
    from engine.default_model import ensure_default_model
    return ensure_default_model(ecfg.default_preset)


def load(ecfg: EngineConfig, progress: bool = True) -> LoadedModel:
    if ecfg.threads:
        torch.set_num_threads(ecfg.threads)
    model_dir = resolve_model_dir(ecfg)
    device = resolve_device(ecfg.device)
    dtype = resolve_dtype(ecfg.dtype, load_config(model_dir), device)
    bar: Optional[tqdm] = None

    def on_progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading dense weights",
                       disable=not progress)
        bar.update(done - bar.n)

    log.info("loading %s on %s in %s", model_dir, device, dtype)
    loaded = load_model(model_dir, device, dtype, ecfg.context_length, on_progress)
    if bar is not None:
        bar.close()
    return loaded


def expert_bytes(loaded: LoadedModel) -> int:
    """Bytes of all routed experts in the compute dtype."""
    size = torch.empty((), dtype=loaded.dtype).element_size()
    return sum(src.nbytes // torch.empty((), dtype=_st(src.gate.dtype)).element_size() * size
               for src in loaded.experts)


def _st(name: str) -> torch.dtype:
    from cache.provider import ST_DTYPES
    return ST_DTYPES[name]


def make_provider(loaded: LoadedModel, ccfg: CacheConfig, progress: bool = True) -> ExpertProvider:
    with tqdm(total=sum(s.nbytes for s in loaded.experts), unit="B", unit_scale=True,
              desc="loading experts", disable=not progress or not loaded.experts) as bar:
        return ResidentExpertProvider(loaded.experts, loaded.device, loaded.dtype,
                                      progress=bar.update)


def build_engine(ecfg: EngineConfig, ccfg: CacheConfig, progress: bool = True) -> Engine:
    """Picklable factory (via functools.partial) for the engine process."""
    loaded = load(ecfg, progress)
    return Engine(loaded, make_provider(loaded, ccfg, progress), ecfg.max_batch)


__all__ = ["build_engine", "load", "make_provider", "expert_bytes", "resolve_model_dir", "DTYPES"]
