"""Qwen3-Next's hybrid layers against transformers beyond the family tests' short prompts: a
prompt of several delta-rule chunks, prompts split into engine chunks (the linear layers' state
carried from one to the next), and slots reused by a later request (its state starts from zero)."""
from __future__ import annotations

import dataclasses

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


def reference(ref, prompt: tuple[int, ...]) -> list[int]:
    return ref.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20,
                        do_sample=False, eos_token_id=None)[0, len(prompt):].tolist()


@pytest.mark.parametrize("chunk", [2, 48, 64, 256])
def test_prompt_chunks_and_reused_slots_give_transformers_tokens(case, chunk: int) -> None:
    """Prompt chunks shorter than the conv window (2 < K - 1 = 3: the window spans chunks), of
    the rule's size and across it; one slot used by two requests in turn."""
    path, ref = case
    lm = load_model(path, CPU, torch.float32, context_length=256)
    eng = Engine(lm, ResidentExpertProvider(lm.experts, CPU, torch.float32), max_batch=1, prefill_chunk=chunk)
    try:
        first = run_to_completion(eng, [GenerateRequest("a", LONG, GREEDY)])["a"].token_ids
        again = run_to_completion(eng, [GenerateRequest("b", LONG[:40], GREEDY)])["b"].token_ids  # same slot
    finally:
        eng.close()
    assert first == reference(ref, LONG) and again == reference(ref, LONG[:40])
    assert len(set(first)) >= 3


def test_slots_freed_and_reused_while_others_decode(case) -> None:
    """Three requests on two slots: the third takes a freed slot while the other decodes (rows
    gathered and scattered by slot)."""
    path, ref = case
    lm = load_model(path, CPU, torch.float32, context_length=256)
    prompts = [LONG[:30], LONG[30:100], LONG[100:112]]
    eng = Engine(lm, ResidentExpertProvider(lm.experts, CPU, torch.float32), max_batch=2, prefill_chunk=16)
    try:
        reqs = [GenerateRequest(str(i), p, dataclasses.replace(GREEDY, max_tokens=m))
                for i, (p, m) in enumerate(zip(prompts, (6, 20, 20)))]
        res = run_to_completion(eng, reqs)
    finally:
        eng.close()
    assert res["0"].token_ids == reference(ref, prompts[0])[:6]
    assert [res[str(i)].token_ids for i in (1, 2)] == [reference(ref, p) for p in prompts[1:]]


def test_a_state_is_never_continued_out_of_order() -> None:
    """The state of a slot continues only from the position it reached (or restarts at 0)."""
    from engine.models.common import Batch
    from engine.models.linear_state import LinearSpec, LinearStates
    states = LinearStates(LinearSpec((0,), 6, 4, 2, 3, 5), 2, torch.float32, CPU)
    prompt = Batch(torch.arange(0, 7)[None], torch.tensor([1]), 7, single_slot=1, start=0)
    states.read(0, prompt)
    states.write(0, prompt, torch.ones(1, 6, 3), torch.ones(1, 2, 3, 5))
    assert states.reached == [0, 7]
    decode = Batch(torch.tensor([[7]]), torch.tensor([1]), 8, single_slot=1, start=7)
    conv, state = states.read(0, decode)
    assert conv.eq(1).all() and state.eq(1).all()                    # continued
    stale = Batch(torch.tensor([[9]]), torch.tensor([1]), 10, single_slot=1, start=9)
    with pytest.raises(RuntimeError, match="slot 1 .* is at position 7"):
        states.read(0, stale)
    conv, state = states.read(0, prompt)                              # a new sequence: zeros
    assert not conv.any() and not state.any()


def test_qwen3_5_vision_language_checkpoint_serves_its_text_model(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """Qwen3.5 ships as a vision-language model: the text model is read from text_config and
    model.language_model.*, the vision tower is skipped with an info line (not reported unused),
    and the logits are those of transformers' whole model on text input."""
    from tests.engine.tiny_families import COMMON, FAMILIES
    _, text_kwargs, _ = FAMILIES["qwen3_5_moe_text"]
    text = transformers.Qwen3_5MoeTextConfig(**{**COMMON, **text_kwargs})
    cfg = transformers.Qwen3_5MoeConfig(text_config=text.to_dict(), tie_word_embeddings=False,
                                        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64,
                                                           num_heads=2, out_hidden_size=64))
    torch.manual_seed(0)
    ref = transformers.AutoModelForImageTextToText.from_config(cfg).eval()
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if "norm" in name and not param.any():
                param.normal_(0.0, 0.1)
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.4)                    # decisive routing, as the family tests
    ref.save_pretrained(str(tmp_path))
    with caplog.at_level("INFO", logger="moeserve.loader"):
        lm = load_model(str(tmp_path), CPU, torch.float32, context_length=64)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert "under model.visual are not used" in caplog.text
    assert lm.info.num_moe_layers == 3 and len(lm.experts) == 3 * 8
    lm.model.set_provider(ResidentExpertProvider(lm.experts, CPU, torch.float32))
    ours, theirs = prompt_logits(lm, ref, LONG[:30])
    torch.testing.assert_close(ours, theirs, rtol=0.0, atol=1e-5)
    # converted (int8 experts): the text model's tensors only, loadable as it is
    from convert.quantize import ensure_quantized
    out = ensure_quantized(str(tmp_path), "int8", home=str(tmp_path / "home"), progress=False)
    q = load_model(out, CPU, torch.bfloat16, context_length=64)
    assert len(q.experts) == 3 * 8 and q.model.checkpoint_prefix == "model.language_model."


@pytest.mark.parametrize("chunk", [7, 50])
def test_gpt_oss_windows_and_sinks_across_chunks_and_rows(family_checkpoint: FamilyCheckpoint, chunk: int) -> None:
    """gpt-oss's sliding window (4 here) and sinks where the family tests do not reach: a prompt
    longer than one 128-query block, prompt chunks starting past 0, and several sequences
    decoded together (each row its own key range): greedy tokens equal transformers'."""
    from tests.engine.tiny_families import engine_dir
    path = family_checkpoint("gpt_oss", torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    lm = load_model(engine_dir(path), CPU, torch.float32, context_length=256)
    routers = lm.model.lookahead_routers()             # the cache's look-ahead sees the router bias
    assert all(r.bias is layer.mlp.router.bias for r, layer in zip(routers, lm.model.model.layers))
    prompts = [LONG + LONG[:20], LONG[:40], LONG[100:109]]                  # 170, 40 and 9 tokens
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    eng = Engine(lm, ResidentExpertProvider(lm.experts, CPU, torch.float32), max_batch=3, prefill_chunk=chunk)
    try:
        res = run_to_completion(eng, [GenerateRequest(str(i), p, params) for i, p in enumerate(prompts)])
    finally:
        eng.close()
    for i, p in enumerate(prompts):
        theirs = ref.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                              eos_token_id=None)[0, len(p):].tolist()
        assert res[str(i)].token_ids == theirs, i
