"""Every model family against transformers on tiny random checkpoints written by transformers'
save_pretrained: greedy tokens, prompt-pass logits, batching, and that routing is really exercised.

Tolerances on prompt-pass logits (absolute; the logits here reach |1.0-1.5|):
  fp32: 1e-5  (measured: 0.0 for all but DeepSeek-V2, whose complex-number rope gives ~7e-7)
  bf16: 3e-2  (measured: <= 9.8e-3, one or two bf16 steps at these magnitudes, from
        transformers' default grouped_mm experts kernel, and for Mixtral from rounding the routing
        weights to bf16 before the product; against eager experts DeepSeek-V3 is bit-exact,
        tested below). Greedy tokens are compared in fp32 only: bf16 may flip near-ties.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import pytest
import torch

from cache.provider import ResidentExpertProvider, StepRows
from engine.engine import Engine, run_to_completion
from engine.loader import LoadedModel, load_model
from engine.models import family
from engine.models.base import HFConfig
from engine.models.common import Batch, KVCache
from engine.models.deepseek_v2 import DeepseekV2Router
from engine.protocol import GenerateRequest, SamplingParams
from tests.engine.tiny_families import COMMON, FAMILIES, FamilyCheckpoint, engine_dir

transformers = pytest.importorskip("transformers")

LOGIT_ATOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
BF16_FAMILIES = ["mixtral", "deepseek_v3", "glm4_moe", "ernie4_5_moe", "gpt_oss", "qwen3_next", "qwen3_5_moe_text",
                 "minimax_m2"]
MOE_FAMILIES = [n for n, (_, _, moe) in FAMILIES.items() if moe]
PROMPTS = [(5, 17, 33, 8, 91, 64, 12), (40, 3), (150, 7, 7, 21, 99, 100, 4, 58, 33, 11, 60, 2, 19)]
NEW_TOKENS = 24
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matrices gain nothing from intra-op threads, and on busy shared cores the threads'
    spin-waits made each step ~100x slower (5 s vs 0.05 s for 24 tokens)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ActivationProbe:
    """A Tracer that counts how often each (MoE layer, expert) was selected."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[int, int]] = Counter()

    def begin_step(self, rows: StepRows) -> None:
        pass

    def record(self, layer: int, topk_ids: list[list[int]]) -> None:
        self.counts.update((layer, e) for row in topk_ids for e in row)

    def end_request(self, seq_id: str, aborted: bool = False) -> None:
        pass


@dataclass
class Case:
    name: str
    loaded: LoadedModel
    ref: Any                  # the transformers model of the same checkpoint
    engine: Engine
    probe: ActivationProbe


def _case(name: str, dtype: torch.dtype, family_checkpoint: FamilyCheckpoint) -> Iterator[Case]:
    path = family_checkpoint(name, dtype)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    loaded = load_model(engine_dir(path), CPU, dtype, context_length=64)
    probe = ActivationProbe()
    engine = Engine(loaded, ResidentExpertProvider(loaded.experts, CPU, dtype, tracer=probe), max_batch=3)
    yield Case(name, loaded, ref, engine, probe)
    engine.close()


@pytest.fixture(scope="module", params=list(FAMILIES))
def fp32(request: pytest.FixtureRequest, family_checkpoint: FamilyCheckpoint) -> Iterator[Case]:
    yield from _case(request.param, torch.float32, family_checkpoint)


@pytest.fixture(scope="module", params=BF16_FAMILIES)
def bf16(request: pytest.FixtureRequest, family_checkpoint: FamilyCheckpoint) -> Iterator[Case]:
    yield from _case(request.param, torch.bfloat16, family_checkpoint)


def engine_greedy(case: Case, prompts: list[tuple[int, ...]]) -> list[list[int]]:
    """Greedy outputs of ``prompts`` submitted together (one batch when they fit the slots)."""
    res = run_to_completion(case.engine, [GenerateRequest(str(i), p, GREEDY) for i, p in enumerate(prompts)])
    return [res[str(i)].token_ids for i in range(len(prompts))]


