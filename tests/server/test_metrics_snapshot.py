"""/metrics is served from the snapshot the engine loop publishes, so a scrape never waits for a
long engine step (it waited 25 s behind a long prompt pass). The engine here is the real one on
the tiny model; only its step is held at a gate to make the long pass deterministic."""
from __future__ import annotations

import asyncio
import threading
import time

import httpx
import torch

from cache.provider import ResidentExpertProvider
from configs import ServerConfig
from engine.client import InProcessEngineClient
from engine.engine import Engine
from engine.loader import load_model
from engine.protocol import TokenDelta
from server.app import create_app
from server.tokenizer import TextTokenizer


class GatedEngine(Engine):
    """The real engine whose step waits while the gate is closed (a pass that takes long)."""

    gate = threading.Event()
    in_step = threading.Event()

    def step(self) -> list[TokenDelta]:
        self.in_step.set()
        self.gate.wait(60)
        return super().step()


def test_metrics_answer_while_the_engine_is_inside_a_long_step(tiny_model_dir: str) -> None:
    def factory() -> Engine:
        lm = load_model(tiny_model_dir, torch.device("cpu"), torch.float32)
        return GatedEngine(lm, ResidentExpertProvider(lm.experts, lm.device, lm.dtype), max_batch=2)

    async def scenario() -> None:
        client = InProcessEngineClient(factory)
        await client.start()
        app = create_app(ServerConfig(), client, TextTokenizer(tiny_model_dir), "tiny")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            deadline = time.monotonic() + 10   # the first snapshot follows the Ready message
            while "moeserve_engine_steps_total 0" not in (await http.get("/metrics")).text:
                assert time.monotonic() < deadline, "no snapshot published at start"
                await asyncio.sleep(0.02)
            gen = asyncio.ensure_future(http.post("/v1/completions", json={
                "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0, "ignore_eos": True}))
            while not GatedEngine.in_step.is_set():   # the engine loop is now inside step()
                await asyncio.sleep(0.01)
            t = time.perf_counter()
            scrape = await asyncio.wait_for(http.get("/metrics"), 5)
            assert time.perf_counter() - t < 0.5 and scrape.status_code == 200
            assert "moeserve_requests_in_flight 1" in scrape.text
            GatedEngine.gate.set()
            assert (await gen).status_code == 200
            deadline = time.monotonic() + 10
            while "moeserve_engine_steps_total 3" not in (await http.get("/metrics")).text:
                assert time.monotonic() < deadline, "the snapshot never caught up"
                await asyncio.sleep(0.02)
        await client.close()

    asyncio.run(scenario())
