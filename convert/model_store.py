"""Cached model directories built atomically: temp dir + completion marker + rename, under a lock.

A build writes into ``.<name>.tmp-<pid>`` beside the target and renames it into place only after every
file and the marker ``moeserve-build.json`` (build parameters + size and sha256 of every file) are
written. A directory without a matching marker is never used; stale temp dirs are removed under the lock.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
from typing import Any, Callable, Iterator

from convert.gguf_import import write_json

log = logging.getLogger(__name__)
MARKER = "moeserve-build.json"


class BuildError(RuntimeError):
    """Building a model failed; the message names the directory and the reason."""


def moeserve_home(home: str | None = None) -> str:
    """$MOESERVE_HOME, else ~/.cache/moeserve (``home`` overrides both)."""
    return os.path.abspath(home or os.environ.get("MOESERVE_HOME")
                           or os.path.join(os.path.expanduser("~"), ".cache", "moeserve"))


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Exclusive advisory lock: a second process building the same model waits here."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_marker(model_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(model_dir, MARKER), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def is_complete(model_dir: str, params: dict[str, Any]) -> bool:
    """The marker exists, was written for these parameters, and every listed file has its size."""
    marker = read_marker(model_dir)
    if marker is None or marker.get("params") != json.loads(json.dumps(params, sort_keys=True)):
        return False
    for name, info in marker.get("files", {}).items():
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path) or os.path.getsize(path) != info.get("bytes"):
            return False
    return bool(marker.get("files"))


def verify(model_dir: str) -> list[str]:
    """Files whose sha256 differs from the marker's (empty list: the directory is intact)."""
    marker = read_marker(model_dir) or {"files": {}}
    return [n for n, info in sorted(marker["files"].items())
            if not os.path.isfile(os.path.join(model_dir, n))
            or _sha256(os.path.join(model_dir, n)) != info["sha256"]]


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC from Python I/O, or the Rust safetensors writer's StorageFull error."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    text = str(e)
    return "StorageFull" in text or "No space left" in text or "os error 28" in text


def check_free_space(folder: str, need_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise BuildError(f"not enough disk space in {folder}: the build needs about "
                         f"{need_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB are free")


def build_atomically(target: str, params: dict[str, Any], build: Callable[[str], None],
                     need_bytes: int = 0) -> str:
    """Return ``target``, calling ``build(tmp_dir)`` first unless a complete build for ``params`` exists."""
    target = os.path.abspath(target)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    if is_complete(target, params):
        return target
    with file_lock(os.path.join(parent, f".{name}.lock")):
        if is_complete(target, params):  # another process finished it while we waited
            return target
        for entry in os.listdir(parent):
            if entry.startswith(f".{name}.tmp-"):
                log.info("removing stale partial build %s", os.path.join(parent, entry))
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        check_free_space(parent, need_bytes)
        tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
        os.makedirs(tmp)
        try:
            build(tmp)
            files = {n: {"bytes": os.path.getsize(os.path.join(tmp, n)), "sha256": _sha256(os.path.join(tmp, n))}
                     for n in sorted(os.listdir(tmp))}
            write_json(os.path.join(tmp, MARKER), {"params": params, "files": files})
            if os.path.exists(target):
                log.info("replacing %s (built with other parameters or incomplete)", target)
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(e):
                raise BuildError(f"disk full while building {target} (needs about "
                                 f"{need_bytes / 1e9:.2f} GB free in {parent}): {e}") from e
            raise
    return target