def prompt_logits(loaded: LoadedModel, ref: Any, prompt: tuple[int, ...],
                  context: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(engine, transformers) logits [T, V] of one prompt pass, in fp32."""
    model, spec = loaded.model, loaded.model.kv_spec
    kv = KVCache.for_model(spec, 1, context, loaded.dtype, CPU)
    ids = torch.tensor([prompt])
    batch = Batch(torch.arange(len(prompt))[None], torch.tensor([0]), len(prompt), single_slot=0)
    with torch.inference_mode():
        ours = model(ids, batch, kv, all_logits=True)[0]
        theirs = ref(ids).logits[0].float()
    return ours, theirs


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: f"len{len(p)}")
def test_greedy_tokens_equal_transformers_generate(fp32: Case, prompt: tuple[int, ...]) -> None:
    (ours,) = engine_greedy(fp32, [prompt])
    # eos_token_id=None is ignore_eos: eos may be chosen and decoding goes on (min_new_tokens
    # alone would instead forbid eos, a different greedy sequence whenever eos is the argmax)
    theirs = fp32.ref.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                               do_sample=False, eos_token_id=None)[0, len(prompt):].tolist()
    assert len(theirs) == NEW_TOKENS and ours == theirs
    assert len(set(ours)) >= 3                       # not one token repeated: a real comparison


def test_prompt_logits_match_transformers_fp32(fp32: Case) -> None:
    ours, theirs = prompt_logits(fp32.loaded, fp32.ref, PROMPTS[2])
    assert ours.shape == theirs.shape == (len(PROMPTS[2]), COMMON["vocab_size"])
    torch.testing.assert_close(ours, theirs, rtol=0.0, atol=LOGIT_ATOL[torch.float32])


def test_prompt_logits_match_transformers_bf16(bf16: Case) -> None:
    tol = LOGIT_ATOL[torch.bfloat16]
    ours, theirs = prompt_logits(bf16.loaded, bf16.ref, PROMPTS[2])
    torch.testing.assert_close(ours, theirs, rtol=0.0, atol=tol)
    top2 = theirs.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tol      # positions whose argmax bf16 noise cannot flip
    assert clear.any()
    assert torch.equal(ours.argmax(-1)[clear], theirs.argmax(-1)[clear])


@pytest.mark.parametrize("name", ["deepseek_v3", "glm4_moe", "ernie4_5_moe"])
def test_bf16_fp32_router_is_bit_exact_against_eager_experts(family_checkpoint: FamilyCheckpoint, name: str) -> None:
    """transformers keeps gate.weight / e_score_correction_bias and the routing weights in fp32 in
    a bf16 model; so does the engine, which makes it bit-exact against transformers' eager experts
    (its default grouped_mm kernel rounds differently: hence the bf16 tolerance above)."""
    path = family_checkpoint(name, torch.bfloat16)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                            experts_implementation="eager").eval()
    loaded = load_model(path, CPU, torch.bfloat16, context_length=64)
    mlp = loaded.model.model.layers[1].mlp
    bias = getattr(mlp, "moe_statics", mlp.gate).e_score_correction_bias      # ERNIE keeps it beside
    assert mlp.gate.weight.dtype == bias.dtype == torch.float32
    assert loaded.model.model.layers[1].mlp.shared_experts.up_proj.weight.dtype == torch.bfloat16
    loaded.model.set_provider(ResidentExpertProvider(loaded.experts, CPU, torch.bfloat16))
    ours, theirs = prompt_logits(loaded, ref, PROMPTS[2])
    assert torch.equal(ours, theirs)


def test_batch_of_three_gives_each_request_its_solo_output(fp32: Case) -> None:
    alone = [engine_greedy(fp32, [p])[0] for p in PROMPTS]
    assert engine_greedy(fp32, PROMPTS) == alone
    assert len({tuple(a) for a in alone}) == 3


@pytest.mark.parametrize("fp32", MOE_FAMILIES, indirect=True)
def test_routing_is_spread_over_experts_in_every_moe_layer(fp32: Case) -> None:
    n_moe, info = FAMILIES[fp32.name][2], fp32.loaded.info
    assert info.num_moe_layers == n_moe and fp32.loaded.model.layout is not None
    assert len(fp32.loaded.experts) == n_moe * info.num_experts
    fp32.probe.counts.clear()
    engine_greedy(fp32, PROMPTS)
    layers = {layer for layer, _ in fp32.probe.counts}
    assert layers == set(range(n_moe))               # MoE layers only, counted from 0
    for layer in layers:
        per_expert = [fp32.probe.counts[(layer, e)] for e in range(info.num_experts)]
        used = sum(c > 0 for c in per_expert)
        assert used >= info.num_experts // 2, f"layer {layer} used only {per_expert}"
        assert max(per_expert) < 0.5 * sum(per_expert), f"layer {layer} routing collapsed: {per_expert}"


def test_deepseek_v2_norm_topk_prob_normalises_instead_of_scaling() -> None:
    """DeepSeek's own V2 semantics (transformers 5.24 ignores the flag, so no parity test covers it)."""
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    routers = [DeepseekV2Router(8, 6, 2, "greedy", 1, 1, scaling=3.0, norm_topk_prob=norm) for norm in (False, True)]
    routers[1].weight.data = routers[0].weight.data.normal_()
    probs, ids = torch.softmax(x @ routers[0].weight.T, dim=-1).topk(2, dim=-1)
    (w_scaled, ids_scaled), (w_norm, ids_norm) = (r(x) for r in routers)
    for got in (ids_scaled, ids_norm):
        assert torch.equal(got.sort(-1).values, ids.sort(-1).values)
    torch.testing.assert_close(w_scaled.sort(-1).values, 3.0 * probs.sort(-1).values)
    torch.testing.assert_close(w_norm.sum(-1), torch.ones(5))


@pytest.mark.parametrize("name,change,field", [
    ("qwen2_moe", {"use_sliding_window": True}, "use_sliding_window"),
    ("deepseek_v2", {"topk_method": "noaux_tc"}, "topk_method"),
    ("deepseek_v3", {"scoring_func": "softmax"}, "scoring_func"),
    ("deepseek_v3", {"n_group": 3}, "n_group"),
    ("glm4_moe", {"n_group": 3}, "n_group"),
    ("glm4_moe", {"topk_group": 5}, "topk_group"),
    ("glm4_moe", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.3}},
     "partial_rotary_factor"),
])
def test_unsupported_settings_are_refused_naming_the_field(family_checkpoint: FamilyCheckpoint, name: str,
                                                           change: dict[str, Any], field: str) -> None:
    with open(os.path.join(family_checkpoint(name, torch.float32), "config.json")) as f:
        raw = {**json.load(f), **change}
    with pytest.raises(ValueError, match=field), torch.device("meta"):
        family(raw["model_type"]).build(HFConfig(raw), 32)


