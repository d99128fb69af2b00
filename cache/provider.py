"""What a model's MoE layer asks for experts, and the all-resident implementation.

The MoE layer computes its router itself, then iterates ``provider.experts(...)``: each unique
expert the layer needs, yielded as soon as its weights are resident (resident ones first), so
compute on ready experts overlaps the loads of missing ones. The layer never knows where weights live.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Collection, Iterator, NamedTuple, Optional, Protocol, Sequence, Union

import numpy as np
import torch

from cache.packed import PackedExpert, pack_expert, packs
from cache.quant import ExpertFormat, ExpertWeights
from cache.routing import StepRows  # noqa: F401  (re-exported: the engine's import)
from cache.step_events import StepEvents, masks

# what a provider hands a MoE layer: slot views in a stored format, or a packed resident expert
class HostExpert(NamedTuple):
    """An expert the layer computes on the CPU from its host copy (cache/cpu_experts.py;
    engine/kernels.expert_forward moves the rows there and back and reports the CPU seconds
    through ``report(rows, seconds)``)."""
    weights: ExpertWeights
    report: Callable[[int, float], None]


ProvidedExpert = Union[ExpertWeights, PackedExpert, HostExpert]

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
    """Where one routed expert lives: either the checkpoint's SwiGLU tensors gate [I, H],
    up [I, H], down [H, I], or (a quantized expert store) ``packed``: the expert's slot bytes
    in ``fmt``'s layout, one 4 KiB-aligned range read straight into a slot."""

    layer: int             # MoE layer index (counting MoE layers only)
    expert: int
    gate: Optional[TensorRef] = None
    up: Optional[TensorRef] = None
    down: Optional[TensorRef] = None
    packed: Optional[TensorRef] = None
    fmt: Optional[ExpertFormat] = None

    def __post_init__(self) -> None:
        if (self.packed is None) == (self.gate is None):
            raise ValueError(f"expert {self.layer}.{self.expert}: give gate/up/down or packed")
        if self.packed is not None and (self.fmt is None or self.packed.nbytes != self.fmt.slot_bytes):
            raise ValueError(f"{self.packed.path}: tensor {self.packed.name} has "
                             f"{self.packed.nbytes} bytes, its format needs "
                             f"{self.fmt.slot_bytes if self.fmt else '?'}")

    @property
    def refs(self) -> tuple[TensorRef, ...]:
        return (self.packed,) if self.packed is not None else (self.gate, self.up, self.down)

    @property
    def path(self) -> str:
        return self.refs[0].path

    @property
    def inter_hidden(self) -> tuple[int, int]:
        if self.fmt is not None:
            return self.fmt.inter, self.fmt.hidden
        return tuple(self.gate.shape)  # type: ignore[union-attr,return-value]

    @property
    def nbytes(self) -> int:
        """Bytes on disk."""
        return sum(r.nbytes for r in self.refs)


def expert_format(sources: Sequence[ExpertSource], dtype: torch.dtype) -> ExpertFormat:
    """The one slot format of ``sources``: their store's, or unquantized in ``dtype``."""
    if not sources:
        raise ValueError("no experts")
    fmts = {s.fmt for s in sources}
    if len(fmts) != 1:
        raise ValueError(f"experts in mixed formats: {sorted(str(f) for f in fmts)}")
    fmt = fmts.pop()
    if fmt is not None:
        return fmt
    inter, hidden = sources[0].inter_hidden
    return ExpertFormat("none", inter, hidden, dtype)


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


class Tracer(Protocol):
    """Records per-request expert activations (implemented in cache/trace.py)."""

    def begin_step(self, rows: StepRows) -> None: ...
    def record(self, layer: int, topk_ids: list[list[int]]) -> object: ...  # [T][k] on the host
    def record_lookahead(self, layer: int, topk_ids: list[list[int]]) -> None: ...  # [T][k]
    def end_request(self, seq_id: str, aborted: bool = False) -> None: ...


