"""Offloaded generation equals all-resident generation, token for token and logprob for logprob,
for every policy and budgets down to one layer's top-k (issue 5), built the way the CLI builds it
(moeserve.wiring.make_provider)."""
from __future__ import annotations

import json

import pytest
import torch

from cache.offload import OffloadedExpertProvider
from cache.policies import POLICY_NAMES
from cache.provider import expert_format
from configs import CacheConfig
from engine.engine import Engine, run_to_completion
from engine.loader import LoadedModel, load_model
from engine.protocol import GenerateRequest, SamplingParams
from moeserve.wiring import make_provider
from tests.engine.tiny_families import FamilyCheckpoint, engine_dir

PROMPTS = [(5, 6, 7, 8, 9, 10, 11), (12,), (20, 21, 22, 23)]
PARAMS = [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=3),
          SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True, logprobs=True),
          SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=True)]


def generate(lm: LoadedModel, ccfg: CacheConfig) -> tuple[dict[str, tuple], dict[str, float]]:
    """Three requests in one batch; returns per request (tokens, logprobs) and the cache stats."""
    eng = Engine(lm, make_provider(lm, ccfg, progress=False), max_batch=3)
    try:
        reqs = [GenerateRequest(str(i), p, s) for i, (p, s) in enumerate(zip(PROMPTS, PARAMS))]
        out = run_to_completion(eng, reqs)
        return ({r: (o.token_ids, o.logprobs) for r, o in out.items()},
                eng.stats().cache)
    finally:
        eng.close()


def one_layer_top_k_bytes(lm: LoadedModel) -> int:
    return lm.info.top_k * expert_format(lm.experts, lm.dtype).slot_bytes


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v2_grouped", "deepseek_v3", "glm4_moe",
                                    "ernie4_5_moe", "gpt_oss", "qwen3_next", "qwen3_5_moe_text", "minimax_m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offloaded_equals_resident(family_checkpoint: FamilyCheckpoint, family: str,
                                   dtype: torch.dtype) -> None:
    lm = load_model(engine_dir(family_checkpoint(family, torch.bfloat16)), torch.device("cpu"), dtype,
                    context_length=64)
    want, _ = generate(lm, CacheConfig())
    tight = str(one_layer_top_k_bytes(lm))
    for policy in POLICY_NAMES:
        for budget in (tight, "50%"):
            got, stats = generate(lm, CacheConfig(expert_budget=budget, policy=policy, prefetch="on"))
            assert got == want, (policy, budget)
            assert stats["allocated_bytes"] <= stats["budget_bytes"]
            assert stats["misses"] > 0                  # the cache really was in the way


def test_budget_of_every_expert_is_the_resident_path(family_checkpoint: FamilyCheckpoint) -> None:
    from cache.provider import ResidentExpertProvider
    from moeserve.wiring import expert_bytes
    lm = load_model(family_checkpoint("mixtral", torch.float32), torch.device("cpu"), torch.float32,
                    context_length=64)
    for budget in ("all", "100%", str(expert_bytes(lm)), "1TiB"):
        p = make_provider(lm, CacheConfig(expert_budget=budget), progress=False)
        assert isinstance(p, ResidentExpertProvider), budget
        p.close()
    p = make_provider(lm, CacheConfig(expert_budget=str(expert_bytes(lm) - 1)), progress=False)
    assert isinstance(p, OffloadedExpertProvider)
    p.close()


def test_budget_below_one_layer_top_k_is_refused(family_checkpoint: FamilyCheckpoint) -> None:
    lm = load_model(family_checkpoint("mixtral", torch.float32), torch.device("cpu"), torch.float32,
                    context_length=64)
    with pytest.raises(ValueError, match="expert_budget"):
        make_provider(lm, CacheConfig(expert_budget=str(one_layer_top_k_bytes(lm) - 1)), progress=False)


