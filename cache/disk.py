"""Reading one expert straight from the checkpoint's safetensors files into a slot buffer.

An expert's gate/up/down tensors are contiguous byte ranges (often adjacent) in one or more
shards. Ranges in the same file that lie close together are merged into one span and read with as
few large reads as possible into an aligned staging buffer, then converted into the slot's dtype.
A quantized expert store (cache/quant.py) holds each expert as one 4 KiB-aligned range in its
slot's layout: that is one read straight into the slot, with no staging buffer and no conversion.

O_DIRECT is used where the file system allows it (checked once per file at open: tmpfs and some
others refuse it), so the OS page cache does not become a hidden second expert cache that makes
the memory budget a lie. Elsewhere reads are buffered and the range's pages are dropped afterwards
with posix_fadvise(DONTNEED).
"""
from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass
from typing import Optional

import torch

from cache.provider import ST_DTYPES, ExpertSource, TensorRef
from cache.slots import ALIGN, aligned_empty

MERGE_GAP = 1 << 20           # read through gaps up to this size rather than issue another read
CHUNK_BYTES = 32 << 20        # longest single read; bounds the staging buffer per I/O thread

_O_DIRECT = getattr(os, "O_DIRECT", 0)


class ExpertReadError(OSError):
    """An expert could not be read; the message names the file, tensor and byte range."""


@dataclass(frozen=True)
class Piece:
    """Part of one tensor inside one read: staging[src:src+nbytes] -> slot[dst:dst+count]."""

    src: int                  # byte offset in the staging buffer
    nbytes: int
    dst: int                  # element offset in the flat slot buffer
    dtype: torch.dtype        # checkpoint dtype of these bytes


@dataclass(frozen=True)
class Read:
    """One pread: ``length`` bytes at ``offset`` of ``path``; at least ``need`` must arrive."""

    path: str
    offset: int
    length: int
    need: int
    pieces: tuple[Piece, ...]
    names: str                # tensor names, for error messages
    into_slot: bool = False   # a packed expert: read straight into the slot, no staging
    slot_byte: int = -1       # >= 0: these bytes are the slot's own from this byte on (the
                              # checkpoint stores them as the slot does, see ``verbatim``):
                              # read straight into the slot when its dtype is the checkpoint's


def verbatim(span: list[tuple[TensorRef, int]], direct: bool) -> bool:
    """Whether a merged span's tensors lie in the file as in the slot (gate | up | down, or a
    run of them: a fused gate_up), contiguous, of one dtype, from an aligned offset for O_DIRECT:
    then the file's bytes are the slot's bytes (in that dtype)."""
    if len({ref.dtype for ref, _ in span}) != 1:
        return False
    if span[0][0].offset % (ALIGN if direct else 8):      # _span_reads starts reads there
        return False
    size = ST_DTYPES[span[0][0].dtype].itemsize
    return all(a.offset + a.nbytes == b.offset and (da * size + a.nbytes == db * size)
               for (a, da), (b, db) in zip(span, span[1:]))


