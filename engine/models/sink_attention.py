"""Attention with per-head sinks and a sliding window (gpt-oss), which SDPA cannot express.

A sink is one extra logit per head that takes part in the softmax and has no value: the
probabilities over the real keys then sum to less than one, so a head may attend to nothing.
A sliding window of W lets the query at position p see keys p-W+1..p only. Computed in fp32 in
chunks of queries, keys restricted to the ones a chunk can see, so a prompt pass holds at most
[H, QUERY_CHUNK, keys] scores (not [H, T, T]) and a sliding layer reads W keys, not all of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

QUERY_CHUNK = 128


@dataclass(frozen=True)
class AttnExtras:
    sinks: Optional[torch.Tensor] = None   # [H] one logit per head, or None
    window: Optional[int] = None           # keys within this many positions, or None (all)


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                   extras: AttnExtras, scale: Optional[float] = None,
                   first: Optional[int] = None) -> torch.Tensor:
    """q [B, H, T, D] at ``positions`` [B, T], k/v [B, Hkv, L, D] holding positions 0..L-1 ->
    [B, T, H*Dv]. Causal, within the window, with the sinks in each head's softmax. Grouped
    heads share their kv head through a view (head h reads kv head h // (H / Hkv)). ``first``:
    for one sequence whose positions are first..first+T-1, known on the host (no device read),
    each chunk reads only the keys it can see."""
    b, h, t, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    g = h // hkv
    scale = d ** -0.5 if scale is None else scale
    keys = torch.arange(k.shape[2], device=q.device)
    out = q.new_empty(b, t, h, dv)
    for t0 in range(0, t, QUERY_CHUNK):
        t1 = min(t, t0 + QUERY_CHUNK)
        c = t1 - t0
        pos = positions[:, t0:t1]                                          # [B, c]
        lo, hi = 0, k.shape[2]
        if b == 1 and first is not None:       # one sequence: only the keys this chunk can see
            hi = min(hi, first + t1)
            if extras.window is not None:
                lo = max(0, first + t0 - extras.window + 1)
        kk, vv = k[:, :, lo:hi].float(), v[:, :, lo:hi].float()            # [B, Hkv, Lc, D]
        qq = q[:, :, t0:t1].float().reshape(b, hkv, g * c, d)              # [B, Hkv, G*c, D]
        s = (qq @ kk.transpose(-1, -2) * scale).view(b, hkv, g, c, hi - lo)  # [B, Hkv, G, c, Lc]
        kp = keys[lo:hi]
        seen = kp[None, None, :] <= pos[:, :, None]                        # [B, c, Lc]
        if extras.window is not None:
            seen = seen & (kp[None, None, :] > pos[:, :, None] - extras.window)
        s = s.masked_fill(~seen[:, None, None], float("-inf"))
        if extras.sinks is not None:
            sink = extras.sinks.float().view(1, hkv, g, 1, 1).expand(b, hkv, g, c, 1)
            p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
        else:
            p = torch.softmax(s, dim=-1)
        o = (p.reshape(b, hkv, g * c, hi - lo) @ vv).view(b, hkv, g, c, dv)  # [B, Hkv, G, c, Dv]
        out[:, t0:t1] = o.permute(0, 3, 1, 2, 4).reshape(b, c, h, dv).to(q.dtype)
    return out.reshape(b, t, h * dv)
