"""Qwen3-Next's hybrid layers against transformers beyond the family tests' short prompts: a
prompt of several delta-rule chunks, prompts split into engine chunks (the linear layers' state
carried from one to the next), and slots reused by a later request (its state starts from zero)."""
from __future__ import annotations

import pytest
import torch

from cache.provider import ResidentExpertProvider
from engine.engine import Engine, run_to_completion
from engine.loader import load_model
from engine.models.gated_deltanet import CHUNK, gated_delta_rule
from engine.protocol import GenerateRequest, SamplingParams
from tests.engine.test_families import prompt_logits
from tests.engine.tiny_families import FamilyCheckpoint

transformers = pytest.importorskip("transformers")
CPU = torch.device("cpu")
LONG = tuple((7 * i * i + 3 * i + 11) % 157 + 2 for i in range(150))     # 150 tokens: 3 chunks of 64
GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


def test_chunked_rule_equals_the_recurrence() -> None:
    """The chunked form (prompts) computes what the one-token step (decode) computes token by
    token, from the same initial state, over several chunks."""
    torch.manual_seed(0)
    b, t, hk, hv, dk, dv = 2, 2 * CHUNK + 17, 2, 4, 8, 12
    q, k = torch.randn(b, t, hk, dk), torch.randn(b, t, hk, dk)
    v = torch.randn(b, t, hv, dv)
    g, beta = -torch.rand(b, t, hv), torch.rand(b, t, hv)
    s0 = torch.randn(b, hv, dk, dv)
    got, s_got = gated_delta_rule(q, k, v, g, beta, s0)
    s, outs = s0, []
    for i in range(t):
        o, s = gated_delta_rule(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], g[:, i:i + 1], beta[:, i:i + 1], s)
        outs.append(o)
    torch.testing.assert_close(got, torch.cat(outs, dim=1), rtol=0, atol=1e-5)
    torch.testing.assert_close(s_got, s, rtol=0, atol=1e-5)
    assert s_got.abs().max() > 0.1                       # a state that really carries something


@pytest.fixture(scope="module")
def case(family_checkpoint: FamilyCheckpoint):
    path = family_checkpoint("qwen3_next", torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, ref


def test_long_prompt_logits_match_transformers(case) -> None:
    path, ref = case
    lm = load_model(path, CPU, torch.float32, context_length=256)
    lm.model.set_provider(ResidentExpertProvider(lm.experts, CPU, torch.float32))
    ours, theirs = prompt_logits(lm, ref, LONG, context=256)
    torch.testing.assert_close(ours, theirs, rtol=0.0, atol=1e-5)


@pytest.mark.parametrize("chunk", [48, 64, 256])
def test_prompt_chunks_and_reused_slots_give_transformers_tokens(case, chunk: int) -> None:
    path, ref = case
    lm = load_model(path, CPU, torch.float32, context_length=256)
    eng = Engine(lm, ResidentExpertProvider(lm.experts, CPU, torch.float32), max_batch=1, prefill_chunk=chunk)
    try:
        first = run_to_completion(eng, [GenerateRequest("a", LONG, GREEDY)])["a"].token_ids
        again = run_to_completion(eng, [GenerateRequest("b", LONG[:40], GREEDY)])["b"].token_ids  # same slot
    finally:
        eng.close()
    for prompt, ours in ((LONG, first), (LONG[:40], again)):
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20,
                              do_sample=False, eos_token_id=None)[0, len(prompt):].tolist()
        assert ours == theirs
    assert len(set(first)) >= 3
