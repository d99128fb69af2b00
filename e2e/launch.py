"""Processes the e2e checks start (moeserve, Open WebUI): niced, logged, polled until healthy."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from typing import Any, Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def ready(url: str) -> bool:
    """A 200 from ``url`` (moeserve's /health answers 503 until the engine is ready)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def launched(name: str, cmd: list[str], env: dict[str, str], health: str, cwd: str, log_dir: str,
             deadline_s: float = 900) -> Iterator[str]:
    """``cmd`` under nice 10 (the machine is shared), its output in ``log_dir/<name>.log``;
    yields the log's path once ``health`` answers 200, stops the process (SIGTERM, then kill)."""
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"{name}.log")
    log = open(log_path, "w")
    proc = subprocess.Popen(["nice", "-n", "10", *cmd], cwd=cwd, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + deadline_s
        while not ready(health):
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {log_path}")
            if time.monotonic() > end:
                raise RuntimeError(f"{name} not ready in {deadline_s:.0f}s; see {log_path}")
            time.sleep(1)
        print(f"{name} ready ({health}; log {log_path})", flush=True)
        yield log_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
