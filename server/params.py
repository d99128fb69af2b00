"""Request fields -> engine SamplingParams, every range checked with a 400 naming the field."""
from __future__ import annotations

from typing import Optional

from engine.protocol import Constraint, SamplingParams
from server.defaults import GenerationDefaults
from server.errors import bad_request
from server.schemas import _SamplingFields

# below this a temperature only overflows the logits; vLLM treats it as greedy too
GREEDY_BELOW = 1e-5


def logit_bias(body: _SamplingFields, vocab: int) -> tuple[tuple[int, float], ...]:
    """The bias as (token id, value) pairs; ids must lie in the vocabulary."""
    out = []
    for key, value in (body.logit_bias or {}).items():
        tid = int(key)   # the schema admits ASCII digits only
        if not 0 <= tid < vocab:
            raise bad_request(f"logit_bias token id {tid} is outside the vocabulary "
                              f"(0..{vocab - 1})", "logit_bias")
        out.append((tid, float(value)))
    return tuple(out)


def _pick(value: Optional[float], default: Optional[float], openai: float) -> float:
    """The request's value, else the model's default, else the OpenAI default."""
    return value if value is not None else default if default is not None else openai


def max_tokens(body: _SamplingFields, room: int, defaults: GenerationDefaults,
               default_cap: int) -> int:
    """The request's limit; without one the model's max_new_tokens, then --default-max-tokens
    (0: none); never past the context."""
    if body.max_new_tokens is not None:
        return min(body.max_new_tokens, room)
    caps = [c for c in (defaults.max_new_tokens, default_cap or None) if c]
    return min([room, *caps])


def sampling_params(body: _SamplingFields, room: int, index: int, logprobs: bool,
                    top_logprobs: int, bias: tuple[tuple[int, float], ...],
                    defaults: GenerationDefaults = GenerationDefaults(), default_cap: int = 0,
                    constraint: Optional[Constraint] = None) -> SamplingParams:
    """Choice ``index`` of ``body``; ``room`` is the context left after the prompt."""
    d = defaults
    temperature = _pick(body.temperature, d.temperature, 1.0)
    if temperature < GREEDY_BELOW:
        temperature = 0.0
    seed = None
    if body.seed is not None:   # n>1: seed+i per choice (distinct, reproducible), kept in range
        seed = (body.seed + index) % 2**63
    try:
        return SamplingParams(
            max_tokens=max_tokens(body, room, d, default_cap), temperature=temperature,
            top_p=_pick(body.top_p, d.top_p, 1.0),
            top_k=max(int(_pick(body.top_k, d.top_k, 0)), 0),
            min_p=_pick(body.min_p, d.min_p, 0.0), seed=seed,
            repetition_penalty=_pick(body.repetition_penalty, d.repetition_penalty, 1.0),
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=bias, ignore_eos=bool(body.ignore_eos), logprobs=logprobs,
            top_logprobs=top_logprobs, constraint=constraint)
    except ValueError as exc:   # the schema's bounds are the tighter ones; this is a backstop
        name = str(exc).split("=")[0].removeprefix("invalid ").strip() or None
        raise bad_request(str(exc), name) from None
