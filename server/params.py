"""Request fields -> engine SamplingParams, every range checked with a 400 naming the field."""
from __future__ import annotations

from engine.protocol import SamplingParams
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


def sampling_params(body: _SamplingFields, room: int, index: int, logprobs: bool,
                    top_logprobs: int, bias: tuple[tuple[int, float], ...]) -> SamplingParams:
    """Choice ``index`` of ``body``; ``room`` is the context left after the prompt."""
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature < GREEDY_BELOW:
        temperature = 0.0
    seed = None
    if body.seed is not None:   # n>1: seed+i per choice (distinct, reproducible), kept in range
        seed = (body.seed + index) % 2**63
    try:
        return SamplingParams(
            max_tokens=min(body.max_new_tokens or room, room), temperature=temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(body.top_k or 0, 0), min_p=body.min_p or 0.0, seed=seed,
            repetition_penalty=body.repetition_penalty or 1.0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=bias, ignore_eos=bool(body.ignore_eos), logprobs=logprobs,
            top_logprobs=top_logprobs)
    except ValueError as exc:   # the schema's bounds are the tighter ones; this is a backstop
        name = str(exc).split("=")[0].removeprefix("invalid ").strip() or None
        raise bad_request(str(exc), name) from None
