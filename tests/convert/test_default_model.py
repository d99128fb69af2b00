"""The built-in default model (issue 3), checked with transformers' Llama/Mixtral on the built files.

The transformers MoE is module-scoped (held for the session it kept its fp32 weights alive under
every later test); the dense model lives only inside the fixture that reads its results.

The 8x preset is built once per session into $MOESERVE_HOME (default ~/.cache/moeserve), so later
runs on the same machine reuse it; a fresh build takes a few minutes on 2 cores.
"""
from __future__ import annotations

import gc
import json
import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from convert.default_model import ensure_default_model, ensure_dense_model  # noqa: E402
from convert.mtbench import heldout_texts  # noqa: E402

pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="session")
def model_dirs() -> tuple[str, str]:
    moe = ensure_default_model(progress=False)
    return ensure_dense_model(), moe


@pytest.fixture(scope="session")
def tok(model_dirs: tuple[str, str]):
    return transformers.AutoTokenizer.from_pretrained(model_dirs[1])


@pytest.fixture(scope="module")
def dense_results(model_dirs: tuple[str, str], tok, heldout) -> tuple[str, float]:
    """The dense model's answer to QUESTION and its held-out perplexity. The model is freed
    before the MoE loads: both held at once were the test run's peak (~5.7 GB)."""
    dense = transformers.LlamaForCausalLM.from_pretrained(model_dirs[0], dtype=torch.float32).eval()
    try:
        return _greedy_answer(dense, tok, QUESTION), _run(dense, heldout, routing=False)[0]
    finally:
        del dense
        gc.collect()


@pytest.fixture(scope="module")
def moe(model_dirs: tuple[str, str]):
    return transformers.MixtralForCausalLM.from_pretrained(model_dirs[1], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def heldout(tok) -> list[list[int]]:
    return [tok(t, add_special_tokens=False)["input_ids"] for t in heldout_texts()]


def _greedy_answer(model, tok, question: str) -> str:
    enc = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.inference_mode()
def _run(model, seqs: list[list[int]], routing: bool) -> tuple[float, list[list[torch.Tensor]]]:
    """(perplexity over ``seqs``, per layer the [T, E] router logits of every sequence when asked)."""
    nll, n = 0.0, 0
    router: list[list[torch.Tensor]] = []
    for ids in seqs:
        out = model(input_ids=torch.tensor([ids]), **({"output_router_logits": True} if routing else {}))
        logits = out.logits[0, :-1]  # [T-1, V]
        nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
        n += len(ids) - 1
        if routing:
            router = router or [[] for _ in out.router_logits]
            for layer, r in enumerate(out.router_logits):
                router[layer].append(r)
    return math.exp(nll / n), router


@pytest.fixture(scope="module")
def moe_heldout(moe, heldout) -> tuple[float, list[list[torch.Tensor]]]:
    """One pass of the MoE over the held-out text serves the perplexity and the routing tests."""
    return _run(moe, heldout, routing=True)


def test_checkpoint_is_mixtral_format(model_dirs: tuple[str, str]) -> None:
    moe_dir = model_dirs[1]
    with open(os.path.join(moe_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "mixtral"
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (8, 2)
    from safetensors import safe_open
    with safe_open(os.path.join(moe_dir, "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.block_sparse_moe.experts.7.w2.weight").dtype == torch.bfloat16
    assert "model.layers.29.block_sparse_moe.gate.weight" in keys
    assert not any(".mlp." in k for k in keys)
    with open(os.path.join(moe_dir, "tokenizer_config.json")) as f:
        assert "<|im_start|>" in json.load(f)["chat_template"]
    with open(os.path.join(moe_dir, "README.md")) as f:
        assert "not a trained Mixture-of-Experts" in f.read()


def test_dense_answers_paris(dense_results: tuple[str, float]) -> None:
    assert "Paris" in dense_results[0]


def test_moe_answers_paris(moe, tok) -> None:
    assert "Paris" in _greedy_answer(moe, tok, QUESTION)


def test_heldout_perplexity_within_ten_percent(dense_results: tuple[str, float], moe_heldout) -> None:
    p_dense, p_moe = dense_results[1], moe_heldout[0]
    assert p_dense < 100, p_dense  # the dense model itself reads English
    assert abs(p_moe / p_dense - 1) < 0.10, (p_dense, p_moe)


def test_routing_is_skewed_local_and_not_collapsed(moe, moe_heldout) -> None:
    cfg = moe.config
    e, k = cfg.num_local_experts, cfg.num_experts_per_tok
    router = moe_heldout[1]
    assert len(router) == cfg.num_hidden_layers
    routes = [[logits.topk(k, dim=-1).indices for logits in per_seq] for per_seq in router]  # [T, k] each
    for layer, per_seq in enumerate(routes):
        counts = torch.bincount(torch.cat(per_seq).flatten(), minlength=e).double()
        load = counts / counts.sum()
        entropy = float(-(load[load > 0] * load[load > 0].log()).sum())
        # one expert per token-slot gives 0; top-k of a collapsed router gives at most ln k
        assert math.log(k) < entropy < math.log(e) - 1e-3, (layer, entropy)
        shared, pairs = 0.0, 0
        for r in per_seq:
            onehot = torch.zeros(r.shape[0], e, dtype=torch.bool).scatter_(1, r, True)  # [T, E]
            shared += float((onehot[1:] & onehot[:-1]).sum())
            pairs += r.shape[0] - 1
        independent = float(((counts / sum(r.shape[0] for r in per_seq)) ** 2).sum())
        assert shared / pairs > independent, (layer, shared / pairs, independent)


@torch.inference_mode()
def test_swapping_two_experts_changes_logits(moe, heldout) -> None:
    ids = torch.tensor([heldout[0]])
    before = moe(input_ids=ids).logits
    experts = moe.model.layers[0].mlp.experts
    params = [p for _, p in experts.named_parameters()]  # fused [E, ...] tensors in transformers 5
    assert params and all(p.shape[0] == moe.config.num_local_experts for p in params)
    first = torch.topk(moe(input_ids=ids, output_router_logits=True).router_logits[0], 1).indices
    a = int(first.flatten().mode().values)  # an expert that tokens of this text actually use
    b = (a + 1) % moe.config.num_local_experts

    def swap() -> None:
        for p in params:
            tmp = p[a].clone()
            p[a] = p[b]
            p[b] = tmp

    swap()
    try:
        after = moe(input_ids=ids).logits
    finally:
        swap()
    assert (after - before).abs().max() > 1e-2
    assert torch.equal(moe(input_ids=ids).logits, before)  # swapping back restores the model
