"""Per-request token selection: penalties, logit bias, temperature, top-k/top-p/min-p, seeds.

Runs on CPU float32 rows so that a seeded request samples the same tokens on any device.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional

import torch

from engine.constraints import GrammarMatcher
from engine.protocol import SamplingParams


@dataclass
class SamplerState:
    params: SamplingParams
    prompt_ids: tuple[int, ...]
    generator: Optional[torch.Generator] = None
    output_counts: dict[int, int] = field(default_factory=dict)
    # logit_bias as two tensors, built once: applied with one index_add_ per step (a Python loop
    # over a large bias slowed every request in the batch)
    bias_ids: Optional[torch.Tensor] = None
    bias_values: Optional[torch.Tensor] = None
    grammar: Optional[GrammarMatcher] = None    # response_format / forced tool calls

    def __post_init__(self) -> None:
        if not self.params.greedy:
            self.generator = torch.Generator()
            seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
            self.generator.manual_seed(seed % 2**63)
        if self.params.logit_bias:
            ids, values = zip(*self.params.logit_bias)
            self.bias_ids = torch.tensor(ids, dtype=torch.long)
            self.bias_values = torch.tensor(values, dtype=torch.float32)

    def note(self, token: int) -> None:
        self.output_counts[token] = self.output_counts.get(token, 0) + 1
        if self.grammar is not None:
            self.grammar.consume(token)

    @property
    def needs_processing(self) -> bool:
        p = self.params
        return bool(p.logit_bias) or p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 \
            or p.frequency_penalty != 0.0 or self.grammar is not None


@dataclass(frozen=True)
class Choice:
    token: int
    logprob: Optional[float]
    top: Optional[tuple[tuple[int, float], ...]]
    error: Optional[str] = None   # this row could not be sampled: its request alone fails


def _why_unusable(row: torch.Tensor) -> Optional[str]:
    """Why a logits row cannot be sampled from (NaN, +inf, or nothing finite), else None."""
    if bool(torch.isnan(row).any()):
        return "the logits contain NaN"
    if bool(torch.isposinf(row).any()):
        return "the logits contain +inf"
    if not bool(torch.isfinite(row).any()):
        return "no token has a finite logit"
    return None


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
    if st.bias_ids is not None and st.bias_values is not None:
        logits.index_add_(0, st.bias_ids, st.bias_values)
    if st.grammar is not None:   # last: no bias may revive a token the grammar forbids
        logits.masked_fill_(~st.grammar.allowed(), float("-inf"))
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
    """logits [B, V] (any device) -> one Choice per row.

    A row that cannot be sampled (non-finite logits after penalties, bias or temperature) gives
    a Choice with ``error`` set; the other rows are sampled as usual.
    """
    logits = logits.float().cpu()
    if all(st.params.greedy and not st.needs_processing and not st.params.logprobs for st in states):
        # a row whose sum is finite holds no NaN or inf (torch.isfinite over [8, 49152] cost
        # ~1 ms a step); the rest get the full check
        finite = torch.isfinite(logits.sum(dim=-1)).tolist()
        return [Choice(int(t), None, None) if ok else _failed(row)
                for t, ok, row in zip(torch.argmax(logits, dim=-1).tolist(), finite, logits)]
    out = []
    for row, st in zip(logits, states):
        row = _process(row, st) if st.needs_processing else row
        why = _why_unusable(row if st.params.greedy else row / st.params.temperature)
        if why is not None:
            out.append(Choice(-1, None, None, error=why))
            continue
        try:
            tok = _sample_row(row, st)
        except RuntimeError as exc:   # e.g. multinomial on a distribution that underflowed
            out.append(Choice(-1, None, None, error=f"sampling failed: {exc}"))
            continue
        lp, top = None, None
        if st.params.logprobs:
            logp = torch.log_softmax(row, dim=-1)
            lp = float(logp[tok])
            if st.params.top_logprobs:
                vals, ids = torch.topk(logp, st.params.top_logprobs)
                top = tuple(zip(ids.tolist(), vals.tolist()))
        out.append(Choice(tok, lp, top))
    return out


def _failed(row: torch.Tensor) -> Choice:
    # the greedy fast path saw a non-finite entry: only NaN/+inf/all -inf make argmax meaningless
    why = _why_unusable(row)
    return Choice(int(torch.argmax(row)), None, None) if why is None else Choice(-1, None, None, error=why)
