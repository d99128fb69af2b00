"""EngineClient implementations driving a real tiny engine: deltas, rejections, aborts, stats."""
from __future__ import annotations

import asyncio

import pytest

from configs import CacheConfig, EngineConfig
from engine.client import (EngineClient, InProcessEngineClient, LazyFactory, ProcessEngineClient,
                           RequestRejected)
from engine.protocol import GenerateRequest, SamplingParams
from tests.tiny import make_tiny_mixtral

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> LazyFactory:
    path = make_tiny_mixtral(str(tmp_path_factory.mktemp("mix")))
    return LazyFactory("moeserve.wiring:build_engine", EngineConfig(model=path, threads=1),
                       CacheConfig(), progress=False)


async def _tokens(client: EngineClient, rid: str, prompt: tuple[int, ...]) -> list[int]:
    out: list[int] = []
    async for d in client.submit(GenerateRequest(rid, prompt, GREEDY)):
        out.extend(d.token_ids)
        if d.finished:
            assert d.finish_reason == "length"
    return out


async def _exercise(client: EngineClient) -> None:
    await client.start()
    try:
        assert client.ready and client.model_info.vocab_size == 128
        solo = await _tokens(client, "a", (5, 6, 7))
        assert len(solo) == 6
        together = await asyncio.gather(_tokens(client, "b", (5, 6, 7)), _tokens(client, "c", (9, 9)))
        assert together[0] == solo
        with pytest.raises(RequestRejected, match="vocabulary"):
            await _tokens(client, "bad", (5, 999))
        stream = client.submit(GenerateRequest("long", (1, 2), SamplingParams(
            max_tokens=200, temperature=0.0, ignore_eos=True)))
        await stream.__anext__()
        stream.close()   # the consumer goes away: the engine request is aborted
        for _ in range(200):   # bounded: each stats() round trip waits for the engine loop
            if (await client.stats()).requests_aborted == 1:
                break
        stats = await client.stats()
        assert stats.requests_aborted == 1 and stats.running == 0
        assert client.in_flight == 0 and client.queue_depth == 0
    finally:
        await client.close()
    assert not client.ready


def test_in_process_client(factory: LazyFactory) -> None:
    asyncio.run(_exercise(InProcessEngineClient(factory)))


def test_process_client(factory: LazyFactory) -> None:
    client = ProcessEngineClient(factory)
    asyncio.run(_exercise(client))
    assert client.pid is None
