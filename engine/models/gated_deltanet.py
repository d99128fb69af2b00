"""Gated DeltaNet, the linear attention of Qwen3-Next's hybrid layers.

Per value head, a state S [Dk, Dv] replaces the keys and values. Token t decays it by exp(g_t),
then writes the part of v_t that the state does not already predict (the delta rule), at rate
beta_t, and reads it with q_t:

    S' = exp(g_t) S;   d_t = beta_t (v_t - S'^T k_t);   S = S' + k_t d_t^T;   o_t = S^T q_t

with q and k L2-normalised (q also scaled by Dk^-1/2). A decode token takes that step once. A
prompt is taken in chunks of CHUNK tokens: within a chunk the deltas solve one unit lower
triangular system, (I + A) D = beta V - beta exp(G) K S0 with A_ij = beta_i exp(G_i - G_j) k_i.k_j
for j < i (G: the cumulative log decay from the chunk's start), and the outputs and the next
state follow by matmuls. Computed in fp32 as the reference kernels are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.common import Batch, KVCache

CHUNK = 64


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k [B, T, Hk, Dk], v [B, T, Hv, Dv], g/beta [B, T, Hv], state [B, Hv, Dk, Dv] fp32 ->
    (o [B, T, Hv, Dv] in v's dtype, the new state). Each q/k head serves Hv/Hk consecutive
    value heads."""
    dtype, t = v.dtype, v.shape[1]
    rep = v.shape[2] // k.shape[2]
    q, k = (x.repeat_interleave(rep, dim=2) if rep > 1 else x for x in (q, k))
    q, k, v, g, beta = (x.transpose(1, 2).float() for x in (q, k, v, g, beta))  # [B, Hv, T, ...]
    q, k = _l2norm(q) * q.shape[-1] ** -0.5, _l2norm(k)
    if t == 1:                    # one decode step, as matmuls: no [B, Hv, Dk, Dv] temporaries
        s = state * g.exp()[..., None]                                           # [B, Hv, Dk, Dv]
        d = (v - k @ s) * beta[..., None]                                        # [B, Hv, 1, Dv]
        s = torch.baddbmm(s.flatten(0, 1), k.flatten(0, 1).transpose(1, 2), d.flatten(0, 1)).view_as(s)
        return (q @ s).transpose(1, 2).to(dtype), s                             # [B, 1, Hv, Dv]
    out = torch.empty_like(v)                                                    # [B, Hv, T, Dv]
    for c0 in range(0, t, CHUNK):
        c1 = min(t, c0 + CHUNK)
        qc, kc, vc, bc = q[:, :, c0:c1], k[:, :, c0:c1], v[:, :, c0:c1], beta[:, :, c0:c1, None]
        cum = g[:, :, c0:c1].cumsum(-1)                                          # [B, Hv, c]
        lower = torch.ones(c1 - c0, c1 - c0, dtype=torch.bool, device=q.device).tril()
        decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~lower, float("-inf")).exp()
        a = (bc * kc) @ kc.transpose(-1, -2) * decay                             # [B, Hv, c, c]
        system = a.masked_fill(~lower, 0.0)        # diagonal: taken as 1 by the unitriangular solve
        rhs = torch.cat([bc * vc, bc * kc * cum[..., None].exp()], dim=-1)      # [B, Hv, c, Dv+Dk]
        sol = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
        u, w = sol.split([vc.shape[-1], kc.shape[-1]], dim=-1)
        d = u - w @ state                                                        # [B, Hv, c, Dv]
        out[:, :, c0:c1] = (qc * cum[..., None].exp()) @ state + (qc @ kc.transpose(-1, -2) * decay) @ d
        last = cum[..., -1:]                                                     # [B, Hv, 1]
        state = state * last[..., None].exp() + (kc * (last - cum)[..., None].exp()).transpose(-1, -2) @ d
    return out.transpose(1, 2).to(dtype), state


