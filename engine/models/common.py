"""Building blocks shared by the model families: norms, rotary embeddings, attention over the
engine's KV cache, SwiGLU experts and the routed-expert combine loop.

Batches are padded [B, T]: a prompt pass is B=1, T=prompt length; a decode step is B=running
requests, T=1. ``Batch`` carries each row's absolute positions and its KV-cache slot.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cache.provider import ExpertProvider
from engine.kernels import ExpertMath, expert_forward
from engine.models.linear_state import LinearSpec, LinearStates
from engine.models.sink_attention import AttnExtras, sink_attention


@dataclass
class Batch:
    positions: torch.Tensor   # [B, T] int64 absolute positions
    slots: torch.Tensor       # [B] int64 KV-cache slot of each sequence
    kv_len: int               # keys to attend over: max(positions) + 1
    single_slot: Optional[int] = None  # B == 1: its slot as an int (lets attention slice, not gather)
    start: Optional[int] = None        # B == 1: its first position (0: a whole prompt pass)
    seq_rows: Optional[tuple[tuple[int, int], ...]] = None  # decode, per row: (slot, keys to read)
    _mask: Optional[torch.Tensor] = field(default=None, repr=False)

    def attn_mask(self) -> tuple[Optional[torch.Tensor], bool]:
        """(mask, is_causal) for SDPA, shared by every layer of the step. One sequence needs no
        mask: a decode token sees all its keys, a whole prompt pass is plainly causal."""
        b, t = self.positions.shape
        if b == 1 and t == 1:
            return None, False
        if b == 1 and self.start == 0 and t == self.kv_len:
            return None, True
        if self._mask is None:
            self._mask = attention_mask(self)
        return self._mask, False


class KVCache:
    """Preallocated keys/values for every layer: [slots, kv_heads, context, head_dim]; a hybrid
    model's linear-attention layers keep a state in ``linear`` instead (engine/models/linear_state.py)."""

    def __init__(self, num_layers: int, slots: int, context: int, kv_heads: int, k_dim: int,
                 v_dim: int, dtype: torch.dtype, device: torch.device,
                 linear: Optional[LinearSpec] = None, saved_states: bool = False) -> None:
        skip = set(linear.layers) if linear is not None else set()
        self.k = [torch.zeros(0 if i in skip else slots, kv_heads, context, k_dim, dtype=dtype, device=device)
                  for i in range(num_layers)]
        self.v = [torch.zeros(0 if i in skip else slots, kv_heads, context, v_dim, dtype=dtype, device=device)
                  for i in range(num_layers)]
        self.linear = (LinearStates(linear, slots, dtype, device, saved_states)
                       if linear is not None else None)

    @classmethod
    def for_model(cls, spec: Any, slots: int, context: int, dtype: torch.dtype,
                  device: torch.device, saved_states: bool = False) -> "KVCache":
        """The cache a model's KVSpec asks for (engine/models/base.py); ``saved_states``: room
        for a saved copy of each slot's linear-attention state (prefix caching)."""
        return cls(spec.num_layers, slots, context, spec.kv_heads, spec.k_dim, spec.v_dim, dtype,
                   device, spec.linear, saved_states)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v) + \
            (self.linear.nbytes if self.linear is not None else 0)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, Hkv, T, D] at the batch's positions; return all keys/values [B, Hkv, L, D]
        (views of the cache for one sequence, a gathered copy for several)."""
        kc, vc = self.k[layer], self.v[layer]
        if batch.single_slot is not None:
            start = int(batch.positions[0, 0]) if batch.start is None else batch.start
            end = start + k.shape[2]
            kc[batch.single_slot, :, start:end] = k[0]
            vc[batch.single_slot, :, start:end] = v[0]
            return kc[batch.single_slot:batch.single_slot + 1, :, :batch.kv_len], \
                vc[batch.single_slot:batch.single_slot + 1, :, :batch.kv_len]
        self._scatter(layer, k, v, batch)
        return kc[batch.slots, :, :batch.kv_len], vc[batch.slots, :, :batch.kv_len]

    def _scatter(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: Batch) -> None:
        """Store k/v [B, Hkv, T, D] of several sequences at their slots and positions."""
        slots = batch.slots[:, None]                                  # [B, 1]
        self.k[layer][slots, :, batch.positions] = k.transpose(1, 2)  # index [B, T] -> [B, T, Hkv, D]
        self.v[layer][slots, :, batch.positions] = v.transpose(1, 2)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch,
               scale: Optional[float] = None, extras: Optional[AttnExtras] = None) -> torch.Tensor:
        """Store this step's k/v [B, Hkv, T, D] and attend q [B, H, T, D] -> [B, T, H*Dv].
        A decode step of several sequences attends each over its own keys in place: no gather
        of every sequence's cache per layer, no padding mask, and a row's result does not depend
        on who else is in the batch. ``extras``: sinks and/or a sliding window (sink_attention)."""
        if batch.seq_rows is None or batch.single_slot is not None:
            keys, values = self.update(layer, k, v, batch)
            if extras is not None:
                first = batch.start if batch.single_slot is not None else None
                return sink_attention(q, keys, values, batch.positions, extras, scale, first)
            return sdpa(q, keys, values, batch, scale)
        self._scatter(layer, k, v, batch)
        kc, vc = self.k[layer], self.v[layer]
        if extras is not None:         # row i decodes position n - 1 over its n keys
            return torch.cat([sink_attention(q[i:i + 1], kc[s:s + 1, :, :n], vc[s:s + 1, :, :n],
                                             batch.positions[i:i + 1], extras, scale, n - 1)
                              for i, (s, n) in enumerate(batch.seq_rows)])
        outs = [decode_attention(q[i:i + 1], kc[s:s + 1, :, :n], vc[s:s + 1, :, :n], scale)
                for i, (s, n) in enumerate(batch.seq_rows)]                  # each [1, H, 1, Dv]
        return torch.cat(outs).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def attention_mask(batch: Batch) -> torch.Tensor:
    """[B, 1, T, L] bool: query at position p sees keys 0..p (causal and within its own length)."""
    keys = torch.arange(batch.kv_len, device=batch.positions.device)
    return (keys[None, None, :] <= batch.positions[:, :, None])[:, None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """HF configs keep rope settings in `rope_parameters` (v5) or `rope_theta`/`rope_scaling` (v4)."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    params.update({k: v for k, v in scaling.items() if k not in params})
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rtype = params.get("rope_type", params.get("type", "default"))
    params["rope_type"] = rtype
    return params