@pytest.mark.parametrize("raw,dim", [
    ({"partial_rotary_factor": 0.25}, 32),                                       # v4 config: top level
    ({"rope_parameters": {"partial_rotary_factor": 1.0}, "partial_rotary_factor": 0.25}, 128),  # v5 wins
    ({}, 64),                                                                    # transformers' default
])
def test_glm_rotary_dimension_follows_the_config(raw: dict[str, Any], dim: int) -> None:
    from engine.models.glm4_moe import rotary_dim
    assert rotary_dim(HFConfig({"hidden_size": 4096, "num_attention_heads": 96, "head_dim": 128, **raw})) == dim


def test_ernie_settings_default_as_transformers_does() -> None:
    from engine.models.ernie4_5_moe import moe_layers
    assert moe_layers(HFConfig({}), 4) == (1, 2, 3)                      # start 1, end the last
    assert moe_layers(HFConfig({"moe_layer_end_index": None, "moe_layer_interval": 2}), 6) == (1, 3, 5)
    assert moe_layers(HFConfig({"moe_layer_start_index": 2, "moe_layer_end_index": 3}), 6) == (2, 3)


def test_minimax_router_stays_fp32_and_is_bit_exact_against_eager_experts(family_checkpoint: FamilyCheckpoint) -> None:
    """MiniMax-M2's router and selection bias stay fp32 in a bf16 model (as vLLM and SGLang keep
    them; transformers rounds them to bf16): with transformers' two tensors cast to fp32 as well,
    the bf16 logits are bit-identical against its eager experts."""
    path = family_checkpoint("minimax_m2", torch.bfloat16)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                            experts_implementation="eager").eval()
    for layer in ref.model.layers:
        layer.mlp.gate.weight.data = layer.mlp.gate.weight.data.float()
        layer.mlp.e_score_correction_bias.data = layer.mlp.e_score_correction_bias.data.float()
    loaded = load_model(path, CPU, torch.bfloat16, context_length=64)
    block = loaded.model.model.layers[1].block_sparse_moe
    assert block.gate.weight.dtype == block.e_score_correction_bias.dtype == torch.float32
    loaded.model.set_provider(ResidentExpertProvider(loaded.experts, CPU, torch.bfloat16))
    ours, theirs = prompt_logits(loaded, ref, PROMPTS[2])
    assert torch.equal(ours, theirs)


class RoutingRecorder(ActivationProbe):
    """Keeps each MoE layer's last routing [T][k]."""

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[int, list[list[int]]] = {}

    def record(self, layer: int, topk_ids: list[list[int]]) -> None:
        self.last[layer] = topk_ids


# families whose selection the look-ahead can express whole (not: the group-limited ones)
LOOKAHEAD_EXACT = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "ernie4_5_moe", "gpt_oss",
                   "qwen3_next", "minimax_m2"]


@pytest.mark.parametrize("name", LOOKAHEAD_EXACT)
def test_lookahead_ranks_experts_as_each_router_chooses(family_checkpoint: FamilyCheckpoint, name: str) -> None:
    """The cache's look-ahead (DecoderLM.lookahead_routers) scores experts the way each family's
    router chooses them (softmax, sigmoid, a logit bias, a selection bias): its top-k of a layer's
    own input is the layer's routing."""
    lm = load_model(engine_dir(family_checkpoint(name, torch.float32)), CPU, torch.float32, context_length=64)
    rec = RoutingRecorder()
    lm.model.set_provider(ResidentExpertProvider(lm.experts, CPU, torch.float32, tracer=rec))
    torch.manual_seed(0)
    blocks = sorted(lm.model.moe_blocks(), key=lambda b: b.moe_index)
    for block, router in zip(blocks, lm.model.lookahead_routers()):
        x = torch.randn(32, COMMON["hidden_size"])
        with torch.inference_mode():
            block(x)
        ahead = router.scores(x).topk(lm.info.top_k, dim=-1).indices.tolist()
        assert [sorted(r) for r in ahead] == [sorted(r) for r in rec.last[block.moe_index]], name
