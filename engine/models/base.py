"""The decoder skeleton every family shares; a family supplies its attention and feed-forward.

Module names mirror the Hugging Face checkpoints (model.embed_tokens, model.layers.{i}.self_attn...,
model.norm, lm_head) so dense weights load by name. Routed experts are not parameters: MoE blocks
ask the injected ExpertProvider for them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from cache.provider import ExpertProvider, Router
from engine.models.common import Batch, KVCache, RMSNorm, Rotary
from engine.models.linear_state import LinearSpec


# checkpoint names of the gate-like linear layers (DecoderLM.gate_weights)
GATE_LAYERS = ("in_proj_ba", "in_proj_b", "in_proj_a", "shared_expert_gate")


@dataclass(frozen=True)
class ExpertLayout:
    """Where a family keeps its routed experts in the checkpoint.

    ``prefix(layer)`` gives e.g. 'model.layers.3.block_sparse_moe.experts'; per-expert keys are
    '{prefix}.{e}.{name}.weight' for name in ``names`` (gate, up, down); stacked checkpoints use
    '{prefix}.gate_up_proj' [E, 2I, H] and '{prefix}.down_proj' [E, H, I]."""

    moe_layers: tuple[int, ...]              # decoder layer index of each MoE layer, in order
    num_experts: int
    top_k: int
    prefix: Callable[[int], str]
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    # tensors under the prefix that are the layer's own dense parameters (gpt-oss's expert biases)
    dense_suffixes: tuple[str, ...] = ()
    # stacked expert tensors in the family's own layout are served converted (convert/gpt_oss.py)
    converted: bool = False


@dataclass(frozen=True)
class KVSpec:
    num_layers: int
    kv_heads: int
    k_dim: int
    v_dim: int
    linear: Optional[LinearSpec] = None    # hybrid models: these layers keep a state, not k/v


class MoEBlockBase(nn.Module):
    """Holds the provider reference and the MoE layer index (counting MoE layers only)."""

    def __init__(self, moe_index: int) -> None:
        super().__init__()
        self.moe_index = moe_index
        self.provider: Optional[ExpertProvider] = None

    def lookahead_router(self) -> Router:
        """The router as the cache's look-ahead applies it: ``gate`` [E, H] with its logit bias,
        softmax-scored; families that score otherwise say so."""
        return Router(self.gate.weight, getattr(self.gate, "bias", None))


class DecoderLayer(nn.Module):
    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden: int, eps: float,
                 mlp_name: str = "mlp", attn_name: str = "self_attn") -> None:
        super().__init__()
        self.attn_name, self.mlp_name = attn_name, mlp_name
        setattr(self, attn_name, self_attn)   # checkpoint name: 'self_attn' or 'linear_attn'
        setattr(self, mlp_name, mlp)   # checkpoint name: 'mlp' or 'block_sparse_moe'
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: Batch,
                kv: KVCache) -> torch.Tensor:
        x = x + getattr(self, self.attn_name)(self.input_layernorm(x), rope, batch, kv)
        return x + getattr(self, self.mlp_name)(self.post_attention_layernorm(x))


class Inner(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: list[nn.Module], eps: float) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(hidden, eps)


class DecoderLM(nn.Module):
    """embed -> layers -> norm -> lm_head, over the engine's KV cache."""

    def __init__(self, vocab: int, hidden: int, layers: list[nn.Module], eps: float,
                 rotary: Rotary, layout: Optional[ExpertLayout], kv_spec: KVSpec,
                 tie_embeddings: bool = False, skipped_prefixes: tuple[str, ...] = (),
                 head_bias: bool = False, checkpoint_prefix: str = "model.") -> None:
        super().__init__()
        self.model = Inner(vocab, hidden, layers, eps)
        self.lm_head = nn.Linear(hidden, vocab, bias=head_bias)
        self.rotary = rotary
        self.layout = layout
        self.kv_spec = kv_spec
        self.tie_embeddings = tie_embeddings
        self.vocab_size = vocab
        # checkpoint tensors the family knows and does not use (e.g. multi-token-prediction layers)
        self.skipped_prefixes = skipped_prefixes
        # where the checkpoint keeps what is model.* here (a vision-language checkpoint's text
        # model: model.language_model.*)
        self.checkpoint_prefix = checkpoint_prefix

    def checkpoint_name(self, name: str) -> str:
        """The checkpoint's name of parameter ``name``."""
        return self.checkpoint_prefix + name[len("model."):] if name.startswith("model.") else name

    def moe_blocks(self) -> list[MoEBlockBase]:
        return [m for m in self.modules() if isinstance(m, MoEBlockBase)]

    def set_provider(self, provider: ExpertProvider) -> None:
        for block in self.moe_blocks():
            block.provider = provider

    def routers(self) -> list[torch.Tensor]:
        """Router weight [E, H] of every MoE layer, in MoE-layer order."""
        return [r.weight for r in self.lookahead_routers()]

    def gate_weights(self) -> list[torch.Tensor]:
        """Small linear layers whose outputs gate or decay others (Gated DeltaNet's beta and
        decay projections, shared-expert gates): kept out of --dense-quantize int4, whose errors
        there compound along a sequence."""
        out = []
        for name, mod in self.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(mod, nn.Linear) and leaf in GATE_LAYERS:
                out.append(mod.weight)
        return out

    def lookahead_routers(self) -> list[Router]:
        """Every MoE layer's router as the cache's look-ahead applies it (with its logit bias,
        where it has one), in MoE-layer order."""
        return [block.lookahead_router() for block in sorted(self.moe_blocks(), key=lambda b: b.moe_index)]

    def forward(self, input_ids: torch.Tensor, batch: Batch, kv: KVCache,
                all_logits: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] if all_logits else [B, V] at each row's last token."""
        x = self.model.embed_tokens(input_ids)                      # [B, T, H]
        rope = self.rotary(batch.positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, rope, batch, kv)
        if not all_logits:
            x = x[:, -1]
        return self.lm_head(self.model.norm(x)).float()


@dataclass(frozen=True)
class HFConfig:
    """The raw config.json, with helpers that name the field on error."""

    raw: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    def req(self, key: str) -> Any:
        if key not in self.raw or self.raw[key] is None:
            raise ValueError(f"config.json: missing required field {key!r} for model_type "
                             f"{self.raw.get('model_type')!r}")
        return self.raw[key]

    def text(self) -> "HFConfig":
        """The text model's settings: a vision-language config's text_config over its top level
        (itself for a text-only config)."""
        text = self.raw.get("text_config")
        if not isinstance(text, dict):
            return self
        return HFConfig({**{k: v for k, v in self.raw.items() if k != "text_config"}, **text})

    def head_dim(self) -> int:
        return self.get("head_dim") or self.req("hidden_size") // self.req("num_attention_heads")

    def mtp_prefixes(self) -> tuple[str, ...]:
        """Name prefixes of the multi-token-prediction layers that DeepSeek-V3 and GLM-4.5
        checkpoints carry after their last decoder layer (not used for decoding)."""
        n = self.req("num_hidden_layers")
        mtp = int(self.get("num_nextn_predict_layers") or self.get("num_mtp_layers")
                  or self.get("num_mtp_modules") or 0)          # DeepSeek/GLM, ..., MiniMax-M2
        return tuple(f"model.layers.{n + j}." for j in range(mtp))
