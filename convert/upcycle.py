"""Upcycling a dense Llama FFN into a routed MoE: calibration states, k-means routers, expert noise.

Routing rule (Mixtral): probs = softmax(x @ G.T); top-k; renormalise. top-k of x @ G.T is invariant to
a positive scale of G and, with unit-norm rows ĉ_j, argmax_j x·ĉ_j = argmax_j cos(x, ĉ_j) because |x|
is the same for every expert. So spherical k-means (cosine assignment) on the FFN inputs gives router
rows whose routing reproduces the clustering exactly. The scale s of G = s·Ĉ only sets how peaked the
renormalised top-k weights are; it is fitted so the gate logits' spread across experts has a fixed
standard deviation on the calibration tokens (see ``router_scale``).
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any, Iterable

import torch
from convert.progress import progress as tqdm  # a bar on a terminal, log lines otherwise

from convert.mtbench import Question

log = logging.getLogger(__name__)


def _seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (Python's hash() is salted per process)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.inference_mode()
def generate_calibration_chats(model: Any, tok: Any, questions: list[Question], max_new_tokens: int,
                               turns: int = 1, batch_size: int = 8, progress: bool = True) -> list[list[dict[str, str]]]:
    """Greedy answers of the dense model to the first ``turns`` turns of each question (chat template).

    A later turn is asked after the model's own earlier answers, as in MT-Bench. Batches are fixed by
    question order, so the result is deterministic for a fixed thread count.
    """
    chats: list[list[dict[str, str]]] = [[] for _ in questions]
    n_turns = min(turns, max(len(q.turns) for q in questions))
    pad_side = tok.padding_side
    tok.padding_side = "left"  # decoder-only batching: new tokens must follow the prompt directly
    bar = tqdm(total=n_turns * len(questions), desc="calibration answers", unit="answer",
               disable=not progress)
    try:
        for turn in range(n_turns):
            idx = [i for i, q in enumerate(questions) if len(q.turns) > turn]
            for start in range(0, len(idx), batch_size):
                batch = idx[start:start + batch_size]
                for i in batch:
                    chats[i].append({"role": "user", "content": questions[i].turns[turn]})
                texts = [tok.apply_chat_template(chats[i], tokenize=False, add_generation_prompt=True)
                         for i in batch]
                enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
                new = out[:, enc["input_ids"].shape[1]:]  # [B, <=max_new_tokens]
                for row, i in enumerate(batch):
                    answer = tok.decode(new[row], skip_special_tokens=True).strip()
                    chats[i].append({"role": "assistant", "content": answer})
                bar.update(len(batch))
    finally:
        tok.padding_side = pad_side
        bar.close()
    return chats


@torch.inference_mode()
def collect_ffn_inputs(model: Any, token_seqs: Iterable[list[int]], progress: bool = True) -> list[torch.Tensor]:
    """Per layer, the FFN inputs (post-attention RMSNorm outputs) of every token: [N, hidden] fp32."""
    layers = model.model.layers
    per_layer: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = []
    for li, layer in enumerate(layers):
        def hook(_mod: Any, args: tuple, li: int = li) -> None:
            per_layer[li].append(args[0].reshape(-1, args[0].shape[-1]).float().clone())  # [T, H]
        hooks.append(layer.mlp.register_forward_pre_hook(hook))
    try:
        seqs = list(token_seqs)
        for ids in tqdm(seqs, desc="calibration states", unit="seq", disable=not progress):
            model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(chunks) for chunks in per_layer]


def spherical_kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm centroids [k, H] and assignments [N] by cosine similarity (float64, k-means++ init)."""
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} calibration tokens, got {x.shape[0]}")
    xn = torch.nn.functional.normalize(x.double(), dim=1)  # [N, H]
    gen = torch.Generator().manual_seed(seed)
    first = int(torch.randint(xn.shape[0], (1,), generator=gen))
    cent = [xn[first]]
    best = xn @ xn[first]  # [N] highest similarity to a chosen centroid so far
    for _ in range(1, k):
        dist = (1.0 - best).clamp_min(0) + 1e-12  # cosine distance to the nearest centroid
        j = int(torch.multinomial(dist / dist.sum(), 1, generator=gen))
        cent.append(xn[j])
        best = torch.maximum(best, xn @ xn[j])
    c = torch.stack(cent)  # [k, H]
    assign = torch.full((xn.shape[0],), -1, dtype=torch.long)
    for _ in range(iters):
        sim = xn @ c.T  # [N, k]
        new_assign = sim.argmax(dim=1)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
        sums = torch.zeros_like(c).index_add_(0, assign, xn)  # [k, H]
        counts = torch.bincount(assign, minlength=k)
        for j in torch.nonzero(counts == 0).flatten().tolist():
            # an empty cluster takes the token worst served by its current centroid
            worst = int(sim.max(dim=1).values.argmin())
            sums[j] = xn[worst]
            assign[worst] = j
        c = torch.nn.functional.normalize(sums, dim=1)
    return c.float(), assign


def router_scale(x: torch.Tensor, centroids: torch.Tensor, target_std: float) -> float:
    """s such that the gate logits s·(x @ ĉ.T) spread with median std ``target_std`` across experts."""
    logits = x.double() @ centroids.double().T  # [N, E]
    spread = float(logits.std(dim=1).median())
    if spread <= 0:
        raise ValueError("calibration states give identical logits for every expert")
    return target_std / spread


def perturbed_expert(dense: torch.Tensor, noise: float, seed: int, layer: int, expert: int,
                     name: str) -> torch.Tensor:
    """dense + noise·rms(dense)·ε, ε ~ N(0, 1) seeded by (seed, layer, expert, name); fp32."""
    gen = torch.Generator().manual_seed(_seed(seed, layer, expert, name))
    w = dense.float()
    rms = float(w.pow(2).mean().sqrt())
    eps = torch.randn(w.shape, generator=gen, dtype=torch.float32)
    return w + (noise * rms) * eps