def test_trace_store_and_record_trace(family_checkpoint: FamilyCheckpoint, tmp_path) -> None:
    """The collection survives a restart through --trace-store; --record-trace appends moe-trace v2;
    a corrupt store is reported and ignored."""
    lm = load_model(family_checkpoint("mixtral", torch.float32), torch.device("cpu"), torch.float32,
                    context_length=64)
    store, trace = str(tmp_path / "store.json"), str(tmp_path / "trace.jsonl")
    ccfg = CacheConfig(expert_budget="50%", policy="auto", trace_store=store, record_trace=trace)
    generate(lm, ccfg)
    with open(store) as f:
        assert len(json.load(f)["matrices"]) == len(PROMPTS)
    with open(trace) as f:
        lines = [json.loads(line) for line in f]
    assert lines[0]["format"] == "moe-trace" and len(lines) == 1 + len(PROMPTS)
    # v2: the look-ahead is the next layer's top-k, one entry per token and MoE layer but the last
    assert lines[0]["version"] == 2 and lines[0]["expert_bytes"] == one_layer_top_k_bytes(lm) // lm.info.top_k
    L, k = lm.info.num_moe_layers, lm.info.top_k
    for req in lines[1:]:
        ahead = req["lookahead"]
        assert len(ahead) == len(req["tokens"]) and all(len(t) == L - 1 for t in ahead)
        assert all(len(a) == k and len(set(a)) == k for t in ahead for a in t)
    provider = make_provider(lm, ccfg, progress=False)
    assert isinstance(provider, OffloadedExpertProvider)
    assert len(provider.policy.collection) == len(PROMPTS)
    provider.close()

    with open(store, "w") as f:
        f.write("{not json")
    provider = make_provider(lm, ccfg, progress=False)
    assert len(provider.policy.collection) == 0
    provider.close()


@pytest.mark.slow
def test_default_model_offloaded_equals_resident() -> None:
    """The built-in default model (bf16 on disk, fp32 compute), two chat prompts decoded together,
    with room for one layer's top-k only: every expert use comes from disk. The two predicting
    policies (each policy is checked on every family's tiny model above)."""
    from convert.default_model import ensure_default_model
    from server.tokenizer import TextTokenizer
    path = ensure_default_model(progress=False)
    tok = TextTokenizer(path)
    prompts = [tuple(tok.encode_chat([{"role": "user", "content": q}]))
               for q in ("What is the capital of France?", "Name three colours.")]
    lm = load_model(path, torch.device("cpu"), torch.float32, context_length=256)

    def run(ccfg: CacheConfig) -> dict[str, tuple]:
        eng = Engine(lm, make_provider(lm, ccfg, progress=False), max_batch=2)
        try:
            out = run_to_completion(eng, [GenerateRequest(str(i), p, SamplingParams(
                max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=True))
                for i, p in enumerate(prompts)])
            return {r: (o.token_ids, o.logprobs) for r, o in out.items()}
        finally:
            eng.close()

    want = run(CacheConfig())
    assert "Paris" in tok.decode(want["0"][0])
    for policy in ("moe-infinity", "auto"):
        assert run(CacheConfig(expert_budget=str(one_layer_top_k_bytes(lm)), policy=policy,
                               prefetch="on")) == want, policy


# qwen2_moe: q/k/v biases and a shared expert (its one-output gate stays); deepseek_v3: MLA
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_dense_int4_offloaded_equals_resident(family_checkpoint: FamilyCheckpoint, family: str) -> None:
    """--dense-quantize int4: the dense layers (not the routers, not the LM head) in int4;
    offloading still gives the resident tokens and logprobs exactly."""
    from engine.kernels import QuantLinear
    lm = load_model(family_checkpoint(family, torch.bfloat16), torch.device("cpu"), torch.bfloat16,
                    context_length=64, dense_quantize="int4")
    quantized = [m for m in lm.model.modules() if isinstance(m, QuantLinear)]
    assert quantized and not any(m.weight is r for m in quantized for r in lm.model.routers())
    assert not isinstance(lm.model.lm_head, QuantLinear)            # the LM head stays
    want, _ = generate(lm, CacheConfig())
    got, stats = generate(lm, CacheConfig(expert_budget=str(one_layer_top_k_bytes(lm)), prefetch="on"))
    assert got == want and stats["misses"] > 0
