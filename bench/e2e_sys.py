"""Operating-system plumbing of the end-to-end benchmark: memory cgroups (v1), disk bandwidth,
per-process disk reads and peak RSS, checkpoint sizes."""
from __future__ import annotations

import json
import mmap
import os
import resource
import struct
import time

CGROUP_ROOT = "/sys/fs/cgroup/memory"
EXPERT_MARK = ".experts."       # Mixtral-format routed expert tensors (moeserve stores: "experts.")
_ST_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_bytes_of(pid: int | str = "self") -> int:
    """Bytes this process caused to be fetched from storage (/proc/<pid>/io read_bytes): page-cache
    hits do not count, so this is what the disk really delivered."""
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/io has no read_bytes line")


def peak_rss_bytes() -> int:
    """Peak resident set of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def checkpoint_bytes(model_dir: str) -> tuple[int, int]:
    """(routed expert bytes, every other tensor's bytes) of a safetensors checkpoint, as stored."""
    experts = dense = 0
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no .safetensors files")
    for name in files:
        with open(os.path.join(model_dir, name), "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            size = _ST_BYTES[meta["dtype"]]
            for d in meta["shape"]:
                size *= d
            if EXPERT_MARK in key or key.startswith("experts."):   # also the int8/int4 store
                experts += size
            else:
                dense += size
    return experts, dense


def largest_shard(model_dir: str) -> str:
    files = [os.path.join(model_dir, f) for f in os.listdir(model_dir) if f.endswith(".safetensors")]
    return max(files, key=os.path.getsize)


def sequential_read_bandwidth(path: str, block: int = 16 << 20, limit: int = 2 << 30) -> float:
    """Bytes/s of one large O_DIRECT sequential read of ``path`` (up to ``limit`` bytes): the disk's
    speed with no page cache involved. Falls back to a buffered read of dropped pages where the
    file system refuses O_DIRECT."""
    buf = mmap.mmap(-1, block)              # page-aligned, as O_DIRECT requires
    flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    total = 0
    try:
        start = time.perf_counter()
        while total < limit:
            n = os.readv(fd, [buf])
            if n <= 0:
                break
            total += n
        seconds = time.perf_counter() - start
    finally:
        os.close(fd)
        buf.close()
    if total == 0:
        raise RuntimeError(f"{path}: read 0 bytes while measuring bandwidth")
    return total / seconds


def parallel_read_bandwidth(path: str, threads: int = 4, block: int = 4 << 20, limit: int = 1 << 30) -> float:
    """Bytes/s of ``threads`` concurrent O_DIRECT reads of ``block`` bytes at interleaved offsets (as
    moeserve's I/O pool reads experts): a queue deeper than one can beat a single sequential stream."""
    from concurrent.futures import ThreadPoolExecutor
    size = min(os.path.getsize(path), limit) // block * block
    if size == 0:
        raise RuntimeError(f"{path}: too small to measure bandwidth")

    def worker(k: int) -> int:
        buf = mmap.mmap(-1, block)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        got = 0
        try:
            for off in range(k * block, size, threads * block):
                got += os.preadv(fd, [buf], off)
        finally:
            os.close(fd)
            buf.close()
        return got
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        total = sum(ex.map(worker, range(threads)))
    return total / (time.perf_counter() - start)


def block_device_of(path: str) -> tuple[str, int | None]:
    """(device name, read_ahead_kb) of the block device holding ``path`` (the kernel's read-ahead
    decides how much every page fault of an mmap reader such as llama.cpp pulls from disk)."""
    st = os.stat(path)
    sysdir = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    for d in (sysdir, os.path.join(sysdir, "..")):
        ra = os.path.join(d, "queue", "read_ahead_kb")
        if os.path.isfile(ra):
            with open(ra) as f:
                return os.path.basename(os.path.realpath(d)), int(f.read().strip())
    return os.path.basename(os.path.realpath(sysdir)) if os.path.exists(sysdir) else "unknown", None


class MemoryCgroup:
    """A child memory cgroup (v1) capping a worker's RSS *and* its page cache.

    Use: ``with MemoryCgroup(name, limit) as cg: Popen(..., preexec_fn=cg.enter)``; the group is
    removed on exit (its processes must have ended)."""

    def __init__(self, name: str, limit_bytes: int, root: str = CGROUP_ROOT) -> None:
        self.path = os.path.join(root, f"moeserve-bench-{os.getpid()}-{name}")
        self.limit = limit_bytes
        self.root = root

    def __enter__(self) -> "MemoryCgroup":
        if not os.path.isdir(self.root):
            raise RuntimeError(f"no cgroup v1 memory controller at {self.root}")
        os.mkdir(self.path)
        try:
            self._write("memory.limit_in_bytes", str(self.limit))
            got = int(self._read("memory.limit_in_bytes"))
            if got > self.limit + 4096:
                raise RuntimeError(f"{self.path}: memory.limit_in_bytes reads {got}, wrote {self.limit}")
        except Exception:
            os.rmdir(self.path)
            raise
        return self

    def enter(self) -> None:
        """preexec_fn of the worker: join the group before exec, so every byte it maps is charged."""
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    def peak_bytes(self) -> int:
        return int(self._read("memory.max_usage_in_bytes"))

    def oom_kills(self) -> int:
        """Processes of the group the kernel killed for hitting the limit (0 if not reported)."""
        for line in self._read("memory.oom_control").splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def __exit__(self, *exc: object) -> None:
        # a dead worker's page cache stays charged until the group is removed; rmdir reparents it
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return
            except OSError:
                time.sleep(0.1)     # the worker's exit is still being accounted
        raise RuntimeError(f"could not remove cgroup {self.path}")

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def _read(self, name: str) -> str:
        with open(os.path.join(self.path, name)) as f:
            return f.read().strip()

