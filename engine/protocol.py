"""Every message that crosses the server/engine boundary: plain picklable dataclasses.

The server speaks token ids only; the engine never sees text.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

FINISH_STOP = "stop"      # EOS or a stop token id (stop strings are the server's business)
FINISH_LENGTH = "length"  # max_tokens reached or the context is full
FINISH_ABORT = "abort"    # aborted by the client (or the server, e.g. a stop string matched)
FINISH_ERROR = "error"    # the engine failed this request; `error` says why


@dataclass(frozen=True)
class Constraint:
    """A grammar the generated text must follow, as a Lark grammar in llguidance's dialect
    (JSON schemas embed as ``%json {...}``). The engine compiles it against the model's tokenizer
    and masks every step's logits to the tokens the grammar allows; once the grammar is complete
    only end-of-sequence is allowed."""

    lark: str


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature == 0 means greedy."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0: disabled
    min_p: float = 0.0
    seed: Optional[int] = None
    repetition_penalty: float = 1.0     # HF-style: divides positive logits of seen tokens
    presence_penalty: float = 0.0       # OpenAI-style, over generated tokens
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0               # 0..20
    constraint: Optional[Constraint] = None

    def __post_init__(self) -> None:
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be at least 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0.0, "must be > 0"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("top_logprobs", 0 <= self.top_logprobs <= 20, "must be in 0..20"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"invalid {name}={getattr(self, name)!r}: {why}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    watch_experts: bool = False         # attach TokenExperts to every delta (the expert stream)


@dataclass(frozen=True)
class TokenExperts:
    """What the forward pass that produced a token did with the experts, for a request that
    watches them. A request's first token covers its whole prompt (``phase`` "prompt", counts
    summed over its chunks); every later token its one decode pass."""

    phase: str                                              # "prompt" or "decode"
    # per MoE layer: (expert, this request's rows routed to it, cache status): h resident,
    # p resident thanks to a prefetch (first use), m missing, loaded while the pass waited
    routed: tuple[tuple[tuple[int, int, str], ...], ...]
    resident: tuple[int, ...]           # per MoE layer, a bit mask of resident experts after
    # the pass's cache events, shared by every request in its batch:
    evicted: tuple[tuple[int, int], ...] = ()               # (layer, expert)
    prefetched: tuple[tuple[int, int], ...] = ()            # prefetches issued
    bytes_read: int = 0                                     # bytes read from disk
    stall_seconds: float = 0.0                              # time the pass waited for loads
    batch: int = 1                                          # requests sharing the pass


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class TokenDelta:
    """Output of one engine step for one request (usually one new token)."""

    request_id: str
    token_ids: tuple[int, ...] = ()
    # log-probability of each token in token_ids, and its top alternatives [(token_id, logprob)]
    logprobs: Optional[tuple[float, ...]] = None
    top_logprobs: Optional[tuple[tuple[tuple[int, float], ...], ...]] = None
    finished: bool = False
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0                   # prompt tokens read from the slot's cache, not computed
    experts: Optional[TokenExperts] = None   # only for requests with watch_experts


@dataclass(frozen=True)
class ModelInfo:
    """What the server needs to know about the loaded model."""

    name: str
    path: str
    model_type: str
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    num_moe_layers: int = 0
    num_experts: int = 0
    top_k: int = 0


@dataclass(frozen=True)
class EngineStats:
    running: int = 0
    waiting: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    requests_failed: int = 0
    prompt_tokens: int = 0          # computed in prompt passes
    prompt_tokens_cached: int = 0   # reused from a slot's cache instead
    generated_tokens: int = 0
    steps: int = 0
    # expert cache totals (hits, misses, prefetches, bytes per tier, ...): name -> number
    cache: dict[str, float] = field(default_factory=dict)
    # the same counters per MoE layer: name -> [layer 0, layer 1, ...]
    cache_layers: dict[str, list[float]] = field(default_factory=dict)
