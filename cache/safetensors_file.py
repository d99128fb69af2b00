"""Reading safetensors headers directly: tensor name -> (file, absolute offset, shape, dtype).

No tensor data is read here; readers seek to the offsets themselves, so the same index serves
the dense loader (one read per tensor) and the expert tiers (one read per expert).
"""
from __future__ import annotations

import json
import os
import struct

from cache.provider import ST_DTYPES, TensorRef

MAX_HEADER = 100 * 1024 * 1024


def padded_header(header: dict[str, object], align: int) -> bytes:
    """The 8-byte length + JSON header, padded with spaces (as the format allows) so that the
    data section starts on an ``align`` boundary."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-(8 + len(raw))) % align)
    return struct.pack("<Q", len(raw)) + raw


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or inconsistent; the message names it."""


def read_header(path: str) -> dict[str, TensorRef]:
    """Parse one .safetensors file's header and check every tensor lies inside the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n <= 1 or n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: corrupt safetensors header (header length {n}, file size {size})")
        raw = f.read(n)
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    refs: dict[str, TensorRef] = {}
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name}: malformed header entry {info!r}") from None
        if dtype not in ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name}: unsupported dtype {dtype}")
        ref = TensorRef(path=path, offset=base + int(start), shape=shape, dtype=dtype, name=name)
        if int(end) - int(start) != ref.nbytes:
            raise CheckpointError(f"{path}: tensor {name}: {int(end) - int(start)} bytes stored "
                                  f"but shape {list(shape)} {dtype} needs {ref.nbytes}")
        if base + int(end) > size:
            raise CheckpointError(f"{path}: tensor {name} is truncated (file has {size} bytes, "
                                  f"tensor ends at {base + int(end)})")
        refs[name] = ref
    return refs


def read_checkpoint_index(model_dir: str) -> dict[str, TensorRef]:
    """All tensors of a checkpoint directory: model.safetensors or index-listed shards."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable shard index ({e})") from None
        shards = sorted(set(weight_map.values()))
    elif os.path.isfile(single):
        shards = ["model.safetensors"]
    else:
        found = sorted(p for p in os.listdir(model_dir) if p.endswith(".safetensors"))
        if not found:
            names = ", ".join(sorted(os.listdir(model_dir))) or "nothing"
            raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json "
                                  f"(found: {names})")
        shards = found
    refs: dict[str, TensorRef] = {}
    for shard in shards:
        refs.update(read_header(os.path.join(model_dir, shard)))
    return refs


def slice_leading(ref: TensorRef, index: int, rows: tuple[int, int] | None = None) -> TensorRef:
    """ref[index] (and optionally ref[index][rows[0]:rows[1]]) as a TensorRef: still contiguous."""
    inner = ref.shape[1:]
    per = TensorRef(ref.path, ref.offset, inner, ref.dtype).nbytes
    offset = ref.offset + index * per
    shape = inner
    if rows is not None:
        row_bytes = per // inner[0]
        offset += rows[0] * row_bytes
        shape = (rows[1] - rows[0],) + inner[1:]
    return TensorRef(ref.path, offset, shape, ref.dtype, f"{ref.name}[{index}]")
