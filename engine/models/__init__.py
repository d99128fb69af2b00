"""Model families, one module per checkpoint model_type, each exposing build(cfg, context)."""
from __future__ import annotations

import importlib
import threading
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.models.base import DecoderLM, HFConfig

MODEL_TYPES: dict[str, str] = {
    "llama": "engine.models.llama",
    "mixtral": "engine.models.mixtral",
    "qwen2_moe": "engine.models.qwen2_moe",
    "qwen3_moe": "engine.models.qwen3_moe",
    "olmoe": "engine.models.olmoe",
    "deepseek_v2": "engine.models.deepseek_v2",
    "deepseek_v3": "engine.models.deepseek_v3",
    "glm4_moe": "engine.models.glm4_moe",
    "ernie4_5_moe": "engine.models.ernie4_5_moe",
    "gpt_oss": "engine.models.gpt_oss",
    "minimax_m2": "engine.models.minimax_m2",
    "qwen3_next": "engine.models.qwen3_next",
    "qwen3_5_moe": "engine.models.qwen3_5_moe",
    "qwen3_5_moe_text": "engine.models.qwen3_5_moe",
}


def family(model_type: str) -> ModuleType:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: "
                         f"{', '.join(sorted(MODEL_TYPES))}")
    return importlib.import_module(MODEL_TYPES[model_type])


_INIT_LOCK = threading.Lock()


def _skip(tensor: Any, *args: Any, **kwargs: Any) -> Any:
    return tensor


def skeleton(cfg: "HFConfig", context: int) -> "DecoderLM":
    """``cfg``'s model on the meta device, its weights' initialisers skipped: the checkpoint fills
    them, and on meta their reference kernels import torch._dynamo, 1.6 s at every engine start
    here. torch.nn.init is patched for the build, as transformers' no_init_weights does; builds
    take a lock, so that the original functions are always the ones restored."""
    import torch
    from torch.nn import init
    names = [n for n in vars(init) if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))]
    with _INIT_LOCK:
        saved = {n: getattr(init, n) for n in names}
        try:
            for n in names:
                setattr(init, n, _skip)
            with torch.device("meta"):
                return family(cfg.raw["model_type"]).build(cfg, context)
        finally:
            for n, f in saved.items():
                setattr(init, n, f)
