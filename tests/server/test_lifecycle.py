"""Issue 13 regressions about processes and files: the engine dies with the server, no engine is
a non-zero exit, shutdown ends streams with an error event, and trace files are never lost."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from typing import Iterator

import httpx
import psutil
import pytest

from tests.server.conftest import ServerProcess
from tests.server.test_api import sse_events

KEY = "clé-ünïcødé-🔑"


def _wait_exit(srv: ServerProcess, deadline_s: float) -> int:
    try:
        return srv.proc.wait(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"server still running after {deadline_s}s:\n{srv.log()}") from None


def _gone(pids: list[int], deadline_s: float) -> list[int]:
    end = time.monotonic() + deadline_s
    alive = pids
    while alive and time.monotonic() < end:
        alive = [p for p in alive if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.05)   # polling interval, bounded by the deadline
    return alive


def test_kill_9_of_the_server_leaves_no_process(tiny_model_dir: str, tmp_path: str) -> None:
    srv = ServerProcess(tiny_model_dir, str(tmp_path / "server.log"))
    try:
        srv.wait_ready()
        children = [c.pid for c in psutil.Process(srv.proc.pid).children(recursive=True)]
        assert srv.engine_pid() in children
        srv.proc.kill()
        srv.proc.wait()
        assert _gone(children, 2.0) == [], "the engine (or a helper) outlived its server"
    finally:
        srv.stop()


def test_engine_that_cannot_start_exits_3_naming_the_file(tiny_model_dir: str, tmp_path: str) -> None:
    bad = tmp_path / "trace.jsonl"
    bad.write_bytes(b"\xff\xfe\x00binary, not a trace\n")
    srv = ServerProcess(tiny_model_dir, str(tmp_path / "server.log"),
                        extra=("--record-trace", str(bad)))
    try:
        assert _wait_exit(srv, 120) == 3
        log = srv.log()
        assert f"--record-trace {bad}" in log and "UnicodeDecodeError" not in log.splitlines()[-1]
    finally:
        srv.stop()


def test_engine_that_cannot_be_restarted_is_a_failure_and_exit_4(
        tiny_model_dir: str, tmp_path: str) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for name in os.listdir(tiny_model_dir):
        os.link(os.path.join(tiny_model_dir, name), model / name)
    srv = ServerProcess(str(model), str(tmp_path / "server.log"))
    try:
        srv.wait_ready()
        for name in os.listdir(model):   # the weights vanish: every restart fails
            if name.endswith(".safetensors"):
                os.unlink(model / name)
        os.kill(srv.engine_pid(), signal.SIGKILL)
        seen = set()
        end = time.monotonic() + 120
        while srv.proc.poll() is None and time.monotonic() < end:
            try:
                r = httpx.get(srv.base + "/health", timeout=5)
                seen.add(r.json()["status"])
                assert r.status_code == 503 or r.json()["status"] == "ok"
            except httpx.TransportError:
                pass
            time.sleep(0.1)   # polling interval
        assert _wait_exit(srv, 10) == 4
        assert "restarting" in seen and "loading" not in seen, seen
        assert "could not be restarted" in srv.log()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def exposed(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Bound to every interface, with a UTF-8 API key, explicit CORS and Host lists, no shutdown
    grace, and a --trace-store that is a foreign 5,000-byte file of mode 0644."""
    d = tmp_path_factory.mktemp("exposed")
    store = d / "store.json"
    store.write_bytes(b"#" * 5000)
    os.chmod(store, 0o644)
    srv = ServerProcess(tiny_model_dir, str(d / "server.log"), api_key=KEY, extra=(
        "--host", "0.0.0.0", "--cors-origins", "https://app.example", "--allowed-hosts", "my.box",
        "--shutdown-grace", "0", "--policy", "auto", "--expert-budget", "50%",
        "--trace-store", str(store)))
    srv.store = store   # type: ignore[attr-defined]
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _get(srv: ServerProcess, path: str, **headers: str) -> httpx.Response:
    h = {"Authorization": b"Bearer " + KEY.encode()} | headers
    return httpx.get(srv.base + path, headers=h, timeout=30)


def test_exposed_binding_warns_and_uses_the_configured_lists(exposed: ServerProcess) -> None:
    assert "without an API key" not in exposed.log()   # it has one
    assert _get(exposed, "/v1/models").status_code == 200                 # UTF-8 key matches
    assert httpx.get(exposed.base + "/v1/models", headers={
        "Authorization": b"Bearer " + KEY.encode()[:-1]}).status_code == 401
    assert _get(exposed, "/v1/models", Host="my.box:8000").status_code == 200
    assert _get(exposed, "/v1/models", Host="other.box").status_code == 403
    assert _get(exposed, "/v1/models", Origin="https://app.example").status_code == 200
    assert _get(exposed, "/v1/models", Origin="http://localhost:3000").status_code == 403


def test_openapi_is_behind_the_api_key(exposed: ServerProcess) -> None:
    assert httpx.get(exposed.base + "/openapi.json").status_code == 401
    assert "/v1/completions" in _get(exposed, "/openapi.json").json()["paths"]


def test_foreign_trace_store_is_moved_aside_with_its_mode(exposed: ServerProcess) -> None:
    store = exposed.store   # type: ignore[attr-defined]
    aside = [p for p in os.listdir(store.parent) if p.startswith("store.json.corrupt-")]
    assert len(aside) == 1, os.listdir(store.parent)
    moved = store.parent / aside[0]
    assert moved.read_bytes() == b"#" * 5000 and stat.S_IMODE(moved.stat().st_mode) == 0o644
    assert "moved it aside" in exposed.log() and aside[0] in exposed.log()


def test_warning_when_exposed_without_a_key(tiny_model_dir: str, tmp_path: str) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)   # a bare RecursionError at start, before
    srv = ServerProcess(tiny_model_dir, str(tmp_path / "server.log"), extra=(
        "--host", "0.0.0.0", "--policy", "auto", "--expert-budget", "50%",
        "--trace-store", str(deep)))
    try:
        srv.wait_ready()
        assert "without an API key" in srv.log() and "nested too deeply" in srv.log()
        assert not deep.exists() and any(p.startswith("deep.json.corrupt-") for p in os.listdir(tmp_path))
    finally:
        srv.stop()


def test_shutdown_ends_open_streams_with_an_error_event(exposed: ServerProcess) -> None:
    body = {"prompt": [5, 6, 7], "max_tokens": 250, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", exposed.base + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": b"Bearer " + KEY.encode()}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        exposed.proc.send_signal(signal.SIGTERM)
        events = [json.loads(x[6:]) if x != "data: [DONE]" else x
                  for x in lines if x.startswith("data: ")]
    assert events and isinstance(events[-1], dict) and events[-1]["error"]["code"] == "shutting_down"
    # uvicorn re-raises the signal once shut down: the conventional "terminated by SIGTERM"
    assert _wait_exit(exposed, 30) in (0, -signal.SIGTERM)
    assert "leaked semaphore" not in exposed.log() and "Traceback" not in exposed.log()
