"""Per-request token selection: penalties, logit bias, temperature, top-k/top-p/min-p, seeds.

Runs on CPU float32 rows so that a seeded request samples the same tokens on any device.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional

import torch

from engine.protocol import SamplingParams


@dataclass
class SamplerState:
    params: SamplingParams
    prompt_ids: tuple[int, ...]
    generator: Optional[torch.Generator] = None
    output_counts: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.params.greedy:
            self.generator = torch.Generator()
            seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
            self.generator.manual_seed(seed)

    def note(self, token: int) -> None:
        self.output_counts[token] = self.output_counts.get(token, 0) + 1

    @property
    def needs_processing(self) -> bool:
        p = self.params
        return bool(p.logit_bias) or p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 \
            or p.frequency_penalty != 0.0


@dataclass(frozen=True)
class Choice:
    token: int
    logprob: Optional[float]
    top: Optional[tuple[tuple[int, float], ...]]


def _process(logits: torch.Tensor, st: SamplerState) -> torch.Tensor:
    """Penalties and bias on one row of logits [V] (in place on a copy)."""
    p = st.params
    logits = logits.clone()
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(st.prompt_ids) | set(st.output_counts)), dtype=torch.long)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if st.output_counts and (p.presence_penalty or p.frequency_penalty):
        ids = torch.tensor(list(st.output_counts), dtype=torch.long)
        counts = torch.tensor(list(st.output_counts.values()), dtype=torch.float32)
        logits[ids] -= p.presence_penalty + p.frequency_penalty * counts
    for tok, bias in p.logit_bias:
        if 0 <= tok < logits.shape[0]:
            logits[tok] += bias
    return logits


def _sample_row(logits: torch.Tensor, st: SamplerState) -> int:
    p = st.params
    if p.greedy:
        return int(torch.argmax(logits))
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[0]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        drop = cum - sorted_p > p.top_p          # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=st.generator))


def sample(logits: torch.Tensor, states: list[SamplerState]) -> list[Choice]:
    """logits [B, V] (any device) -> one Choice per row."""
    logits = logits.float().cpu()
    if all(st.params.greedy and not st.needs_processing and not st.params.logprobs for st in states):
        return [Choice(int(t), None, None) for t in torch.argmax(logits, dim=-1).tolist()]
    out = []
    for row, st in zip(logits, states):
        row = _process(row, st) if st.needs_processing else row
        tok = _sample_row(row, st)
        lp, top = None, None
        if st.params.logprobs:
            logp = torch.log_softmax(row, dim=-1)
            lp = float(logp[tok])
            if st.params.top_logprobs:
                vals, ids = torch.topk(logp, st.params.top_logprobs)
                top = tuple(zip(ids.tolist(), vals.tolist()))
        out.append(Choice(tok, lp, top))
    return out