def rope_inv_freq(dim: int, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the attention scaling factor for a rope configuration."""
    base = float(params["rope_theta"])
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rtype = params["rope_type"]
    if rtype == "default":
        return inv, 1.0
    if rtype == "linear":
        return inv / float(params["factor"]), 1.0
    if rtype == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old / high) & (wavelen <= old / low)
        return torch.where(is_mid, mid, scaled), 1.0
    if rtype == "yarn":
        return _yarn_inv_freq(dim, base, params)
    raise ValueError(f"unsupported rope_type {rtype!r} (supported: default, linear, llama3, yarn)")


def _yarn_inv_freq(dim: int, base: float, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    factor = float(params["factor"])
    old = float(params["original_max_position_embeddings"])
    beta_fast, beta_slow = float(params.get("beta_fast") or 32), float(params.get("beta_slow") or 1)

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if params.get("mscale") and params.get("mscale_all_dim"):
        attn = get_mscale(factor, params["mscale"]) / get_mscale(factor, params["mscale_all_dim"])
    else:
        attn = params.get("attention_factor") or get_mscale(factor)

    def corr_dim(rot: float) -> float:
        return (dim * math.log(old / (rot * 2 * math.pi))) / (2 * math.log(base))

    low = math.floor(corr_dim(beta_fast))
    high = math.ceil(corr_dim(beta_slow))
    if not params.get("truncate", True):         # false or null: no rounding, as transformers
        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extra_factor = 1 - ramp
    return inter * (1 - extra_factor) + extra * extra_factor, float(attn)


class Rotary(nn.Module):
    """cos/sin tables for every position of the context, computed once."""

    def __init__(self, dim: int, params: dict[str, Any], context: int) -> None:
        super().__init__()
        self.dim, self.params, self.context = dim, params, context
        self.register_buffer("cos", torch.empty(context, dim), persistent=False)  # [C, dim]
        self.register_buffer("sin", torch.empty(context, dim), persistent=False)
        if self.cos.device.type != "meta":
            self.materialize(self.cos.device)

    def materialize(self, device: torch.device) -> None:
        """(Re)compute the tables in fp32 on ``device`` (after building on the meta device)."""
        inv, scale = rope_inv_freq(self.dim, self.params)
        freqs = torch.outer(torch.arange(self.context, dtype=torch.float32), inv)  # [C, dim/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = (emb.cos() * scale).to(device)
        self.sin = (emb.sin() * scale).to(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, 1, T, dim]."""
        return self.cos[positions][:, None].to(dtype), self.sin[positions][:, None].to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] rotated by position (half-split layout, as HF checkpoints store q/k); with
    tables narrower than D (partial rotary, cos/sin [..., R]) only x[..., :R] turns."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot = x[..., :r]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x[..., r:]), dim=-1)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch,
         scale: Optional[float] = None) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, Hkv, L, D] -> [B, T, H*Dv]; grouped-query heads share their k/v
    in place (enable_gqa), nothing repeated."""
    mask, causal = batch.attn_mask()
    if q.shape[0] == 1 and q.shape[2] == 1 and mask is None:        # one sequence's decode token
        return decode_attention(q, k, v, scale).reshape(1, 1, -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1])   # [B, H, T, Dv]
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: Optional[float] = None) -> torch.Tensor:
    """One query token over its keys: q [1, H, 1, D], k [1, Hkv, L, D], v [1, Hkv, L, Dv] ->
    [1, H, 1, Dv]. On a CPU in fp32 through two bmm's (as SDPA's math reference): PyTorch's CPU
    flash kernel is slow for one query (one thread, 9 heads over 3 kv heads: 68 vs 33 us at 64
    keys, 2.3 vs 0.37 ms at 2048); grouped heads share their kv head through the view. Elsewhere
    SDPA, whose GPU kernels read bf16 keys in place."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    _, h, _, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(hkv, h // hkv, d).float() * (d ** -0.5 if scale is None else scale)  # [Hkv, G, D]
    p = torch.softmax(torch.bmm(qg, k[0].transpose(1, 2).float()), dim=-1)   # [Hkv, G, L]
    return torch.bmm(p, v[0].float()).to(q.dtype).view(1, h, 1, -1)          # [1, H, 1, Dv]


