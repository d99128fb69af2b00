"""Qwen3.5 MoE (qwen3_5_moe, and qwen3_5_moe_text for text-only checkpoints): Qwen3-Next's hybrid
decoder (engine/models/qwen3_next.py) with the linear layers' projections split (q|k|v, z, b and
a each their own) and routed experts in every layer. Qwen3.5 ships as a vision-language model:
the text model is read from ``text_config`` and ``model.language_model.*``; the vision tower
(``model.visual.*``) is not loaded (text in, text out). Rope: text positions are equal in all
three of its multimodal sections, where the sectioned rope is the plain one."""
from __future__ import annotations

from engine.models.base import DecoderLM, HFConfig
from engine.models.gated_deltanet import SplitGatedDeltaNet
from engine.models.qwen3_next import SKIPPED, build_hybrid

VISION = ("model.visual.",)


def build(cfg: HFConfig, context: int) -> DecoderLM:
    vision_language = isinstance(cfg.get("text_config"), dict)
    text = cfg.text()
    return build_hybrid(text, context, SplitGatedDeltaNet, tuple(range(text.req("num_hidden_layers"))),
                        norm=True, checkpoint_prefix="model.language_model." if vision_language else "model.",
                        skipped=SKIPPED + (VISION if vision_language else ()))
