"""Prefix caching: a request reads only the prompt tokens after what a free slot holds, and answers
as if it had read the whole prompt (the same seeded tokens, fp32 logprobs within rounding), on
every kind of cache layer: grouped-query attention, MLA, sinks with a sliding window, and linear
attention (whose state cannot go back: a whole held prefix is reused, or the prefix up to a
saved copy of the state)."""
from __future__ import annotations

import dataclasses
from typing import Optional

import pytest
import torch

from cache.provider import ResidentExpertProvider
from engine.engine import SAVE_MARGIN, Engine, run_to_completion
from engine.loader import LoadedModel, load_model
from engine.protocol import FINISH_ERROR, GenerateRequest, SamplingParams
from engine.slot_pool import SlotPool, common_prefix
from tests.engine.tiny_families import FamilyCheckpoint, engine_dir

CPU = torch.device("cpu")
# seeded sampling: the tiny models' greedy replies repeat one token
SAMPLED = SamplingParams(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True, logprobs=True)
P1 = tuple((5 * i * i + 7 * i + 3) % 150 + 2 for i in range(30))
NEW = tuple((11 * i + 4) % 150 + 2 for i in range(20))


def test_common_prefix_against_a_plain_scan() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        n, m = (int(x) for x in torch.randint(0, 40, (2,), generator=g))
        a = tuple(torch.randint(0, 3, (n,), generator=g).tolist())
        b = a[:int(torch.randint(0, n + 1, (1,), generator=g))] + tuple(torch.randint(0, 3, (m,), generator=g).tolist())
        want = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert common_prefix(a, b) == want


def test_pool_takes_the_longest_match_else_an_empty_or_the_oldest_slot() -> None:
    """A match is taken when it covers at least half of the prompt its slot held."""
    pool = SlotPool(3, reuse=True)
    taken = [pool.acquire((1, 2, 3))[0] for _ in range(3)]
    assert sorted(taken) == [0, 1, 2] and len(pool) == 0
    pool.release(taken[0], (1, 2, 3, 4, 5), prompt=3)
    pool.release(taken[1], (1, 2, 9), prompt=3)
    pool.release(taken[2], (7, 7), prompt=2)
    assert pool.acquire((1, 2, 3, 4, 5, 6)) == (taken[0], 5)
    assert pool.acquire([1, 2, 3, 4, 5, 6]) == (taken[1], 2)   # the best left: (1, 2) of (1, 2, 9)
    pool.release(taken[0], (1, 2, 3), prompt=3)
    assert pool.acquire((1, 2, 3)) == (taken[0], 2)            # the last prompt token is computed
    pool.release(taken[0], (8,), prompt=1)
    pool.release(taken[1], (9,), prompt=1)
    assert pool.acquire((4, 4)) == (taken[2], 0)               # no match: freed longest ago
    assert pool.held(taken[2]) == ()                           # a taken slot holds nothing reusable
    pool.release(taken[2], (1, 2, 3, 4, 5, 6, 7), prompt=7)
    # (1, 2) of a 7-token prompt: the slot freed longest ago instead
    assert pool.acquire((1, 2, 8, 8)) == (taken[0], 0)
    assert pool.acquire((1, 2, 3, 4, 8, 8)) == (taken[2], 4)
    # a thinking model's next turn drops the reply: its prompt's 2 tokens are worth the slot
    pool.release(taken[2], (1, 2, 5, 5, 5, 5), prompt=2)
    assert pool.acquire((1, 2, 9)) == (taken[2], 2)
    # a slot holding nothing goes before the one freed longest ago
    pool.release(taken[0], (5, 5), prompt=2)
    pool.release(taken[2], (), prompt=3)                       # e.g. after a failed pass
    pool.release(taken[1], (6, 6), prompt=2)
    assert pool.acquire((9,)) == (taken[2], 0)


