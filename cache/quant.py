"""Expert storage formats: the byte layout of one expert's slot, and the quantizers that fill it.

One expert = one contiguous buffer of ``ExpertFormat.slot_bytes`` bytes holding gate, up and
down (weights, then scales where quantized), in the layout the kernels in engine/kernels.py take.
A quantized expert store holds these exact bytes per expert at 4 KiB-aligned offsets, so a tier
move is one read or one copy straight into a slot: no staging buffer, no conversion per load.

- ``none``: gate [I, H], up [I, H], down [H, I] in the compute dtype (converted from the
  checkpoint at load).
- ``int8``: symmetric per output channel: w = q * s, q int8 [O, In], s bf16 [O]
  (``torch._weight_int8pack_mm``'s operands).
- ``int4``: asymmetric group-wise over the input dimension: w = (q - 8) * scale + zero, q in
  0..15, groups of ``group_size`` inputs; q packed for ``torch._weight_int4pack_mm_for_cpu``
  (layout ``cpu``) or ``torch._weight_int4pack_mm`` (layout ``cuda``), scales_and_zeros
  bf16 [In/G, O, 2]. The packed layouts differ by device, so a store records which it holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, NamedTuple, Optional, Union

import numpy as np
import torch

from configs.engine import GROUP_SIZES as _GROUPS, QUANT_FORMATS

STORE_ALIGN = 4096            # a quantized slot (and a store's expert) starts and ends on this
SEG_ALIGN = 64                # each tensor inside a slot: element-aligned for every dtype
SCALE_DTYPE = torch.bfloat16  # the CPU and CUDA kernels take bf16 scales with bf16 activations
INT4_LAYOUTS = ("cpu", "cuda")
GROUP_SIZES = tuple(sorted(_GROUPS, reverse=True))  # largest first: the default is the largest dividing
PROJ = ("gate", "up", "down")


class QTensor(NamedTuple):
    """A quantized weight [O, In]: views into a slot buffer plus what the kernel needs."""

    kind: str                  # "int8" or "int4"
    q: torch.Tensor            # int8 [O, In]; int4: the packed tensor of ``layout``
    scales: torch.Tensor       # int8 [O]; int4 scales_and_zeros [In/G, O, 2]
    group_size: int            # int4 only (0 for int8)
    layout: str                # int4 pack layout: "cpu" or "cuda"
    shape: tuple[int, int]     # (O, In) of the unquantized weight


Weight = Union[torch.Tensor, QTensor]


class ExpertWeights(NamedTuple):
    """One expert's SwiGLU weights: gate [I, H], up [I, H], down [H, I] (plain or QTensor)."""

    gate: Weight
    up: Weight
    down: Weight


def default_group_size(in_features: int) -> int:
    """The largest of 128/64/32 dividing ``in_features``."""
    for g in GROUP_SIZES:
        if in_features % g == 0:
            return g
    raise ValueError(f"int4 needs an input dimension divisible by 32; got {in_features}")


def _pad(n: int, align: int) -> int:
    return n + (-n) % align