class Attention(nn.Module):
    """Multi-head / grouped-query attention with optional q/k RMSNorm and biases."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, layer: int,
                 bias: bool = False, qk_norm_eps: Optional[float] = None, o_bias: bool = False,
                 qk_norm_full: bool = False) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.layer = heads, kv_heads, head_dim, layer
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=o_bias)
        self.qk_norm_full = qk_norm_full
        if qk_norm_eps is not None:
            # per-head norm (qwen3) or over the whole projection (olmoe)
            qd, kd = (heads * head_dim, kv_heads * head_dim) if qk_norm_full else (head_dim, head_dim)
            self.q_norm = RMSNorm(qd, qk_norm_eps)
            self.k_norm = RMSNorm(kd, qk_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: Batch,
                kv: KVCache) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None and self.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, self.heads, self.head_dim)
        k = k.view(b, t, self.kv_heads, self.head_dim)
        if self.q_norm is not None and not self.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                 # [B, H, T, D]
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.o_proj(kv.attend(self.layer, q, k, v, batch, extras=self.attn_extras()))

    def attn_extras(self) -> Optional[AttnExtras]:
        """Sinks or a sliding window, for the families that have them (gpt-oss)."""
        return None


class DenseMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def combine_experts(provider: ExpertProvider, layer: int, x: torch.Tensor, weights: torch.Tensor,
                    ids: torch.Tensor, weight_dtype: Optional[torch.dtype] = None,
                    math: Optional[ExpertMath] = None) -> torch.Tensor:
    """x [N, H], routing weights/ids [N, k] -> sum_k weights * expert_k(x), [N, H]; ``math``:
    the experts' biases and activation where they are not plain SwiGLU (engine/kernels.py).
    The product expert_k(x) * weight is formed in ``weight_dtype`` (default: x's dtype; DeepSeek
    keeps fp32 routing weights) and rounded to x's dtype, as each family's reference does.
    Experts arrive from the provider as they become resident, so ready ones compute first; each
    token then sums its k products in expert-id order, as the reference's per-expert index_add_
    loop does, so the result is bit-identical whatever order the cache delivered them in."""
    n, k = ids.shape
    wdt = weight_dtype or x.dtype
    rows = provider.read_routing(layer, ids, x)                  # the layer's one host read
    ranked = [sorted(r) for r in rows]
    if n == 1:                                                   # one decode token: no indexing
        parts: list[Optional[torch.Tensor]] = [None] * k        # by rank of the expert id
        for e, w in provider.experts(layer, ids, x, host_ids=rows):
            j = rows[0].index(e)
            parts[ranked[0].index(e)] = (expert_forward(x, w, math, e) * weights[:, j:j + 1].to(wdt)).to(x.dtype)
        out = torch.zeros_like(x)
        for p in parts:
            out += p
        return out
    # the (token, column) pairs grouped by expert, tokens ascending within an expert as the
    # reference's per-expert loop gathers them; each pair's destination is its token's row at
    # the rank of its expert id. Built on the host from the routing already read, sent as one
    # index tensor per layer (on CUDA from pinned memory, so the copy does not wait for the
    # queued kernels as a pageable one does).
    flat = [e for r in rows for e in r]                                   # [N*k], token-major
    order = sorted(range(n * k), key=flat.__getitem__)                   # stable
    span: dict[int, list[int]] = {}
    for pos, f in enumerate(order):
        span.setdefault(flat[f], [pos, pos])[1] = pos + 1
    dest = [(f // k) * k + ranked[f // k].index(flat[f]) for f in order]
    idx = torch.tensor([order, dest])
    if x.device.type == "cuda":
        idx = idx.pin_memory()
    src, dst = idx.to(x.device, non_blocking=True)                       # [N*k] each
    xs = x[src // k]                                                     # [N*k, H] by expert
    ws = weights.reshape(-1)[src, None].to(wdt)                          # [N*k, 1]
    outs = x.new_empty(n * k, x.shape[-1])
    for e, w in provider.experts(layer, ids, x, host_ids=rows):
        a, b = span[e]
        outs[a:b] = (expert_forward(xs[a:b], w, math, e) * ws[a:b]).to(x.dtype)
    sorted_parts = x.new_empty(n * k, x.shape[-1])
    sorted_parts[dst] = outs
    sorted_parts = sorted_parts.view(n, k, -1)                           # [N, k, H] by expert id
    out = torch.zeros_like(x)
    for j in range(k):
        out += sorted_parts[:, j]
    return out


def softmax_topk(logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [N, E] -> (weights [N, k] fp32, ids [N, k]) with softmax scoring."""
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(probs, k, dim=-1)
    if normalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, ids
