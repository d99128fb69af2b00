"""What a model's MoE layer asks for experts, and the all-resident implementation.

The MoE layer computes its router itself, then iterates ``provider.experts(...)``: each unique
expert the layer needs, yielded as soon as its weights are resident (resident ones first), so
compute on ready experts overlaps the loads of missing ones. The layer never knows where weights live.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Optional, Protocol, Sequence

import torch

# safetensors dtype string -> torch dtype
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorRef:
    """A contiguous tensor (or a contiguous slice of one) inside a safetensors file."""

    path: str
    offset: int            # absolute byte offset in the file
    shape: tuple[int, ...]
    dtype: str             # safetensors dtype string, e.g. "BF16"
    name: str = ""         # checkpoint tensor name, for error messages

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=ST_DTYPES[self.dtype]).element_size()


@dataclass(frozen=True)
class ExpertSource:
    """Where one routed expert's SwiGLU weights live: gate [I, H], up [I, H], down [H, I]."""

    layer: int             # MoE layer index (counting MoE layers only)
    expert: int
    gate: TensorRef
    up: TensorRef
    down: TensorRef

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes


class ExpertWeights(NamedTuple):
    """Views into one contiguous buffer: gate [I, H], up [I, H], down [H, I]."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


def expert_views(buf: torch.Tensor, inter: int, hidden: int) -> ExpertWeights:
    """Split a flat buffer of 3*I*H elements into gate/up/down views (no copy)."""
    n = inter * hidden
    return ExpertWeights(buf[:n].view(inter, hidden), buf[n:2 * n].view(inter, hidden),
                         buf[2 * n:3 * n].view(hidden, inter))


def read_tensor(ref: TensorRef) -> torch.Tensor:
    """Read one tensor with a plain buffered read (used at start-up for resident experts)."""
    with open(ref.path, "rb") as f:
        f.seek(ref.offset)
        data = bytearray(ref.nbytes)
        got = f.readinto(data)
    if got != ref.nbytes:
        raise ValueError(f"{ref.path}: tensor {ref.name or '?'} is truncated "
                         f"(wanted {ref.nbytes} bytes at offset {ref.offset}, got {got})")
    return torch.frombuffer(data, dtype=ST_DTYPES[ref.dtype]).view(ref.shape)


class StepRows(NamedTuple):
    """The engine's description of the rows of one forward pass: sequence i owns the next
    num_tokens[i] rows of every [T, ...] tensor; prefill[i] tells a prompt pass from a decode."""

    seq_ids: tuple[str, ...]
    num_tokens: tuple[int, ...]
    prefill: tuple[bool, ...]


class Tracer(Protocol):
    """Records per-request expert activations (implemented in cache/trace.py)."""

    def begin_step(self, rows: StepRows) -> None: ...
    def record(self, layer: int, topk_ids: torch.Tensor) -> None: ...
    def end_request(self, seq_id: str, aborted: bool = False) -> None: ...


class ExpertProvider(ABC):
    """Hands a MoE layer the weights of the experts it routed to, and records the activation."""

    tracer: Optional["Tracer"] = None

    def begin_step(self, rows: StepRows) -> None:
        """Called by the engine before each forward pass."""
        if self.tracer is not None:
            self.tracer.begin_step(rows)

    @abstractmethod
    def experts(self, layer: int, topk_ids: torch.Tensor,
                hidden: Optional[torch.Tensor] = None) -> Iterator[tuple[int, ExpertWeights]]:
        """topk_ids: [T, k] routed expert ids of MoE layer ``layer`` for this step's rows;
        hidden: [T, H] the layer's normalised input (lets a cache look ahead at later routers).
        Yields (expert_id, weights) once per unique expert, each as soon as it is resident."""

    def end_request(self, seq_id: str, aborted: bool = False) -> None:
        """The sequence left the batch; its activation matrix is final."""
        if self.tracer is not None:
            self.tracer.end_request(seq_id, aborted)

    def stats(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        """Stop background work and release buffers."""


class ResidentExpertProvider(ExpertProvider):
    """Every expert in device memory, one contiguous buffer each (the exactness reference)."""

    def __init__(self, sources: Sequence[ExpertSource], device: torch.device, dtype: torch.dtype,
                 tracer: Optional[Tracer] = None,
                 progress: Optional[Callable[[int], None]] = None) -> None:
        self._weights: dict[tuple[int, int], ExpertWeights] = {}
        self.tracer = tracer
        for src in sources:
            inter, hidden = src.gate.shape
            buf = torch.empty(3 * inter * hidden, dtype=dtype, device=device)
            for i, ref in enumerate((src.gate, src.up, src.down)):
                n = inter * hidden
                buf[i * n:(i + 1) * n].copy_(read_tensor(ref).reshape(-1))
            self._weights[(src.layer, src.expert)] = expert_views(buf, inter, hidden)
            if progress is not None:
                progress(src.nbytes)
        self.resident_bytes = sum(
            w.gate.numel() * 3 * w.gate.element_size() for w in self._weights.values())

    def experts(self, layer: int, topk_ids: torch.Tensor,
                hidden: Optional[torch.Tensor] = None) -> Iterator[tuple[int, ExpertWeights]]:
        if self.tracer is not None:
            self.tracer.record(layer, topk_ids)
        for e in torch.unique(topk_ids).tolist():
            yield e, self._weights[(layer, e)]

    def stats(self) -> dict[str, float]:
        return {"resident_bytes": float(self.resident_bytes)}
