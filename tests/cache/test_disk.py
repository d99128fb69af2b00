"""cache/disk.py: expert reads equal safetensors' own loading, with and without O_DIRECT."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
from safetensors.torch import load_file

from cache.disk import ALIGN, ExpertReadError, ExpertReader
from cache.provider import ExpertSource, TensorRef
from tests.cache.synth import write_experts


def _direct_supported(directory: str) -> bool:
    path = os.path.join(directory, "probe.bin")
    with open(path, "wb") as f:
        f.write(b"\0" * ALIGN)
    try:
        return ExpertReader().uses_direct(path)
    finally:
        os.remove(path)


def _check_all(reader: ExpertReader, sources: list[ExpertSource], want: dict, dtype: torch.dtype) -> None:
    for src in sources:
        reader.plan(src)                  # staging must cover the longest planned read
    staging = reader.new_staging()
    n = sources[0].gate.shape[0] * sources[0].gate.shape[1]
    for src in sources:
        out = torch.full((3 * n,), float("nan"), dtype=dtype)
        got = reader.read_into(src, out, staging)
        assert got >= src.nbytes
        assert torch.equal(out, want[(src.layer, src.expert)].to(dtype)), (src.layer, src.expert)


@pytest.mark.parametrize("ckpt_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("direct", [False, True])
def test_reads_equal_safetensors(tmp_path, ckpt_dtype: torch.dtype, fused: bool, direct: bool) -> None:
    if direct and not _direct_supported(str(tmp_path)):
        pytest.skip(f"{tmp_path}: file system refuses O_DIRECT")
    sources, _ = write_experts(str(tmp_path), layers=2, experts=3, inter=24, hidden=40,
                               dtype=ckpt_dtype, shards=2, fused=fused)
    # the reference: safetensors' own loader on the same files
    loaded = {}
    for name in os.listdir(tmp_path):
        loaded.update(load_file(os.path.join(tmp_path, name)))
    want = {}
    for s in sources:
        parts = []
        for ref in (s.gate, s.up, s.down):
            base = ref.name.split("[")[0]
            t = loaded[base]
            if fused:
                e = s.expert
                if "gate_up" in base:
                    i = s.gate.shape[0]
                    t = t[e, :i] if ref is s.gate else t[e, i:]
                else:
                    t = t[e]
            parts.append(t.reshape(-1))
        want[(s.layer, s.expert)] = torch.cat(parts)
    reader = ExpertReader(direct=direct)
    assert all(reader.uses_direct(s.gate.path) == direct for s in sources)
    _check_all(reader, sources, want, ckpt_dtype)
    reader.close()


def test_converts_into_slot_dtype(tmp_path) -> None:
    sources, want = write_experts(str(tmp_path), layers=1, experts=2, inter=8, hidden=16,
                                  dtype=torch.bfloat16)
    reader = ExpertReader()
    _check_all(reader, sources, want, torch.float32)     # bf16 -> fp32 is exact
    reader.close()


def test_adjacent_tensors_are_one_read(tmp_path) -> None:
    sources, _ = write_experts(str(tmp_path), layers=1, experts=4, inter=16, hidden=32)
    reader = ExpertReader(direct=False)
    for s in sources:
        assert len(reader.plan(s)) == 1           # w1, w2, w3 lie next to each other
    small = ExpertReader(direct=False, chunk_bytes=ALIGN)
    assert len(small.plan(sources[0])) == -(-sources[0].nbytes // ALIGN)
    _check_all(small, sources, {(s.layer, s.expert): _flat(s) for s in sources}, torch.bfloat16)
    reader.close()
    small.close()


def _flat(s: ExpertSource) -> torch.Tensor:
    from cache.provider import read_tensor
    return torch.cat([read_tensor(r).reshape(-1) for r in (s.gate, s.up, s.down)])


def test_tmpfs_falls_back_to_buffered() -> None:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        if _direct_supported(d):
            pytest.skip("this /dev/shm accepts O_DIRECT")
        sources, want = write_experts(d, layers=1, experts=2, inter=8, hidden=16)
        reader = ExpertReader()
        assert not reader.uses_direct(sources[0].gate.path)
        _check_all(reader, sources, want, torch.bfloat16)
        with pytest.raises(ExpertReadError, match="refuses O_DIRECT"):
            ExpertReader(direct=True).uses_direct(sources[0].gate.path)
        reader.close()


def test_missing_file_is_named(tmp_path) -> None:
    path = str(tmp_path / "gone.safetensors")
    ref = TensorRef(path, 8, (2, 4), "BF16", "w1")
    with pytest.raises(ExpertReadError, match="gone.safetensors: expert file not found"):
        ExpertReader().plan(ExpertSource(0, 0, ref, ref, TensorRef(path, 8, (4, 2), "BF16", "w2")))


@pytest.mark.parametrize("direct", [False, None])
def test_short_read_is_named(tmp_path, direct) -> None:
    sources, _ = write_experts(str(tmp_path), layers=1, experts=2, inter=64, hidden=64)
    path = sources[-1].gate.path
    reader = ExpertReader(direct=direct)
    reader.plan(sources[-1])
    staging = reader.new_staging()
    s = sources[-1]
    end = max(r.offset + r.nbytes for r in (s.gate, s.up, s.down))
    os.truncate(path, end - 100)                            # the expert loses its tail
    out = torch.empty(3 * 64 * 64, dtype=torch.bfloat16)
    with pytest.raises(ExpertReadError, match=r"model-00000\.safetensors: short read"):
        reader.read_into(sources[-1], out, staging)
    reader.close()
