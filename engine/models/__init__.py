"""Model families, one module per checkpoint model_type, each exposing build(cfg, context)."""
from __future__ import annotations

import importlib
from types import ModuleType

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