def test_pool_rules_for_linear_state_and_when_off() -> None:
    saved = [-1]
    linear = SlotPool(1, reuse=True, whole_prefix_only=True, saved=saved.__getitem__)
    slot, _ = linear.acquire((1,))
    linear.release(slot, (1, 2, 3), prompt=2)
    assert linear.reusable(slot, (1, 2, 3, 4)) == 3
    assert linear.reusable(slot, (1, 2, 5, 6)) == 0            # the state is past position 2
    assert linear.reusable(slot, (1, 2, 3)) == 0               # it would have to go back one
    saved[0] = 1                                               # a copy saved at position 1
    assert linear.reusable(slot, (1, 2, 5, 6)) == 1 and linear.reusable(slot, (1, 2, 3)) == 1
    assert linear.reusable(slot, (2, 2)) == 0
    off = SlotPool(1, reuse=False)
    slot, _ = off.acquire((1,))
    off.release(slot, (1, 2, 3), prompt=2)
    assert off.acquire((1, 2, 3, 4)) == (slot, 0)


class _Failing(ResidentExpertProvider):
    """Raises inside the forward pass while armed."""
    armed = False

    def experts(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.armed:
            raise RuntimeError("injected failure")
        return super().experts(*args, **kwargs)


def engine(lm: LoadedModel, prefix_cache: bool, chunk: int = 256) -> Engine:
    return Engine(lm, _Failing(lm.experts, CPU, torch.float32), max_batch=2, prefill_chunk=chunk,
                  prefix_cache=prefix_cache)


def answer(eng: Engine, prompt: tuple[int, ...], rid: str,
           params: SamplingParams = SAMPLED) -> tuple[list[int], list[float], int]:
    """(tokens, logprobs, prompt tokens read from the cache)."""
    before = eng.counters["prompt_tokens_cached"]
    res = run_to_completion(eng, [GenerateRequest(rid, prompt, params)])[rid]
    return res.token_ids, res.logprobs, eng.counters["prompt_tokens_cached"] - before


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2", "gpt_oss", "qwen3_next"])
def test_follow_up_turns_read_only_new_tokens_and_answer_as_recomputed(
        family_checkpoint: FamilyCheckpoint, family: str) -> None:
    lm = load_model(engine_dir(family_checkpoint(family)), CPU, torch.float32, context_length=128)
    cached, whole = engine(lm, True, chunk=16), engine(lm, False, chunk=16)
    try:
        def both(prompt: tuple[int, ...], rid: str) -> tuple[list[int], int]:
            got, got_lp, n_cached = answer(cached, prompt, rid)
            want, want_lp, none = answer(whole, prompt, rid)
            assert none == 0
            assert got == want
            assert got_lp == pytest.approx(want_lp, abs=1e-4)
            return got, n_cached

        out1, n = both(P1, "turn1")
        assert n == 0 and len(set(out1)) >= 2
        # the next turn re-sends the conversation: the slot holds P1 and out1 but its last token
        turn2 = P1 + tuple(out1) + NEW
        computed = cached.counters["prompt_tokens"]
        out2, n = both(turn2, "turn2")
        assert n == len(P1) + len(out1) - 1
        assert cached.counters["prompt_tokens"] - computed == len(turn2) - n
        # the conversation edited at token 10: 10 tokens are less than half of the 57-token
        # prompt that slot held, so the edit takes the other slot (empty) ...
        edit = P1[:10] + NEW
        out_edit, n = both(edit, "edit")
        assert n == 0
        # ... which its own follow-up finds
        _, n = both(edit + tuple(out_edit) + NEW[:4], "edit2")
        assert n == len(edit) + len(out_edit) - 1
        # turn 2's slot still holds turn 2
        turn3 = turn2 + tuple(out2) + NEW[:5]
        _, n = both(turn3, "turn3")
        assert n == len(turn2) + len(out2) - 1
        # as a thinking model's template writes the next turn: turn 3's reply dropped and turn 2's
        # too; the slot's keys and values after turn 2's prompt are overwritten. A linear state
        # cannot go back: a hybrid model restarts from the copy saved SAVE_MARGIN tokens before
        # the end of turn 2's prompt (turn 3's pass began after its own save point)
        _, n = both(turn2 + NEW[::-1], "think")
        assert n == len(turn2) - (SAVE_MARGIN if lm.model.kv_spec.linear is not None else 0)
    finally:
        cached.close()
        whole.close()


@pytest.fixture(scope="module")
def mixtral(family_checkpoint: FamilyCheckpoint) -> LoadedModel:
    return load_model(family_checkpoint("mixtral"), CPU, torch.float32, context_length=128)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_next"])
@pytest.mark.parametrize("when", ["prompt", "decode"])
def test_an_aborted_request_leaves_what_it_read(family_checkpoint: FamilyCheckpoint, family: str,
                                                when: str) -> None:
    """Aborted after the first of its prompt chunks, or after 5 tokens: the slot holds exactly
    the tokens that were computed, and a follow-up continues from there."""
    lm = load_model(engine_dir(family_checkpoint(family)), CPU, torch.float32, context_length=128)
    cached, whole = engine(lm, True, chunk=8), engine(lm, False, chunk=8)
    try:
        cached.add_request(GenerateRequest("a", P1, dataclasses.replace(SAMPLED, max_tokens=30)))
        out: list[int] = []
        cached.step()                                   # one prompt chunk of 8
        while when == "decode" and len(out) < 5:
            out += [t for d in cached.step() for t in d.token_ids]
        (slot,) = [s.slot for s in cached.running]
        cached.abort("a")
        while cached.has_work():
            cached.step()
        held = P1[:8] if when == "prompt" else P1 + tuple(out[:4])
        assert cached.slots.held(slot) == held
        follow = held + NEW
        got, got_lp, n = answer(cached, follow, "b")
        want, want_lp, _ = answer(whole, follow, "b")
        assert n == len(held) and got == want and got_lp == pytest.approx(want_lp, abs=1e-4)
    finally:
        cached.close()
        whole.close()


def test_a_failed_pass_leaves_nothing_to_reuse(mixtral: LoadedModel) -> None:
    eng = engine(mixtral, True)
    try:
        answer(eng, P1, "a")
        eng.provider.armed = True
        eng.add_request(GenerateRequest("b", P1 + NEW, SAMPLED))
        ends: dict[str, Optional[str]] = {}
        while eng.has_work():
            ends.update((d.request_id, d.finish_reason) for d in eng.step() if d.finished)
        assert ends == {"b": FINISH_ERROR}
        eng.provider.armed = False
        # "b" took the slot that held P1 and failed in its pass: that slot holds nothing now
        assert [eng.slots.held(s) for s in range(2)] == [(), ()]
        _, _, n = answer(eng, P1 + NEW, "c")
        assert n == 0
    finally:
        eng.close()


def test_a_hybrid_slot_saves_its_state_only_where_it_can_be_reused(family_checkpoint: FamilyCheckpoint) -> None:
    """The copy is taken SAVE_MARGIN tokens before the prompt's end, in prompts of 2 x SAVE_MARGIN
    tokens or more (a shorter one could not reuse it); a failed pass drops it."""
    lm = load_model(engine_dir(family_checkpoint("qwen3_next")), CPU, torch.float32, context_length=128)
    eng = engine(lm, True)
    linear = eng.kv.linear
    try:
        answer(eng, P1[:2 * SAVE_MARGIN - 1], "short")
        assert linear.saved_at == [-1, -1]
        answer(eng, P1 + NEW[:2], "long")
        assert sorted(linear.saved_at) == [-1, len(P1) + 2 - SAVE_MARGIN]
        slot = linear.saved_at.index(len(P1) + 2 - SAVE_MARGIN)
        eng.provider.armed = True
        eng.add_request(GenerateRequest("fails", P1 + NEW, SAMPLED))   # takes that slot, and fails
        while eng.has_work():
            eng.step()
        eng.provider.armed = False
        assert linear.saved_at[slot] == -1 and eng.slots.held(slot) == ()
    finally:
        eng.close()