class ExpertReader:
    """Reads experts into flat slot buffers. Thread safe: file descriptors are shared (pread is
    positional) and each caller passes its own staging buffer (see ``new_staging``)."""

    def __init__(self, direct: Optional[bool] = None, chunk_bytes: int = CHUNK_BYTES,
                 merge_gap: int = MERGE_GAP, drop_pages: bool = True) -> None:
        """direct: None tries O_DIRECT per file and falls back; True requires it; False never.
        drop_pages: after a buffered read, drop its pages from the OS cache (off only to
        measure page-cache reads in bench/cache_io.py)."""
        if chunk_bytes < ALIGN or chunk_bytes % ALIGN:
            raise ValueError(f"chunk_bytes={chunk_bytes} must be a positive multiple of {ALIGN}")
        self.direct = direct
        self.chunk_bytes = chunk_bytes
        self.merge_gap = merge_gap
        self.drop_pages = drop_pages
        self._fds: dict[tuple[str, bool], int] = {}     # (path, direct) -> fd, kept open
        self._direct_ok: dict[str, bool] = {}
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()
        self._plans: dict[tuple[int, int], tuple[Read, ...]] = {}
        self.max_read = 0     # longest read planned so far: the staging size callers need

    # ---- files ----------------------------------------------------------------------------
    def _probe_direct(self, path: str) -> bool:
        """Open with O_DIRECT and read one aligned block: some file systems accept the open
        flag but refuse the read (EINVAL), others refuse the open."""
        if not _O_DIRECT:
            return False
        try:
            fd = os.open(path, os.O_RDONLY | _O_DIRECT)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                return False
            raise
        try:
            buf = aligned_empty(ALIGN)
            os.preadv(fd, [memoryview(buf.numpy())], 0)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                return False
            raise
        self._fds[(path, True)] = fd
        return True

    def _open(self, path: str) -> bool:
        """Open ``path`` once (called under the lock); returns whether reads use O_DIRECT."""
        if path in self._direct_ok:
            return self._direct_ok[path]
        if not os.path.isfile(path):
            raise ExpertReadError(errno.ENOENT, f"{path}: expert file not found")
        self._sizes[path] = os.path.getsize(path)
        use = False
        if self.direct is not False:
            use = self._probe_direct(path)
            if self.direct is True and not use:
                raise ExpertReadError(errno.EINVAL, f"{path}: the file system refuses O_DIRECT "
                                      "(direct=True was required)")
        if not use:
            self._fds[(path, False)] = os.open(path, os.O_RDONLY)
        self._direct_ok[path] = use
        return use

    def uses_direct(self, path: str) -> bool:
        """Whether reads of ``path`` bypass the page cache with O_DIRECT (opens it if needed)."""
        with self._lock:
            return self._open(path)

    # ---- planning ---------------------------------------------------------------------------
    def plan(self, src: ExpertSource) -> tuple[Read, ...]:
        """The reads that bring ``src`` into a slot laid out as gate | up | down (cached)."""
        key = (src.layer, src.expert)
        with self._lock:
            if key in self._plans:
                return self._plans[key]
            reads = self._build_plan(src)
            self._plans[key] = reads
            self.max_read = max([self.max_read] + [r.length for r in reads])
            return reads

    def _build_plan(self, src: ExpertSource) -> tuple[Read, ...]:
        if src.packed is not None:
            ref = src.packed
            direct = self._open(ref.path)
            if direct and (ref.offset % ALIGN or ref.nbytes % ALIGN):
                raise ExpertReadError(errno.EINVAL, f"{ref.path}: expert tensor {ref.name} at "
                                      f"byte {ref.offset} (+{ref.nbytes}) is not {ALIGN}-aligned")
            piece = Piece(0, ref.nbytes, 0, torch.uint8)
            return (Read(ref.path, ref.offset, ref.nbytes, ref.nbytes, (piece,), ref.name, True),)
        n = src.gate.shape[0] * src.gate.shape[1]
        tensors: list[tuple[TensorRef, int]] = [(src.gate, 0), (src.up, n), (src.down, 2 * n)]
        for ref, _ in tensors:
            size = ST_DTYPES[ref.dtype].itemsize
            if ref.offset % size:
                raise ExpertReadError(errno.EINVAL, f"{ref.path}: tensor {ref.name} starts at byte "
                                      f"{ref.offset}, not a multiple of its {ref.dtype} element size")
        reads: list[Read] = []
        by_file: dict[str, list[tuple[TensorRef, int]]] = {}
        for ref, dst in tensors:
            by_file.setdefault(ref.path, []).append((ref, dst))
        for path, items in by_file.items():
            direct = self._open(path)
            items.sort(key=lambda t: t[0].offset)
            spans: list[list[tuple[TensorRef, int]]] = [[items[0]]]
            for ref, dst in items[1:]:
                last = spans[-1][-1][0]
                if ref.offset - (last.offset + last.nbytes) <= self.merge_gap:
                    spans[-1].append((ref, dst))
                else:
                    spans.append([(ref, dst)])
            for span in spans:
                reads.extend(self._span_reads(path, span, direct, verbatim(span, direct)))
        return tuple(reads)

    def _span_reads(self, path: str, span: list[tuple[TensorRef, int]], direct: bool,
                    slot_order: bool = False) -> list[Read]:
        """Split one merged byte span into reads of at most chunk_bytes (aligned for O_DIRECT).
        slot_order: the span's bytes are the slot's (``verbatim``); each read records where in
        the slot they go."""
        start = span[0][0].offset
        end = max(r.offset + r.nbytes for r, _ in span)
        # aligned start: O_DIRECT needs it; 8 keeps every dtype's view element-aligned in staging
        start -= start % (ALIGN if direct else 8)
        reads = []
        pos = start
        while pos < end:
            stop = min(pos + self.chunk_bytes, end)
            length = stop - pos
            if direct:
                length += (-length) % ALIGN
            pieces = []
            for ref, dst in span:
                lo, hi = max(pos, ref.offset), min(stop, ref.offset + ref.nbytes)
                if lo >= hi:
                    continue
                size = ST_DTYPES[ref.dtype].itemsize
                # chunk boundaries are ALIGN- (direct) or tensor-start- (buffered) relative, and
                # every tensor starts element-aligned, so each piece holds whole elements
                pieces.append(Piece(lo - pos, hi - lo, dst + (lo - ref.offset) // size,
                                    ST_DTYPES[ref.dtype]))
            names = ", ".join(r.name or "?" for r, _ in span)
            reads.append(Read(path, pos, length, stop - pos, tuple(pieces), names,
                              slot_byte=span[0][1] * ST_DTYPES[span[0][0].dtype].itemsize
                              + pos - start if slot_order else -1))
            pos = stop
        return reads

    # ---- reading ----------------------------------------------------------------------------
    def new_staging(self) -> torch.Tensor:
        """An aligned staging buffer large enough for every read planned so far."""
        return aligned_empty(max(self.max_read, ALIGN))

    def read_into(self, src: ExpertSource, out: torch.Tensor, staging: torch.Tensor) -> int:
        """Fill the flat slot buffer ``out`` (CPU) with ``src``: a packed expert's bytes straight
        into ``out`` (uint8, its slot size); checkpoint tensors as gate | up | down converted into
        ``out``'s dtype (3*I*H elements). Returns bytes read from disk."""
        total = 0
        for rd in self.plan(src):
            if rd.into_slot:
                if out.dtype != torch.uint8 or out.numel() < rd.length:
                    raise ValueError(f"a packed expert needs a uint8 slot of {rd.length} bytes, "
                                     f"got {out.dtype} [{out.numel()}]")
                if not self._direct_ok[rd.path] or out.data_ptr() % ALIGN == 0:
                    total += self._pread(rd, out)
                    continue
                # an unaligned destination (never a SlotPool's): stage, then copy
                total += self._pread(rd, staging)
                out[:rd.length].copy_(staging[:rd.length])
                continue
            if rd.slot_byte >= 0 and self._straight(rd, out):
                total += self._pread(rd, out.view(torch.uint8)[rd.slot_byte:])
                continue
            if rd.length > staging.numel():
                raise ValueError(f"staging buffer of {staging.numel()} bytes is smaller than a "
                                 f"{rd.length}-byte read of {rd.path}; call new_staging() after plan()")
            total += self._pread(rd, staging)
            for p in rd.pieces:
                # [nbytes] uint8 -> [count] checkpoint dtype -> slot dtype
                data = staging[p.src:p.src + p.nbytes].view(p.dtype)
                out[p.dst:p.dst + data.numel()].copy_(data)
        return total

    def _straight(self, rd: Read, out: torch.Tensor) -> bool:
        """Whether ``rd`` can land in ``out`` as read: same dtype, inside the slot (an O_DIRECT
        read's length is rounded up), on an aligned address for O_DIRECT."""
        if out.dtype != rd.pieces[0].dtype or not out.is_contiguous():
            return False
        if rd.slot_byte + rd.length > out.numel() * out.element_size():
            return False
        return not self._direct_ok[rd.path] or (out.data_ptr() + rd.slot_byte) % ALIGN == 0

    def _pread(self, rd: Read, staging: torch.Tensor) -> int:
        direct = self._direct_ok[rd.path]
        fd = self._fds[(rd.path, direct)]
        view = memoryview(staging.numpy())
        got = 0
        try:
            while got < rd.need:
                # one call normally returns everything; loop for the kernel's 2 GiB cap per call
                n = os.preadv(fd, [view[got:rd.length]], rd.offset + got)
                if n == 0:
                    break
                got += n
        except OSError as e:
            raise ExpertReadError(e.errno, f"{rd.path}: reading {rd.length} bytes at offset "
                                  f"{rd.offset} ({rd.names}) failed: {e.strerror}") from None
        if got < rd.need:
            raise ExpertReadError(errno.EIO, f"{rd.path}: short read of {rd.names}: wanted "
                                  f"{rd.need} bytes at offset {rd.offset}, got {got} (file is "
                                  f"{os.path.getsize(rd.path)} bytes; truncated?)")
        if not direct and self.drop_pages:
            # keep the page cache from holding a second, unbudgeted copy of the experts
            os.posix_fadvise(fd, rd.offset, rd.length, os.POSIX_FADV_DONTNEED)
        return got

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._direct_ok.clear()
            self._plans.clear()
