"""The opt-in expert stream (issue 16): a watching request's deltas carry its routing and what
the cache did, consistent with the cache's own counters and with a tracer's record of the same
run; requests that don't watch get nothing, and watching changes no token."""
from __future__ import annotations

from typing import Optional

import torch

from cache.trace import ActivationTracer, RequestTrace
from configs import CacheConfig
from engine.engine import Engine
from engine.loader import LoadedModel, load_model
from engine.protocol import GenerateRequest, SamplingParams, TokenDelta
from moeserve.wiring import make_provider
from tests.engine.tiny_families import FamilyCheckpoint

PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [tuple(range(5, 25)), (30, 31, 32)]


class KeepingTracer(ActivationTracer):
    """An ActivationTracer that keeps each finished request's trace."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.done: dict[str, RequestTrace] = {}

    def end_request(self, seq_id: str, aborted: bool = False) -> Optional[RequestTrace]:
        trace = super().end_request(seq_id, aborted)
        if trace is not None:
            self.done[seq_id] = trace
        return trace


def _run(lm: LoadedModel, ccfg: CacheConfig, watch: tuple[bool, ...], chunk: int = 256,
         tracer: ActivationTracer | None = None) -> tuple[dict[str, list[TokenDelta]], dict]:
    provider = make_provider(lm, ccfg, progress=False)
    if tracer is not None:
        provider.tracer = tracer
    eng = Engine(lm, provider, max_batch=2, prefill_chunk=chunk)
    try:
        out: dict[str, list[TokenDelta]] = {}
        for i, (p, w) in enumerate(zip(PROMPTS, watch)):
            eng.add_request(GenerateRequest(str(i), p, PARAMS, watch_experts=w))
            out[str(i)] = []
        while eng.has_work():
            for d in eng.step():
                out[d.request_id].append(d)
        return out, eng.stats().cache
    finally:
        eng.close()


def _tokens(out: dict[str, list[TokenDelta]]) -> dict[str, list[int]]:
    return {r: [t for d in ds for t in d.token_ids] for r, ds in out.items()}


def test_watching_streams_routing_and_cache_events(family_checkpoint: FamilyCheckpoint) -> None:
    lm = load_model(family_checkpoint("mixtral", torch.float32), torch.device("cpu"),
                    torch.float32, context_length=64)
    L, E, k = lm.info.num_moe_layers, lm.info.num_experts, lm.info.top_k
    ccfg = CacheConfig(expert_budget="40%", policy="lru")
    plain, _ = _run(lm, ccfg, (False, False))
    tracer = KeepingTracer(L, E, k)
    # prompt 0 read in 3 chunks: its prompt view merges them
    watched, stats = _run(lm, ccfg, (True, False), chunk=8, tracer=tracer)
    assert _tokens(watched) == _tokens(plain)                # watching changes nothing
    assert all(d.experts is None for d in watched["1"])       # not asked, not sent
    first, *rest = [d for d in watched["0"] if d.token_ids]
    assert first.experts.phase == "prompt" and all(d.experts.phase == "decode" for d in rest)
    assert len(rest) == PARAMS.max_tokens - 1
    # the prompt's counts: every prompt token routed to k experts in every layer
    for layer in first.experts.routed:
        assert sum(n for _, n, _ in layer) == len(PROMPTS[0]) * k
    for d in rest:
        x = d.experts
        assert len(x.routed) == len(x.resident) == L
        for layer, mask in zip(x.routed, x.resident):
            assert len(layer) == k and all(n == 1 for _, n, _ in layer)
            assert {c for _, _, c in layer} <= {"h", "p", "m"}
            for e, _, _ in layer:
                assert 0 <= e < E
        assert x.bytes_read >= 0 and x.stall_seconds >= 0
    # the per-token routing is the tracer's record of the same request
    t = tracer.done["0"]
    decoded = [[sorted(e for e, _, _ in layer) for layer in d.experts.routed] for d in rest]
    assert decoded == [[sorted(layer) for layer in tok] for tok in t.tokens[t.prefill:]]
    prompt_counts = [{e: n for e, n, _ in layer} for layer in first.experts.routed]
    want = [{} for _ in range(L)]
    for tok in t.tokens[:t.prefill]:
        for li, layer in enumerate(tok):
            for e in layer:
                want[li][e] = want[li].get(e, 0) + 1
    assert prompt_counts == want
    # misses seen by the watcher are misses the cache counted; evictions likewise
    seen_miss = sum(c == "m" for d in watched["0"] if d.experts for l in d.experts.routed
                    for _, _, c in l)
    seen_evict = sum(len(d.experts.evicted) for d in watched["0"] if d.experts)
    assert 0 < seen_miss <= stats["misses"]
    assert 0 < seen_evict <= stats["evictions"]
    # a missed expert is resident after its pass (it was loaded), unless the pass evicted it
    for d in rest:
        x = d.experts
        for li, layer in enumerate(x.routed):
            for e, _, c in layer:
                if c == "m" and (li, e) not in x.evicted:
                    assert x.resident[li] >> e & 1


def test_all_resident_server_reports_hits_only(family_checkpoint: FamilyCheckpoint) -> None:
    lm = load_model(family_checkpoint("mixtral", torch.float32), torch.device("cpu"),
                    torch.float32, context_length=64)
    L, E = lm.info.num_moe_layers, lm.info.num_experts
    out, _ = _run(lm, CacheConfig(), (True, True))
    for ds in out.values():
        for d in ds:
            if not d.token_ids:
                continue
            x = d.experts
            assert x.resident == tuple([(1 << E) - 1] * L)
            assert all(c == "h" for layer in x.routed for _, _, c in layer)
            assert x.bytes_read == 0 and x.evicted == () and x.batch in (1, 2)