@dataclass(frozen=True)
class Segment:
    proj: str                  # gate | up | down
    part: str                  # "w" (weights / packed q) or "s" (scales)
    offset: int                # byte offset in the slot
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def int4_packed_shape(out_f: int, in_f: int, layout: str) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of ``torch._convert_weight_to_int4pack[_for_cpu]``'s output for [O, In]."""
    if layout == "cpu":
        return (out_f, in_f // 2), torch.uint8
    tiles = cuda_inner_k_tiles(in_f)
    return (out_f // 8, in_f // (tiles * 16), 32, tiles // 2), torch.int32


def cuda_inner_k_tiles(in_f: int) -> int:
    for t in (8, 4, 2):
        if in_f % (t * 16) == 0:
            return t
    raise ValueError(f"the CUDA int4 kernel needs an input dimension divisible by 32; got {in_f}")


@dataclass(frozen=True)
class ExpertFormat:
    """How one expert of shape (inter, hidden) lies in its slot."""

    kind: str                  # none | int8 | int4
    inter: int
    hidden: int
    dtype: torch.dtype = torch.float32   # "none": the slot's element dtype
    group_size: int = 0                  # int4
    layout: str = "cpu"                  # int4

    def __post_init__(self) -> None:
        if self.kind not in QUANT_FORMATS:
            raise ValueError(f"invalid quantize={self.kind!r}: choose one of {', '.join(QUANT_FORMATS)}")
        if self.kind != "none":                     # one value, so equal formats compare equal
            object.__setattr__(self, "dtype", SCALE_DTYPE)
        if self.kind != "int4":
            object.__setattr__(self, "group_size", 0)
            object.__setattr__(self, "layout", "cpu")
        if self.kind == "int4":
            if self.layout not in INT4_LAYOUTS:
                raise ValueError(f"invalid int4 layout {self.layout!r}: choose one of {INT4_LAYOUTS}")
            for in_f in (self.hidden, self.inter):
                if self.group_size not in GROUP_SIZES or in_f % self.group_size:
                    raise ValueError(f"invalid group_size={self.group_size}: must be one of "
                                     f"{GROUP_SIZES} and divide the input dimension {in_f}")

    @property
    def quantized(self) -> bool:
        return self.kind != "none"

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {"gate": (self.inter, self.hidden), "up": (self.inter, self.hidden),
                "down": (self.hidden, self.inter)}

    def segments(self) -> tuple[Segment, ...]:
        segs: list[Segment] = []
        pos = 0
        for proj, (o, i) in self.shapes().items():
            if self.kind == "none":
                parts = [("w", (o, i), self.dtype)]
            elif self.kind == "int8":
                parts = [("w", (o, i), torch.int8), ("s", (o,), SCALE_DTYPE)]
            else:
                shape, dt = int4_packed_shape(o, i, self.layout)
                parts = [("w", shape, dt), ("s", (i // self.group_size, o, 2), SCALE_DTYPE)]
            for part, shape, dt in parts:
                seg = Segment(proj, part, pos, shape, dt)
                segs.append(seg)
                pos = seg.offset + seg.nbytes
                if self.kind != "none":
                    pos = _pad(pos, SEG_ALIGN)
        return tuple(segs)

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot: exact for "none", padded to STORE_ALIGN when quantized."""
        last = self.segments()[-1]
        end = last.offset + last.nbytes
        return _pad(end, STORE_ALIGN) if self.quantized else end

    @property
    def bits_per_weight(self) -> float:
        """Slot bits per weight, scales and padding included (shown in stats and /metrics)."""
        return self.slot_bytes * 8 / (3 * self.inter * self.hidden)

    def views(self, buf: torch.Tensor) -> ExpertWeights:
        """Split a flat uint8 slot buffer into gate/up/down (no copy)."""
        if buf.dtype != torch.uint8 or buf.numel() < self.slot_bytes:
            raise ValueError(f"a slot buffer must be uint8 of {self.slot_bytes} bytes, got "
                             f"{buf.dtype} of {buf.numel()}")
        got: dict[str, dict[str, torch.Tensor]] = {p: {} for p in PROJ}
        for s in self.segments():
            got[s.proj][s.part] = buf[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape)
        shapes = self.shapes()
        if self.kind == "none":
            return ExpertWeights(*(got[p]["w"] for p in PROJ))
        return ExpertWeights(*(QTensor(self.kind, got[p]["w"], got[p]["s"], self.group_size,
                                       self.layout, shapes[p]) for p in PROJ))

    def describe(self) -> str:
        if self.kind == "int4":
            return f"int4 (group {self.group_size}, {self.layout} layout)"
        return "int8 (per channel)" if self.kind == "int8" else f"none ({str(self.dtype).split('.')[-1]})"


# ---- quantizers (used offline by convert/ and by the tests) ---------------------------------
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
    it and are not tried: the grid and its own refit, 2 candidates instead of 5."""
    o, i = w.shape
    g = w.float().view(o, i // group_size, group_size)                  # [O, In/G, G]
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step, base = _grid(g, lo, hi)
    on_grid = _on_grid(g, step, base)

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
    return _stored(best_q, best_s, best_z)


INT4_CLIPS = (0.0, 0.03, 0.06, 0.1)     # share of the range cut off at each end, per candidate


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


def pack_int4(q: torch.Tensor, layout: str) -> torch.Tensor:
    """Unpacked q int32 [O, In] (0..15; on CPU, or on the GPU for ``cuda``) -> the packed tensor
    of ``layout`` (on CPU)."""
    if layout == "cpu":
        return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
    if not torch.cuda.is_available():
        raise RuntimeError("packing int4 weights for the CUDA kernel needs a CUDA device")
    o, i = q.shape
    pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).cuda()     # [O, In/2]
    return torch._convert_weight_to_int4pack(pairs, cuda_inner_k_tiles(i)).cpu()


@lru_cache(maxsize=16)
def _cpu_int4_permutation(o: int, i: int) -> torch.Tensor:
    """For each nibble of the CPU packed layout (low nibble of byte 0 first), the flat index
    of the q [O, In] element it holds: packing the index's base-16 digits recovers it exactly."""
    n = o * i
    idx = torch.arange(n, dtype=torch.int64)
    perm = torch.zeros(n, dtype=torch.int64)
    scale = 1
    while scale < n:
        d = ((idx // scale) % 16).to(torch.int32).view(o, i)
        packed = pack_int4(d, "cpu").reshape(-1)
        nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(-1).to(torch.int64)
        perm += nibbles * scale
        scale *= 16
    return perm


def unpack_int4_cpu(packed: torch.Tensor, o: int, i: int) -> torch.Tensor:
    """The CPU packed layout back to q int32 [O, In] (for re-packing for another device)."""
    flat = packed.reshape(-1)
    nibbles = torch.stack([flat & 0xF, flat >> 4], dim=-1).reshape(-1).to(torch.int32)
    q = torch.empty(o * i, dtype=torch.int32)
    q[_cpu_int4_permutation(o, i)] = nibbles
    return q.view(o, i)


def fill_slot(fmt: ExpertFormat, buf: torch.Tensor, weights: dict[str, torch.Tensor]) -> None:
    """Quantize gate/up/down (float [O, In] each) into the uint8 slot buffer ``buf`` (CPU)."""
    buf.zero_()
    views = fmt.views(buf)
    for proj in PROJ:
        w, dst = weights[proj], getattr(views, proj)
        if tuple(w.shape) != fmt.shapes()[proj]:
            raise ValueError(f"expert {proj} has shape {list(w.shape)}, the format expects "
                             f"{list(fmt.shapes()[proj])}")
        if fmt.kind == "none":
            dst.copy_(w)
        elif fmt.kind == "int8":
            q, s = quantize_int8(w)
            dst.q.copy_(q)
            dst.scales.copy_(s)
        else:
            # the CUDA pack layout is made on the GPU: quantize there too (a Mixtral expert's
            # three matrices take seconds of CPU each)
            q, sz = quantize_int4(w.cuda() if fmt.layout == "cuda" else w, fmt.group_size)
            dst.q.copy_(pack_int4(q, fmt.layout))
            dst.scales.copy_(sz)


def repack_slot(src: ExpertFormat, dst: ExpertFormat, src_buf: torch.Tensor,
                dst_buf: torch.Tensor) -> None:
    """Convert one int4 slot from ``src``'s pack layout to ``dst``'s (e.g. cpu -> cuda), once."""
    if src.kind != "int4" or dst.kind != "int4" or src.group_size != dst.group_size:
        raise ValueError("repack_slot converts between int4 layouts of one group size only")
    a, b = src.views(src_buf), dst.views(dst_buf)
    dst_buf.zero_()
    for proj in PROJ:
        qa, qb = getattr(a, proj), getattr(b, proj)
        o, i = qa.shape
        if src.layout != "cpu":
            raise ValueError(f"cannot unpack the {src.layout} int4 layout; keep a cpu-layout store")
        qb.q.copy_(pack_int4(unpack_int4_cpu(qa.q, o, i), dst.layout))
        qb.scales.copy_(qa.scales)


def format_from_config(qc: Optional[dict], inter: int, hidden: int,
                       dtype: torch.dtype) -> ExpertFormat:
    """The ExpertFormat a checkpoint's ``quantization_config`` names (None: unquantized)."""
    if not qc:
        return ExpertFormat("none", inter, hidden, dtype)
    return ExpertFormat(str(qc["format"]), inter, hidden, SCALE_DTYPE, int(qc.get("group_size") or 0),
                        str(qc.get("layout") or "cpu"))
