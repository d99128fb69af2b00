"""The quantized expert store: one safetensors file whose every expert is one 4 KiB-aligned range.

Per expert, in slot order (cache/quant.py ``ExpertFormat.segments``): ``experts.{l}.{e}.gate.qweight``,
``...gate.scales``, ``...up.*``, ``...down.*``, then ``experts.{l}.{e}.pad`` up to the next 4 KiB
boundary (safetensors allows no holes, so padding is a tensor too). The header is padded with
spaces so the data starts on a 4 KiB boundary. Any safetensors reader can open the file; moeserve
reads each expert's range with one O_DIRECT read straight into a slot.
"""
from __future__ import annotations

import os
from typing import Iterator

import torch

from cache.provider import ExpertSource, TensorRef
from cache.quant import STORE_ALIGN, ExpertFormat
from cache.safetensors_file import CheckpointError, padded_header, read_header

STORE_FILE = "experts.safetensors"
TORCH_TO_ST = {torch.uint8: "U8", torch.int8: "I8", torch.int32: "I32", torch.bfloat16: "BF16",
               torch.float16: "F16", torch.float32: "F32"}
PART_NAMES = {"w": "qweight", "s": "scales"}


def expert_prefix(layer: int, expert: int) -> str:
    return f"experts.{layer}.{expert}"


def expert_entries(fmt: ExpertFormat, layer: int, expert: int) -> Iterator[tuple[str, str, tuple[int, ...], int, int]]:
    """(name, dtype, shape, start, end) of one expert's tensors, relative to the expert's start."""
    pos = 0
    p = expert_prefix(layer, expert)
    for seg in fmt.segments():
        if seg.offset > pos:                                   # alignment gap inside the slot
            yield f"{p}.gap{pos}", "U8", (seg.offset - pos,), pos, seg.offset
        yield (f"{p}.{seg.proj}.{PART_NAMES[seg.part]}", TORCH_TO_ST[seg.dtype], seg.shape,
               seg.offset, seg.offset + seg.nbytes)
        pos = seg.offset + seg.nbytes
    if fmt.slot_bytes > pos:
        yield f"{p}.pad", "U8", (fmt.slot_bytes - pos,), pos, fmt.slot_bytes


def store_header(fmt: ExpertFormat, keys: list[tuple[int, int]], metadata: dict[str, str]) -> bytes:
    """The 8-byte length + JSON header of a store holding ``keys`` in this order, padded so the
    data (and so every expert) starts on a STORE_ALIGN boundary."""
    header: dict[str, object] = {"__metadata__": metadata}
    for i, (layer, expert) in enumerate(keys):
        base = i * fmt.slot_bytes
        for name, dtype, shape, start, end in expert_entries(fmt, layer, expert):
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [base + start, base + end]}
    return padded_header(header, STORE_ALIGN)


def locate_experts(path: str, fmt: ExpertFormat, num_layers: int,
                   num_experts: int) -> list[ExpertSource]:
    """Every expert of the store at ``path``, checked tensor by tensor against ``fmt``."""
    index = read_header(path)
    out: list[ExpertSource] = []
    for layer in range(num_layers):
        for expert in range(num_experts):
            base = None
            for name, dtype, shape, start, end in expert_entries(fmt, layer, expert):
                ref = index.get(name)
                if ref is None:
                    raise CheckpointError(f"{path}: missing tensor {name} (expert {expert} of "
                                          f"MoE layer {layer}, format {fmt.describe()})")
                if ref.dtype != dtype or tuple(ref.shape) != tuple(shape):
                    raise CheckpointError(f"{path}: tensor {name} is {ref.dtype} {list(ref.shape)}, "
                                          f"format {fmt.describe()} needs {dtype} {list(shape)}")
                base = ref.offset - start if base is None else base
                if ref.offset != base + start:
                    raise CheckpointError(f"{path}: tensor {name} lies at byte {ref.offset}, not "
                                          f"where its expert's slot layout puts it ({base + start})")
            assert base is not None
            if base % STORE_ALIGN:
                raise CheckpointError(f"{path}: expert {expert} of MoE layer {layer} starts at byte "
                                      f"{base}, not on a {STORE_ALIGN}-byte boundary")
            packed = TensorRef(path, base, (fmt.slot_bytes,), "U8", expert_prefix(layer, expert))
            out.append(ExpertSource(layer, expert, packed=packed, fmt=fmt))
    return out


def write_store(path: str, fmt: ExpertFormat, keys: list[tuple[int, int]],
                slots: Iterator[torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a store: ``slots`` yields each expert's filled uint8 slot buffer in ``keys`` order."""
    with open(path, "wb") as f:
        f.write(store_header(fmt, keys, metadata))
        n = 0
        for buf in slots:
            if buf.dtype != torch.uint8 or buf.numel() != fmt.slot_bytes:
                raise ValueError(f"slot {n}: expected uint8 [{fmt.slot_bytes}], got {buf.dtype} "
                                 f"[{buf.numel()}]")
            f.write(memoryview(buf.contiguous().numpy()))
            n += 1
        if n != len(keys):
            raise ValueError(f"{path}: wrote {n} experts, the header lists {len(keys)}")
        f.flush()
        os.fsync(f.fileno())
