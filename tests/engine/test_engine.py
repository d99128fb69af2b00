"""Engine behaviour on a tiny Mixtral: batching, aborts, limits, sampling."""
from __future__ import annotations

import pytest
import torch

from cache.provider import ResidentExpertProvider
from engine.engine import Engine, run_to_completion
from engine.loader import LoadedModel, load_model
from engine.protocol import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, GenerateRequest, SamplingParams
from tests.tiny import make_tiny_mixtral

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = make_tiny_mixtral(str(tmp_path_factory.mktemp("mix")))
    return load_model(path, torch.device("cpu"), torch.float32, context_length=64)


@pytest.fixture(scope="module")
def engine(lm: LoadedModel) -> Engine:
    eng = Engine(lm, ResidentExpertProvider(lm.experts, lm.device, lm.dtype), max_batch=3)
    yield eng
    eng.close()


def test_chunked_prompt_passes_match_one_pass(lm: LoadedModel, engine: Engine) -> None:
    """A prompt read in chunks of 16 gives the tokens and (to fp32 rounding) the logprobs of one
    prompt pass, and a running stream gets a token after every chunk of a long prompt."""
    chunked = Engine(lm, ResidentExpertProvider(lm.experts, lm.device, lm.dtype), max_batch=3,
                     prefill_chunk=16)
    try:
        long_prompt = tuple(range(3, 43))                               # 40 tokens: 3 chunks
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=True)
        want = run_to_completion(engine, [GenerateRequest("w", long_prompt, params)])["w"]
        got = run_to_completion(chunked, [GenerateRequest("g", long_prompt, params)])["g"]
        assert got.token_ids == want.token_ids
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)

        chunked.add_request(GenerateRequest("run", (5, 6, 7), GREEDY))
        chunked.step()                                                  # "run" reads its prompt
        fresh = long_prompt[::-1]           # shares no prefix with what the slots hold
        chunked.add_request(GenerateRequest("long", fresh, GREEDY))
        per_step: list[list] = []
        while not any(d.request_id == "long" and d.token_ids for d in (per_step or [[]])[-1]):
            per_step.append(chunked.step())
        assert len(per_step) == 3                                       # one step per chunk
        assert all(any(d.request_id == "run" and d.token_ids for d in s) for s in per_step)
        while chunked.has_work():
            chunked.step()
    finally:
        chunked.close()


def test_first_admitted_request_answers_first(engine: Engine) -> None:
    for i, p in enumerate([(5, 6, 7, 8), (9, 10), (11, 12, 13)]):
        engine.add_request(GenerateRequest(f"q{i}", p, GREEDY))
    first_token_step: dict[str, int] = {}
    step = 0
    while engine.has_work():
        for d in engine.step():
            if d.token_ids:
                first_token_step.setdefault(d.request_id, step)
        step += 1
    assert first_token_step["q0"] < first_token_step["q1"] < first_token_step["q2"]


def gen(engine: Engine, prompt: list[int], params: SamplingParams = GREEDY, rid: str = "r") -> list[int]:
    return run_to_completion(engine, [GenerateRequest(rid, tuple(prompt), params)])[rid].token_ids


def test_more_requests_than_slots_each_get_their_solo_output(engine: Engine) -> None:
    prompts = [[5, 6, 7], [9], [10, 11, 12, 13, 14], [3, 3], [40, 41, 42, 43]]
    solo = [gen(engine, p) for p in prompts]
    together = run_to_completion(engine, [GenerateRequest(str(i), tuple(p), GREEDY)
                                          for i, p in enumerate(prompts)])
    assert [together[str(i)].token_ids for i in range(len(prompts))] == solo
    assert engine.stats().running == 0 and len(engine.slots) == 3


def test_request_joining_mid_decode_matches_solo(engine: Engine) -> None:
    first, late = [7, 8, 9], [20, 21]
    want_first, want_late = gen(engine, first), gen(engine, late)
    engine.add_request(GenerateRequest("a", tuple(first), GREEDY))
    got: dict[str, list[int]] = {"a": [], "b": []}
    steps = 0
    while engine.has_work():
        if steps == 4:
            engine.add_request(GenerateRequest("b", tuple(late), GREEDY))
        for d in engine.step():
            got[d.request_id].extend(d.token_ids)
        steps += 1
    assert got == {"a": want_first, "b": want_late}


def test_abort_frees_the_slot_and_reports_abort(engine: Engine) -> None:
    engine.add_request(GenerateRequest("x", (1, 2, 3), SamplingParams(max_tokens=50, temperature=0.0,
                                                                        ignore_eos=True)))
    engine.step()
    engine.abort("x")
    deltas = engine.step()
    assert [(d.request_id, d.finished, d.finish_reason) for d in deltas] == [("x", True, FINISH_ABORT)]
    assert not engine.has_work() and len(engine.slots) == 3
    assert engine.stats().requests_aborted >= 1


def test_stop_token_and_max_tokens(engine: Engine) -> None:
    out = gen(engine, [5, 6, 7])
    stop_at = out[3]
    res = run_to_completion(engine, [GenerateRequest("s", (5, 6, 7), SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=(stop_at,)))])["s"]
    assert res.finish_reason == FINISH_STOP and res.token_ids == out[:out.index(stop_at) + 1]
    res = run_to_completion(engine, [GenerateRequest("m", (5, 6, 7), SamplingParams(
        max_tokens=5, temperature=0.0, ignore_eos=True))])["m"]
    assert res.finish_reason == FINISH_LENGTH and res.token_ids == out[:5]