class Router(NamedTuple):
    """A MoE layer's router as the look-ahead applies it: logits = hidden @ weight^T (+ bias),
    scored by softmax or sigmoid, plus a selection bias where the family chooses experts on
    score + bias (DeepSeek-V3, GLM-4.5, ERNIE-4.5, MiniMax-M2)."""
    weight: torch.Tensor                        # [E, H]
    bias: Optional[torch.Tensor] = None         # [E] on the logits (gpt-oss)
    sigmoid: bool = False                       # sigmoid scores (else softmax)
    selection_bias: Optional[torch.Tensor] = None   # [E] added to the scores to choose

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] -> each row's expert ranking as probabilities [T, E] fp32: the softmax,
        or (sigmoid scores, a selection bias) the choice scores normalised to sum 1."""
        logits = hidden.to(self.weight.dtype) @ self.weight.t()                     # [T, E]
        if self.bias is not None:
            logits = logits + self.bias
        if not self.sigmoid and self.selection_bias is None:
            return torch.softmax(logits.float(), dim=-1)
        s = torch.sigmoid(logits.float()) if self.sigmoid else torch.softmax(logits.float(), dim=-1)
        if self.selection_bias is not None:
            s = (s + self.selection_bias.float()).clamp(min=0.0)
        return s / s.sum(dim=-1, keepdim=True).clamp(min=1e-9)


def lookahead(router: Router, hidden: torch.Tensor, top_k: int,
              per_token: bool) -> tuple[np.ndarray, Optional[list[list[int]]]]:
    """The next layer's router [E, H] on the current hidden state [T, H]: its mean probability
    per expert (the policy's hint) and, when ``per_token``, each row's top-k (the trace's v2
    look-ahead). One device-to-host read for both."""
    _, scores, ahead = read_routing(None, router, hidden, top_k, per_token)
    return scores, ahead


def read_routing(topk_ids: Optional[torch.Tensor], router: Router, hidden: torch.Tensor,
                 top_k: int, per_token: bool
                 ) -> tuple[list[list[int]], np.ndarray, Optional[list[list[int]]]]:
    """A layer's routing [T, k] (when given) and the look-ahead of ``router`` (see lookahead) in
    one device-to-host read: on CUDA each read waits for the queued kernels, so a layer keeps
    to one. Expert ids travel as float32, exact below 2**24. The scores stay an array [E]
    (the policies rank them with numpy; a list would be converted back, twice per layer)."""
    probs = router.scores(hidden)                                                 # [T, E]
    E = probs.shape[1]
    parts = [] if topk_ids is None else [topk_ids.reshape(-1).float()]            # [T*k]
    parts.append(probs.mean(0))                                                   # [E]
    if per_token:
        parts.append(probs.topk(top_k, dim=-1).indices.reshape(-1).float())      # [T*top_k]
    flat = torch.cat(parts).cpu().numpy()
    n, k = (0, 1) if topk_ids is None else (topk_ids.numel(), topk_ids.shape[-1])
    rows = flat[:n].astype(np.int64).reshape(-1, k).tolist() if n else []
    scores = flat[n:n + E]
    ahead = flat[n + E:].astype(np.int64).reshape(-1, top_k).tolist() if per_token else None
    return rows, scores, ahead


class ExpertProvider(ABC):
    """Hands a MoE layer the weights of the experts it routed to, and records the activation."""

    tracer: Optional["Tracer"] = None
    events: Optional[StepEvents] = None    # this pass's cache events, when a request watches
    _routers: Optional[list[Router]] = None   # per MoE layer: look-ahead wanted
    _top_k = 0
    _read: Optional[tuple[int, torch.Tensor, np.ndarray, Optional[list[list[int]]]]] = None

    def read_routing(self, layer: int, topk_ids: torch.Tensor,
                     hidden: Optional[torch.Tensor] = None) -> list[list[int]]:
        """topk_ids [T, k] as host lists, the layer's one device-to-host read: a provider that
        looks ahead at the next router reads that in the same sync and keeps it for ``experts``
        (same layer, same ``hidden``)."""
        router = self._next_router(layer, hidden)
        if router is None:
            return topk_ids.tolist()
        assert hidden is not None
        rows, scores, ahead = read_routing(topk_ids, router, hidden, self._top_k, self._per_token())
        self._read = (layer, hidden, scores, ahead)
        return rows

    def _next_router(self, layer: int, hidden: Optional[torch.Tensor]) -> Optional[Router]:
        if self._routers is None or hidden is None or layer + 1 >= len(self._routers):
            return None
        return self._routers[layer + 1]

    def _per_token(self) -> bool:
        """Whether the tracer records per-token look-ahead (record_lookahead is optional)."""
        return self.tracer is not None and hasattr(self.tracer, "record_lookahead")

    def _lookahead(self, layer: int, hidden: Optional[torch.Tensor]
                   ) -> Optional[tuple[np.ndarray, Optional[list[list[int]]]]]:
        """This layer's look-ahead (mean scores, per-token top-k): the one read_routing read
        with the routing, else read now; None without a next router."""
        read, self._read = self._read, None
        if read is not None and read[0] == layer and read[1] is hidden:
            return read[2], read[3]
        router = self._next_router(layer, hidden)
        if router is None:
            return None
        assert hidden is not None
        return lookahead(router, hidden, self._top_k, self._per_token())

    def begin_step(self, rows: StepRows, events: Optional[StepEvents] = None) -> None:
        """Called by the engine before each forward pass; ``events`` (when some row's request
        asked to see the cache at work) is filled during the pass and sealed by end_step."""
        self.events = events
        if self.tracer is not None:
            self.tracer.begin_step(rows)

    def end_step(self) -> Optional[StepEvents]:
        """After the pass: its events, with the resident set as the pass left it."""
        events, self.events = self.events, None
        if events is not None:
            events.resident = masks(self.resident_keys(), events.num_layers)
        return events

    def resident_keys(self) -> Collection[tuple[int, int]]:
        """(MoE layer, expert) of every expert whose weights are resident now."""
        return ()

    @abstractmethod
    def experts(self, layer: int, topk_ids: torch.Tensor, hidden: Optional[torch.Tensor] = None,
                host_ids: Optional[list[list[int]]] = None) -> Iterator[tuple[int, ProvidedExpert]]:
        """topk_ids: [T, k] routed expert ids of MoE layer ``layer`` for this step's rows;
        hidden: [T, H] the layer's normalised input (lets a cache look ahead at later routers);
        host_ids: topk_ids already read to the host, when the caller has them (saves a sync).
        Yields (expert_id, weights) once per unique expert, each as soon as it is resident."""

    def end_request(self, seq_id: str, aborted: bool = False) -> None:
        """The sequence left the batch; its activation matrix is final."""
        if self.tracer is not None:
            self.tracer.end_request(seq_id, aborted)

    def stats(self) -> dict[str, float]:
        """Cache totals by name (empty without a cache)."""
        return {}

    def layer_stats(self) -> dict[str, list[float]]:
        """Cache counters per MoE layer: name -> one value per layer (empty without a cache)."""
        return {}

    def resident_per_layer(self, num_layers: int) -> list[float]:
        """How many experts of each MoE layer are resident now (from ``resident_keys``)."""
        per = [0.0] * num_layers
        for layer, _ in self.resident_keys():
            per[layer] += 1
        return per

    def close(self) -> None:
        """Stop background work and release buffers."""


class ResidentExpertProvider(ExpertProvider):
    """Every expert in device memory, one contiguous buffer each (the exactness reference);
    unquantized bf16 experts on CPU are kept oneDNN-prepacked instead (cache/packed.py)."""

    def __init__(self, sources: Sequence[ExpertSource], device: torch.device, dtype: torch.dtype,
                 tracer: Optional[Tracer] = None,
                 progress: Optional[Callable[[int], None]] = None,
                 routers: Optional[Sequence[Router]] = None, top_k: int = 0) -> None:
        """routers, top_k: per MoE layer its router and the model's top-k, so
        the tracer records the next layer's look-ahead (moe-trace v2)."""
        self._weights: dict[tuple[int, int], ProvidedExpert] = {}
        self.tracer = tracer
        # the look-ahead only feeds the tracer's v2 records here
        self._routers = list(routers) if routers is not None and top_k > 0 and self._per_token() else None
        self._top_k = top_k
        self.fmt = expert_format(sources, dtype) if sources else None
        pack = self.fmt is not None and not self.fmt.quantized and packs(torch.device(device), dtype)
        for src in sources:
            assert self.fmt is not None
            buf = torch.empty(self.fmt.slot_bytes, dtype=torch.uint8, device=device)
            if src.packed is not None:
                buf.copy_(read_tensor(src.packed))
            else:
                for ref, dst in zip(src.refs, self.fmt.views(buf)):
                    dst.copy_(read_tensor(ref))
            views = self.fmt.views(buf)
            self._weights[(src.layer, src.expert)] = pack_expert(views) if pack else views
            if progress is not None:
                progress(src.nbytes)
        self.resident_bytes = (self.fmt.slot_bytes if self.fmt else 0) * len(self._weights)

    def experts(self, layer: int, topk_ids: torch.Tensor, hidden: Optional[torch.Tensor] = None,
                host_ids: Optional[list[list[int]]] = None) -> Iterator[tuple[int, ProvidedExpert]]:
        ids = topk_ids.tolist() if host_ids is None else host_ids
        if self.events is not None:
            self.events.route(layer, ids)     # everything is resident: every status is a hit
        if self.tracer is not None:
            self.tracer.record(layer, ids)
            got = self._lookahead(layer, hidden)
            if got is not None and got[1] is not None:
                self.tracer.record_lookahead(layer, got[1])     # type: ignore[attr-defined]
        for e in sorted({e for row in ids for e in row}):
            yield e, self._weights[(layer, e)]

    def resident_keys(self) -> Collection[tuple[int, int]]:
        return self._weights.keys()

    def layer_stats(self) -> dict[str, list[float]]:
        layers = max((k[0] for k in self._weights), default=-1) + 1
        return {"resident_experts": self.resident_per_layer(layers)} if layers else {}

    def stats(self) -> dict[str, float]:
        out = {"resident_bytes": float(self.resident_bytes)}
        if self.fmt is not None:
            out["expert_bits_per_weight"] = self.fmt.bits_per_weight
        return out


def check_shapes(sources: Sequence[ExpertSource], fmt: ExpertFormat) -> None:
    """Every expert must have the format's shapes: gate [I, H], up [I, H], down [H, I]."""
    want = fmt.shapes()
    for s in sources:
        if s.packed is not None:
            continue          # a store's experts are checked against the format on construction
        for name, ref in (("gate", s.gate), ("up", s.up), ("down", s.down)):
            if tuple(ref.shape) != want[name]:
                raise ValueError(f"{ref.path}: expert {s.layer}.{s.expert} {name} tensor "
                                 f"{ref.name} has shape {list(ref.shape)}, expected {list(want[name])}")
