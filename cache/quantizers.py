"""The quantizers: float weights [O, In] -> the codes and scales the kernels take (cache/quant.py
lays them out in an expert's slot). Used offline by convert/, at load for dense layers
(engine/kernels.QuantLinear), and by the tests."""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from types import ModuleType
from typing import Iterator, Optional

import numpy as np
import torch


SCALE_DTYPE = torch.bfloat16  # the CPU and CUDA kernels take bf16 scales with bf16 activations
# the compiled int4 search from this many weights per matrix: below it, torch's passes take less
# than loading the compiled code does (once per process, ~0.3 s; SmolLM2-135M's experts: 884,736)
COMPILED_MIN_WEIGHTS = 1 << 18


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [O, In] -> (q int8 [O, In], s bf16 [O]) with w ~ q * s, |q| <= 127."""
    w = w.float()
    s = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(SCALE_DTYPE)
    q = torch.round(w / s.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, s


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [O, In] -> (q int32 [O, In] in 0..15, scales_and_zeros bf16 [In/G, O, 2]) with
    w ~ (q - 8) * scale + zero per group of ``group_size`` inputs (asymmetric).

    Per group the range is clipped by each of INT4_CLIPS, the codes rounded, then scale and zero
    refitted by least squares for those codes and the codes rounded again (the idea of
    llama.cpp's make_qkx quantizers); one more candidate is the 16-level grid the values may
    already lie on (_grid); the candidate with the least squared error wins. Where every group
    lies on its grid (a 4-bit GGUF's experts: Q4_0, Q4_1, Q4_K), the clipped ranges cannot beat
    it and are not tried: the grid and its own refit, 2 candidates instead of 5. On the CPU the
    search runs compiled (cache/_int4_kernel.py), one group at a time, with rows split across
    torch's threads; elsewhere, or without numba, in torch (_search): the same result but where a
    float32 rounding of the refit decides between two bf16 scales."""
    o, i = w.shape
    g = w.float().view(o, i // group_size, group_size)                  # [O, In/G, G]
    if g.device.type == "cpu" and o * i >= COMPILED_MIN_WEIGHTS and _kernel() is not None:
        return _stored(*_quantize_compiled(g))
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step, base = _grid(g, lo, hi)
    return _stored(*_search(g, lo, hi, step, base, _on_grid(g, step, base)))


def _search(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, step: torch.Tensor, base: torch.Tensor,
            on_grid: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The candidates of quantize_int4 in torch (on any device): g [O, In/G, G], the rest
    [O, In/G, 1] -> the winning codes [O, In/G, G] and scale, zero [O, In/G, 1]."""
    def candidates() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(codes, scale, zero), scale and zero bf16-rounded as stored."""
        for clip in () if on_grid else INT4_CLIPS:
            span = (hi - lo) * (1 - 2 * clip)
            scale = (span / 15.0).clamp(min=1e-8)
            zero = lo + (hi - lo) * clip + 8 * scale
            scale, zero = _refit(g, _int4_codes(g, scale, zero), scale, zero)
            yield _int4_codes(g, scale, zero), scale, zero
        scale, zero = step.to(SCALE_DTYPE).float(), base.to(SCALE_DTYPE).float()
        q = _int4_codes(g, scale, zero)
        yield q, scale, zero
        if on_grid:                     # least squares for the grid's codes absorbs bf16's rounding
            scale, zero = _refit(g, q, scale, zero)
            yield _int4_codes(g, scale, zero), scale, zero

    best_q = best_s = best_z = best_err = None
    for q, scale, zero in candidates():
        err = ((q - 8) * scale + zero - g).pow(2).sum(-1, keepdim=True)  # [O, In/G, 1]
        if best_err is None:
            best_q, best_s, best_z, best_err = q, scale, zero, err
            continue
        take = err < best_err
        best_q = torch.where(take, q, best_q)
        best_s, best_z = torch.where(take, scale, best_s), torch.where(take, zero, best_z)
        best_err = torch.minimum(err, best_err)
    assert best_q is not None and best_s is not None and best_z is not None
    return best_q, best_s, best_z


def _quantize_compiled(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """_grid, _on_grid and _search compiled: g [O, In/G, G] on the CPU -> codes [O, In/G, G], scale,
    zero [O, In/G, 1]. Rows split across torch's threads (the kernels and numpy's sort release the
    GIL), twice: the grids first, since one group off its grid means the whole search."""
    kernel = _kernel()
    assert kernel is not None
    x = g.contiguous().numpy()
    o, ng, size = x.shape
    lo, hi, step, base, scale, zero = (np.empty((o, ng), np.float32) for _ in range(6))
    q = np.empty((o, ng, size), np.uint8)
    n = max(1, min(torch.get_num_threads(), o))
    rows = [slice(k * o // n, (k + 1) * o // n) for k in range(n)]
    grids = _pool().map(lambda r: kernel.grid_rows(np.sort(x[r], axis=-1), lo[r], hi[r], step[r], base[r]),
                        rows)
    on_grid = all(list(grids))
    list(_pool().map(lambda r: kernel.search_rows(x[r], lo[r], hi[r], step[r], base[r], _CLIPS, _KEEPS,
                                                     on_grid, q[r], scale[r], zero[r]), rows))
    return torch.from_numpy(q), torch.from_numpy(scale).unsqueeze(-1), torch.from_numpy(zero).unsqueeze(-1)


@lru_cache(maxsize=1)
def _kernel() -> Optional[ModuleType]:
    """cache/_int4_kernel.py, imported at the first large matrix (numba takes ~0.2 s to import);
    None without numba (e.g. an offline CUDA machine), where torch runs the same search."""
    try:
        from cache import _int4_kernel
    except ImportError:
        logging.getLogger(__name__).info("numba is not installed: int4 quantization runs in torch (slower)")
        return None
    return _int4_kernel


_POOL: Optional[ThreadPoolExecutor] = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The compiled search's threads, started once per process (starting two per matrix cost
    more than the search of a SmolLM2 expert's matrix)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="int4")
        return _POOL


def _forget_pool() -> None:
    """In a forked child: the parent's threads do not exist there."""
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


INT4_CLIPS = (0.0, 0.03, 0.06, 0.1)     # share of the range cut off at each end, per candidate
# the kernel's clips and 1 - 2 * clip, rounded to float32 from float64 as torch rounds the scalars
_CLIPS = np.array(INT4_CLIPS, np.float32)
_KEEPS = np.array([1 - 2 * c for c in INT4_CLIPS], np.float32)


def _stored(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [O, In/G, G] and scale, zero [O, In/G, 1] as quantize_int4 returns them."""
    o = q.shape[0]
    sz = torch.stack([scale[..., 0], zero[..., 0]], dim=-1).transpose(0, 1).contiguous()
    return q.to(torch.int32).view(o, -1), sz.to(SCALE_DTYPE)


def _on_grid(g: torch.Tensor, step: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether every group's values are 4-bit codes on its grid (_grid's step, base as code 8),
    to within float32 rounding (a Q4_K sub-block's offset can be thousands of steps)."""
    codes = torch.round((g - base) / step + 8)
    tolerance = 1e-2 * step + 1e-6 * base.abs()
    return bool(((codes >= 0) & (codes <= 15)).all()) and \
        bool((((codes - 8) * step + base - g).abs() <= tolerance).all())


def _grid(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the scale and zero of the grid its values would lie on if they were 4-bit
    codes: the smallest gap between distinct values as the step, the lowest value as code 0."""
    # numpy sorts rows of 32 4-7x faster than torch on the CPU (the same values either way)
    v = torch.from_numpy(np.sort(g.detach().numpy(), axis=-1)) if g.device.type == "cpu" else g.sort(dim=-1).values
    gaps = v[..., 1:] - v[..., :-1]
    tiny = (hi - lo) * 1e-3                       # gaps below this are one level rounded twice
    step = torch.where(gaps > tiny, gaps, torch.full_like(gaps, float("inf"))).amin(-1, keepdim=True)
    step = torch.where(torch.isfinite(step), step, (hi - lo) / 15.0).clamp(min=1e-8)
    return step, lo + 8 * step


def _int4_codes(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 against the bf16-rounded scale and zero the kernel will use."""
    scale, zero = scale.to(SCALE_DTYPE).float(), zero.to(SCALE_DTYPE).float()
    return torch.round((g - zero) / scale + 8).clamp(0, 15)


def _refit(g: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
           zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares scale and zero of w ~ scale * (q - 8) + zero for fixed codes; groups whose
    codes are all equal keep theirs. Returned bf16-rounded, as stored."""
    x = q - 8
    n = g.shape[-1]
    sx, sy = x.sum(-1, keepdim=True), g.sum(-1, keepdim=True)
    sxx, sxy = (x * x).sum(-1, keepdim=True), (x * g).sum(-1, keepdim=True)
    det = n * sxx - sx * sx
    ok = det > 0
    s_new = torch.where(ok, (n * sxy - sx * sy) / det.clamp(min=1e-12), scale)
    z_new = torch.where(ok, (sy - s_new * sx) / n, zero)
    ok = ok & (s_new > 1e-8)
    scale, zero = torch.where(ok, s_new, scale), torch.where(ok, z_new, zero)
    return scale.to(SCALE_DTYPE).float(), zero.to(SCALE_DTYPE).float()


def dequantize_int4(q: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of quantize_int4 on the unpacked q [O, In] -> fp32 [O, In]."""
    o, i = q.shape
    scale, zero = sz.float()[..., 0].t(), sz.float()[..., 1].t()        # [O, In/G]
    g = (q.view(o, i // group_size, group_size).float() - 8) * scale[..., None] + zero[..., None]
    return g.view(o, i)


