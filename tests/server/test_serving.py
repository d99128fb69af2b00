"""Serving behaviour of a real server process: concurrency, equality with `moeserve generate`, auth,
the waiting-queue limit, and the engine process dying mid-request."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Iterator

import httpx
import pytest

from tests.server.conftest import API_KEY, REPO, ServerProcess
from tests.server.test_api import metric, sse_events


def _greedy_body(i: int, max_tokens: int = 10) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": f"Question number {i}: what is {i} + {i}?"}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


def test_concurrent_streams_each_get_their_solo_greedy_output(server: ServerProcess, concurrent_streams: int) -> None:
    solo = [httpx.post(server.base + "/v1/chat/completions", json=_greedy_body(i), timeout=120)
            .json()["choices"][0]["message"]["content"] for i in range(concurrent_streams)]

    async def one(client: httpx.AsyncClient, i: int) -> str:
        body = {**_greedy_body(i), "stream": True}
        text = []
        async with client.stream("POST", server.base + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if chunk["choices"]:
                        text.append(chunk["choices"][0]["delta"].get("content") or "")
        return "".join(text)

    async def all_of_them() -> list[str]:
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(concurrent_streams)))

    assert asyncio.run(all_of_them()) == solo


def test_greedy_output_equals_moeserve_generate(server: ServerProcess, tiny_model_dir: str) -> None:
    prompt = "Write one line about rivers."
    out = subprocess.run(
        # one sequence, a short context and a quarter of the experts resident (offloaded output is
        # bit-identical to resident, tests/engine/test_offload_exact.py): little memory beside the server
        [sys.executable, "-m", "moeserve.cli", "generate", "--model", tiny_model_dir, "--prompt", prompt,
         "--chat", "--max-tokens", "12", "--ignore-eos", "--json", "--max-batch", "1",
         "--context-length", "1024", "--expert-budget", "25%"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    want = json.loads(out.stdout.strip().splitlines()[-1])
    got = httpx.post(server.base + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": prompt}], "max_tokens": 12, "temperature": 0,
        # the server's defaults come from the model's generation_config.json (the built-in
        # model's: repetition penalty 1.1); `moeserve generate` runs with 1.0
        "repetition_penalty": 1.0, "ignore_eos": True}).json()
    assert got["choices"][0]["message"]["content"] == want["text"]
    assert got["usage"]["prompt_tokens"] == len(want["prompt_token_ids"])
    assert got["usage"]["completion_tokens"] == len(want["token_ids"])


def test_metrics_export_the_expert_cache(server: ServerProcess) -> None:
    before = metric(server, "moeserve_expert_cache_misses_total")
    httpx.post(server.base + "/v1/chat/completions", json=_greedy_body(99, 6), timeout=120)
    assert metric(server, "moeserve_expert_cache_misses_total") > before     # half the experts fit
    assert metric(server, "moeserve_expert_cache_allocated_bytes") <= metric(
        server, "moeserve_expert_cache_budget_bytes")
    text = httpx.get(server.base + "/metrics", timeout=30).text
    layers = re.findall(r'^moeserve_expert_cache_layer_hits_total\{layer="(\d+)"\} ', text, re.M)
    assert layers == ["0", "1"]
    assert "# TYPE moeserve_expert_cache_layer_hits_total counter" in text


def test_api_key_required_except_health_and_preflight(auth_server: ServerProcess) -> None:
    url = auth_server.base + "/v1/models"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + API_KEY}):
        r = httpx.get(url, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url, headers=auth_server.headers).status_code == 200
    assert httpx.get(auth_server.base + "/health").status_code == 200
    pre = httpx.options(auth_server.base + "/v1/chat/completions", headers={
        "Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 200
    r = httpx.post(auth_server.base + "/v1/chat/completions", headers=auth_server.headers, timeout=120,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text


@pytest.fixture
def single_slot_server(tiny_model_dir: str, tmp_path: str) -> Iterator[ServerProcess]:
    """One request decodes at a time and one may wait: the queue limit and restarts are visible."""
    with ServerProcess(tiny_model_dir, str(tmp_path / "server.log"),
                       extra=("--max-batch", "1", "--max-queue", "1")) as srv:
        yield srv


def _long_stream(srv: ServerProcess) -> tuple[httpx.Client, httpx.Response]:
    client = httpx.Client(timeout=120)
    req = client.build_request("POST", srv.base + "/v1/completions", json={
        "prompt": [5, 6, 7, 8], "max_tokens": 240, "temperature": 0, "ignore_eos": True,
        "stream": True})
    resp = client.send(req, stream=True)
    assert resp.status_code == 200
    return client, resp


def _wait_queue_depth(srv: ServerProcess, depth: int) -> None:
    deadline = time.monotonic() + 60
    while metric(srv, "moeserve_queue_depth") != depth:
        assert time.monotonic() < deadline, f"queue depth never reached {depth}"
        time.sleep(0.05)


def test_full_queue_answers_429_then_engine_death_fails_in_flight_and_restarts(
        single_slot_server: ServerProcess) -> None:
    srv = single_slot_server
    client, running = _long_stream(srv)            # occupies the only batch slot
    lines = running.iter_lines()
    assert next(lines).startswith("data: ")
    engine = srv.engine_pid()
    # frozen, the engine cannot finish the long stream and free the slot while the queue fills (a
    # fast machine decodes its 240 tokens in well under a second); the queue is the front end's
    os.kill(engine, signal.SIGSTOP)
    waiting: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: waiting.setdefault("r", httpx.post(
        srv.base + "/v1/completions", timeout=120,
        json={"prompt": "queued", "max_tokens": 5, "temperature": 0})))
    t.start()
    _wait_queue_depth(srv, 1)
    full = httpx.post(srv.base + "/v1/completions", json={"prompt": "one too many", "max_tokens": 2})
    assert full.status_code == 429 and "retry-after" in full.headers
    assert full.json()["error"]["type"] == "rate_limit_error"

    os.kill(engine, signal.SIGKILL)                # the engine dies with both requests in flight
    t.join(timeout=60)
    assert waiting["r"].status_code == 500 and waiting["r"].json()["error"]["type"] == "server_error"
    rest = [line for line in lines if line.startswith("data: ")]
    assert rest and "error" in json.loads(rest[-1][6:])   # the stream ends with an SSE error event
    running.close()
    client.close()
    # the engine process just died; a fresh one needs seconds to import torch and load the model
    assert httpx.get(srv.base + "/health").status_code == 503
    srv.wait_ready(deadline_s=30)                  # service is back within 30 s...
    for i in range(5):                             # ...and then every request succeeds
        again = httpx.post(srv.base + "/v1/completions", timeout=120,
                           json={"prompt": f"after restart {i}", "max_tokens": 3, "temperature": 0})
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] >= 1
    assert "starting a new engine" in srv.log() and "engine restarted" in srv.log()


def test_server_modules_do_not_import_torch() -> None:
    code = ("import sys, server.main, server.app, server.openai_routes, engine.client; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert out.returncode == 0, out.stderr
