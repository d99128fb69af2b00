"""GLM-4.5 / GLM-4.5-Air / GLM-4.6 (glm4_moe): grouped-query attention with q/k/v biases, an
optional per-head q/k RMSNorm and rope on the first ``partial_rotary_factor`` of each head;
DeepSeek-V3's router (sigmoid scores, selection on score + e_score_correction_bias within the
topk_group best of n_group groups, weights normalised and scaled) with shared experts, dense
feed-forward in the first ``first_k_dense_replace`` layers. The checkpoints' multi-token-prediction
layers (``model.layers.{num_hidden_layers + i}``) are not used for decoding and are skipped."""
from __future__ import annotations

from engine.models.base import DecoderLayer, DecoderLM, ExpertLayout, HFConfig, KVSpec
from engine.models.common import Attention, DenseMLP, Rotary, rope_parameters
from engine.models.deepseek_common import DeepseekMoe
from engine.models.deepseek_v3 import v3_routers

DEFAULT_PARTIAL_ROTARY = 0.5      # transformers' default for configs that omit it


def rotary_dim(cfg: HFConfig) -> int:
    """The rotated part of each head: head_dim x partial_rotary_factor (rope_parameters in v5
    configs, top level in v4 ones)."""
    rope = cfg.get("rope_parameters") or {}
    factor = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", DEFAULT_PARTIAL_ROTARY))
    dim = int(cfg.head_dim() * float(factor))
    if dim <= 0 or dim % 2 or dim > cfg.head_dim():
        raise ValueError(f"config.json: partial_rotary_factor={factor} gives a rotary dimension of {dim} "
                         f"for head_dim={cfg.head_dim()}; it must be even and in (0, head_dim]")
    return dim


def build(cfg: HFConfig, context: int) -> DecoderLM:
    hidden, n_layers = cfg.req("hidden_size"), cfg.req("num_hidden_layers")
    heads = cfg.req("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim, eps = cfg.head_dim(), cfg.get("rms_norm_eps", 1e-5)
    experts, top_k = cfg.req("n_routed_experts"), cfg.req("num_experts_per_tok")
    router = v3_routers(cfg, topk_group_default=1, norm_default=True)   # transformers' GLM defaults
    bias = bool(cfg.get("attention_bias", False))
    qk_eps = eps if cfg.get("use_qk_norm", False) else None
    shared_inter = cfg.req("moe_intermediate_size") * int(cfg.get("n_shared_experts", 1) or 0)
    first_dense = int(cfg.get("first_k_dense_replace", 1) or 0)
    moe_layers = tuple(range(first_dense, n_layers))
    layers = []
    for i in range(n_layers):
        attn = Attention(hidden, heads, kv_heads, head_dim, i, bias=bias, qk_norm_eps=qk_eps)
        if i in moe_layers:
            mlp = DeepseekMoe(hidden, router(), shared_inter, moe_layers.index(i))
        else:
            mlp = DenseMLP(hidden, cfg.req("intermediate_size"))
        layers.append(DecoderLayer(attn, mlp, hidden, eps))
    layout = ExpertLayout(moe_layers, experts, top_k,
                          prefix=lambda i: f"model.layers.{i}.mlp.experts") if moe_layers else None
    return DecoderLM(cfg.req("vocab_size"), hidden, layers, eps,
                     Rotary(rotary_dim(cfg), rope_parameters(cfg.raw), context), layout,
                     KVSpec(n_layers, kv_heads, head_dim, head_dim),
                     tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                     skipped_prefixes=cfg.mtp_prefixes())
