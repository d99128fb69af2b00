"""A full disk under --record-trace and --trace-store: the server serves on, logs the failed
writes, and leaves both files whole. The disk is a 1 MiB tmpfs filled to the last byte, mounted in
a private mount namespace (`unshare -rm`, no root needed); skipped where namespaces are off."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from cache.eam import EAMCollection
from tests.server.conftest import REPO, free_port


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


SCRIPT = r"""
set -e
mount -t tmpfs -o size=1m tmpfs "$DISK"
cp "$SEED/store.json" "$SEED/trace.jsonl" "$DISK/"
dd if=/dev/zero of="$DISK/fill" bs=4k 2>/dev/null || true
dd if=/dev/zero of="$DISK/fill2" bs=1 2>/dev/null || true
"$PY" -m moeserve.cli serve --model "$MODEL" --port "$PORT" --policy auto --expert-budget 50% \
    --trace-store "$DISK/store.json" --record-trace "$DISK/trace.jsonl" || true
ls -a "$DISK" > "$OUT/listing"
cp "$DISK/store.json" "$DISK/trace.jsonl" "$OUT/"
"""


@pytest.mark.skipif(not _unshare_works(), reason="needs unprivileged mount namespaces (unshare -rm)")
def test_full_disk_under_both_trace_files(tiny_model_dir: str, tmp_path: str) -> None:
    seed, disk, out = tmp_path / "seed", tmp_path / "disk", tmp_path / "out"
    for d in (seed, disk, out):
        d.mkdir()
    coll = EAMCollection(2, 4, 16)   # the tiny model: 2 MoE layers x 4 experts
    coll.insert(__import__("numpy").ones((2, 4)))
    coll.save(str(seed / "store.json"))
    header = {"format": "moe-trace", "version": 1, "model": "tiny", "num_layers": 2,
              "num_experts": 4, "top_k": 2, "note": ""}
    # tmpfs hands out whole pages: a header ending on a page boundary makes the next append need
    # a page the full disk no longer has
    pad = 4096 - len(json.dumps(header) + "\n")
    (seed / "trace.jsonl").write_text(json.dumps({**header, "note": "x" * pad}) + "\n")
    assert (seed / "trace.jsonl").stat().st_size == 4096
    store_before = (seed / "store.json").read_bytes()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": REPO, "MOESERVE_THREADS": "1", "DISK": str(disk),
           "SEED": str(seed), "OUT": str(out), "PY": sys.executable, "MODEL": tiny_model_dir,
           "PORT": str(port)}
    log = open(tmp_path / "server.log", "w")
    sh = subprocess.Popen(["unshare", "-rm", "sh", "-c", SCRIPT], env=env, cwd=REPO, stdout=log,
                          stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 180
        while True:
            assert sh.poll() is None and time.monotonic() < end, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)   # polling interval, bounded by the deadline
        for i in range(4):
            r = httpx.post(base + "/v1/completions", timeout=120, json={
                "prompt": f"disk full {i}", "max_tokens": 8, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
        server = next(c for c in psutil.Process(sh.pid).children() if "moeserve.cli" in
                      " ".join(c.cmdline()))
        server.send_signal(signal.SIGTERM)   # shutdown flushes the trace store: that write fails
        assert sh.wait(timeout=60) == 0
    finally:
        if sh.poll() is None:
            sh.kill()
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert "could not record request" in text and "could not save the trace store" in text
    assert (out / "store.json").read_bytes() == store_before          # the old store, whole
    lines = (out / "trace.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines) and json.loads(lines[0])["format"] == "moe-trace"
    assert not [n for n in (out / "listing").read_text().split() if n.endswith(".tmp")]
