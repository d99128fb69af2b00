"""The opt-in expert stream: ``"moeserve": {"experts": true}`` in a request body adds a
``moeserve`` object to every streamed chunk that carries a token, with the routing of the pass
that produced it and what the expert cache did (README, "The expert stream"). OpenAI clients
ignore the extra key; requests that don't ask pay nothing (the engine records nothing)."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict

from engine.protocol import TokenExperts


class MoeserveOptions(BaseModel):
    """The request body's ``moeserve`` object; unknown keys are a 400 (it is ours to define)."""

    model_config = ConfigDict(extra="forbid")
    experts: bool = False


def wants_experts(options: Optional[MoeserveOptions]) -> bool:
    return bool(options is not None and options.experts)


def token_json(x: TokenExperts, token: int) -> dict[str, Any]:
    """One token's entry. ``layers[l]`` lists [expert, rows, status] (status h: resident,
    p: resident thanks to a prefetch, m: loaded while the pass waited); ``resident[l]`` is a hex
    bit mask of layer l's resident experts after the pass (bit e = expert e); evictions,
    prefetches, bytes and stall belong to the pass, which ``batch`` requests shared."""
    misses = sum(1 for layer in x.routed for _, _, c in layer if c == "m")
    uses = sum(len(layer) for layer in x.routed)
    return {"token": token, "phase": x.phase,
            "layers": [[[e, n, c] for e, n, c in layer] for layer in x.routed],
            "resident": [format(m, "x") for m in x.resident],
            "evicted": [list(k) for k in x.evicted],
            "prefetched": [list(k) for k in x.prefetched],
            "hits": uses - misses, "misses": misses, "bytes_read": x.bytes_read,
            "stall_ms": round(x.stall_seconds * 1e3, 3), "batch": x.batch}
