"""Atomic, locked, cached builds: a failed or killed build is never taken for a finished one."""
from __future__ import annotations

import errno
import os

import pytest

from convert.model_store import MARKER, BuildError, build_atomically, is_complete, verify


def _writer(content: str, calls: list[str]):
    def build(tmp: str) -> None:
        calls.append(tmp)
        with open(os.path.join(tmp, "weights.bin"), "w") as f:
            f.write(content)
    return build


def test_build_then_reuse(tmp_path) -> None:
    calls: list[str] = []
    target = str(tmp_path / "m")
    assert build_atomically(target, {"a": 1}, _writer("x", calls)) == target
    assert build_atomically(target, {"a": 1}, _writer("y", calls)) == target
    assert len(calls) == 1
    assert open(os.path.join(target, "weights.bin")).read() == "x"
    assert verify(target) == []


def test_changed_parameters_rebuild(tmp_path) -> None:
    calls: list[str] = []
    target = str(tmp_path / "m")
    build_atomically(target, {"a": 1}, _writer("x", calls))
    build_atomically(target, {"a": 2}, _writer("y", calls))
    assert len(calls) == 2 and open(os.path.join(target, "weights.bin")).read() == "y"


def test_failed_build_leaves_nothing(tmp_path) -> None:
    def boom(tmp: str) -> None:
        open(os.path.join(tmp, "half.bin"), "w").write("partial")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        build_atomically(str(tmp_path / "m"), {"a": 1}, boom)
    assert sorted(p for p in os.listdir(tmp_path) if not p.endswith(".lock")) == []


def test_disk_full_is_a_clear_error(tmp_path) -> None:
    def full(tmp: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(BuildError, match="disk full"):
        build_atomically(str(tmp_path / "m"), {"a": 1}, full)
    assert not (tmp_path / "m").exists()


def test_not_enough_space_fails_before_building(tmp_path) -> None:
    calls: list[str] = []
    with pytest.raises(BuildError, match="not enough disk space"):
        build_atomically(str(tmp_path / "m"), {"a": 1}, _writer("x", calls), need_bytes=1 << 62)
    assert calls == []


def test_stale_temp_dir_removed_and_incomplete_dir_rebuilt(tmp_path) -> None:
    stale = tmp_path / ".m.tmp-999999"
    stale.mkdir()
    (stale / "weights.bin").write_text("half")
    target = tmp_path / "m"
    target.mkdir()  # e.g. copied by hand, no completion marker
    (target / "weights.bin").write_text("old")
    assert not is_complete(str(target), {"a": 1})
    calls: list[str] = []
    build_atomically(str(target), {"a": 1}, _writer("new", calls))
    assert not stale.exists() and len(calls) == 1
    assert (target / "weights.bin").read_text() == "new" and (target / MARKER).is_file()


def test_truncated_file_is_not_complete(tmp_path) -> None:
    target = str(tmp_path / "m")
    build_atomically(target, {"a": 1}, _writer("xxxx", []))
    with open(os.path.join(target, "weights.bin"), "w") as f:
        f.write("x")
    assert not is_complete(target, {"a": 1})
