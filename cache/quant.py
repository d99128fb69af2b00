"""Expert storage formats: the byte layout of one expert's slot, filled (fill_slot) by the quantizers
of cache/quantizers.py.

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
from typing import NamedTuple, Optional, Union

import torch

from cache.quantizers import SCALE_DTYPE, quantize_int4, quantize_int8
from configs.engine import GROUP_SIZES as _GROUPS, QUANT_FORMATS

STORE_ALIGN = 4096            # a quantized slot (and a store's expert) starts and ends on this
SEG_ALIGN = 64                # each tensor inside a slot: element-aligned for every dtype
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