class GatedRMSNorm(nn.Module):
    """RMSNorm of each head's output, times silu(z) (z: the layer's output gate)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        return (h * F.silu(z.float())).to(dtype)


class GatedDeltaNet(nn.Module):
    """Qwen3-Next's linear_attn: projections, causal depthwise conv + silu over q/k/v, the gated
    delta rule, a gated RMSNorm and the output projection; state per sequence in kv.linear."""

    def __init__(self, hidden: int, k_heads: int, v_heads: int, k_dim: int, v_dim: int, kernel: int,
                 eps: float, layer: int) -> None:
        super().__init__()
        if v_heads % k_heads:
            raise ValueError(f"config.json: linear_num_value_heads={v_heads} is not a multiple of "
                             f"linear_num_key_heads={k_heads}")
        self.hk, self.hv, self.dk, self.dv, self.layer = k_heads, v_heads, k_dim, v_dim, layer
        self.conv_dim = 2 * k_heads * k_dim + v_heads * v_dim
        self.in_proj_qkvz = nn.Linear(hidden, 2 * k_heads * k_dim + 2 * v_heads * v_dim, bias=False)
        self.in_proj_ba = nn.Linear(hidden, 2 * v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel, groups=self.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(v_heads))
        self.A_log = nn.Parameter(torch.zeros(v_heads))
        self.norm = GatedRMSNorm(v_dim, eps)
        self.out_proj = nn.Linear(v_heads * v_dim, hidden, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [B, T, H] -> (q|k|v [B, T, C] as the convolution takes them, z [B, T, Hv*Dv],
        beta and decay logits [B, T, Hv] each)."""
        b, t, _ = x.shape
        g = self.hv // self.hk
        # the projections are grouped per key head: [q, k, v of its g value heads, z of them]
        qkvz = self.in_proj_qkvz(x).view(b, t, self.hk, 2 * self.dk + 2 * g * self.dv)
        q, k, v, z = qkvz.split([self.dk, self.dk, g * self.dv, g * self.dv], dim=-1)
        beta, a = self.in_proj_ba(x).view(b, t, self.hk, 2 * g).split([g, g], dim=-1)
        mixed = torch.cat([q.reshape(b, t, -1), k.reshape(b, t, -1), v.reshape(b, t, -1)], dim=-1)
        return mixed, z.reshape(b, t, -1), beta.reshape(b, t, -1), a.reshape(b, t, -1)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: Batch,
                kv: KVCache) -> torch.Tensor:
        b, t, _ = x.shape
        mixed, z, beta, a = self.project(x)
        states = kv.linear
        assert states is not None, "a linear-attention layer needs the KV cache's linear states"
        window, state = states.read(self.layer, batch)                # [B, C, K-1], [B, Hv, Dk, Dv]
        w = self.conv1d.weight                                          # [C, 1, K]
        full = torch.cat([window.to(w.dtype), mixed.transpose(1, 2).to(w.dtype)], dim=-1)  # [B, C, K-1+T]
        conv = F.silu(F.conv1d(full, w, groups=self.conv_dim)).to(x.dtype).transpose(1, 2)  # [B, T, C]
        q, k, v = conv.split([self.hk * self.dk, self.hk * self.dk, self.hv * self.dv], dim=-1)
        decay = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        o, state = gated_delta_rule(q.view(b, t, self.hk, self.dk), k.view(b, t, self.hk, self.dk),
                                    v.view(b, t, self.hv, self.dv), decay, beta.sigmoid(), state)
        states.write(self.layer, batch, full[:, :, full.shape[-1] - window.shape[-1]:], state)
        o = self.norm(o.reshape(-1, self.dv), z.reshape(-1, self.dv))                # [B*T*Hv, Dv]
        return self.out_proj(o.view(b, t, self.hv * self.dv))


class SplitGatedDeltaNet(GatedDeltaNet):
    """Qwen3.5's layout of the same layer: separate projections, q|k|v over all heads in one."""

    def __init__(self, hidden: int, k_heads: int, v_heads: int, k_dim: int, v_dim: int, kernel: int,
                 eps: float, layer: int) -> None:
        super().__init__(hidden, k_heads, v_heads, k_dim, v_dim, kernel, eps, layer)
        del self.in_proj_qkvz, self.in_proj_ba
        self.in_proj_qkv = nn.Linear(hidden, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(hidden, v_heads * v_dim, bias=False)
        self.in_proj_b = nn.Linear(hidden, v_heads, bias=False)
        self.in_proj_a = nn.Linear(hidden, v_heads, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.in_proj_qkv(x), self.in_proj_z(x), self.in_proj_b(x), self.in_proj_a(x)