def test_context_end_gives_length(engine: Engine) -> None:
    res = run_to_completion(engine, [GenerateRequest("c", tuple(range(3, 63)), SamplingParams(
        max_tokens=100, temperature=0.0, ignore_eos=True))])["c"]
    assert res.finish_reason == FINISH_LENGTH and len(res.token_ids) == 4   # 60 + 4 = context 64


@pytest.mark.parametrize("prompt,msg", [((), "empty"), (tuple(range(64)), "context"),
                                        ((1, 999), "vocabulary")])
def test_bad_prompts_are_rejected_with_a_reason(engine: Engine, prompt: tuple, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        engine.add_request(GenerateRequest("bad", prompt, GREEDY))
    assert not engine.has_work()


def test_seeded_sampling_is_reproducible_and_seed_dependent(engine: Engine) -> None:
    def sampled(seed: int) -> list[int]:
        return gen(engine, [5, 6], SamplingParams(max_tokens=24, temperature=5.0, seed=seed,
                                                  ignore_eos=True))
    assert sampled(1) == sampled(1)
    assert sampled(1) != sampled(2)


def test_top_k_one_is_greedy_and_logit_bias_forces_a_token(engine: Engine) -> None:
    greedy = gen(engine, [5, 6])
    assert gen(engine, [5, 6], SamplingParams(max_tokens=12, temperature=1.0, top_k=1, seed=3,
                                              ignore_eos=True)) == greedy
    forced = gen(engine, [5, 6], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                                                logit_bias=((77, 100.0),)))
    assert forced == [77] * 6


def test_greedy_logprobs_are_the_top_alternative(engine: Engine) -> None:
    engine.add_request(GenerateRequest("lp", (5, 6), SamplingParams(
        max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=3)))
    deltas = [d for _ in range(4) for d in engine.step()]
    assert len(deltas) == 4
    for d in deltas:
        (tok,), (lp,), (top,) = d.token_ids, d.logprobs, d.top_logprobs
        assert lp <= 0.0 and len(top) == 3
        assert top[0][0] == tok and top[0][1] == pytest.approx(lp)
        assert top[0][1] >= top[1][1] >= top[2][1]


def test_penalties_change_repetitive_output(engine: Engine) -> None:
    plain = gen(engine, [5, 6], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    penal = gen(engine, [5, 6], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                               frequency_penalty=2.0, presence_penalty=2.0))
    assert max(plain.count(t) for t in plain) > 2          # the tiny model repeats itself...
    assert penal != plain                                  # ...and the penalties change that
    assert max(penal.count(t) for t in penal) < max(plain.count(t) for t in plain)


def test_non_finite_logits_fail_only_their_request(engine: Engine) -> None:
    """A repetition_penalty of 1e-300 makes one row's logits +inf: that request alone ends with an
    error; the others in the same decode batch get exactly their solo tokens (issue 13, #1)."""
    innocent = [[5, 6, 7], [9, 10]]
    solo = [gen(engine, p) for p in innocent]
    bad = SamplingParams(max_tokens=12, temperature=1.0, seed=1, repetition_penalty=1e-300,
                         ignore_eos=True)
    reqs = [GenerateRequest("a", tuple(innocent[0]), GREEDY), GenerateRequest("bad", (3, 4), bad),
            GenerateRequest("b", tuple(innocent[1]), GREEDY)]
    for r in reqs:
        engine.add_request(r)
    got: dict[str, list[int]] = {"a": [], "b": [], "bad": []}
    ends: dict[str, object] = {}
    while engine.has_work():
        for d in engine.step():
            got[d.request_id].extend(d.token_ids)
            if d.finished:
                ends[d.request_id] = (d.finish_reason, d.error)
    assert [got["a"], got["b"]] == solo
    assert ends["a"][0] == ends["b"][0] == FINISH_LENGTH
    reason, error = ends["bad"]
    assert reason == "error" and "inf" in error and got["bad"] == []
    assert engine.stats().running == 0 and len(engine.slots) == 3


def test_logit_bias_ids_outside_the_vocabulary_are_rejected(engine: Engine) -> None:
    vocab = engine.model_info.vocab_size
    with pytest.raises(ValueError, match="logit_bias token id"):
        engine.add_request(GenerateRequest("oov", (1, 2), SamplingParams(
            max_tokens=2, logit_bias=((vocab, 5.0),))))


def test_greedy_fast_path_flags_exactly_the_unusable_rows() -> None:
    """Plain greedy rows are checked through their sums: NaN, +inf or nothing finite fails the
    row alone; a -inf entry or finite logits whose sum overflows are sampled as usual."""
    from engine.sampling import SamplerState, sample
    logits = torch.randn(6, 50)
    logits[0, 3] = float("nan")
    logits[1, 7] = float("inf")
    logits[2] = float("-inf")
    logits[3, 0] = float("-inf")                     # a masked token: still a usable row
    logits[4] = 3e38                                 # finite, but the row's sum overflows
    logits[4, 9] = 3.3e38
    states = [SamplerState(GREEDY, (1,)) for _ in range(6)]
    got = sample(logits, states)
    assert [c.error is not None for c in got] == [True, True, True, False, False, False]
    assert "NaN" in got[0].error and "+inf" in got[1].error and "finite" in got[2].error
    assert got[3].token == int(torch.argmax(logits[3])) and got[4].token == 9
    assert got[5].token == int(torch.argmax(logits[5]))
