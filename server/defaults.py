"""Default sampling parameters from the model's generation_config.json (as vLLM applies them):
a request's own value wins, then the model's, then the OpenAI default.

transformers' ``do_sample`` is ignored, as vLLM ignores it: an OpenAI client that wants greedy
decoding asks for temperature 0.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

log = logging.getLogger("moeserve.server")

FILE = "generation_config.json"


@dataclass(frozen=True)
class GenerationDefaults:
    """Each field is None when the model does not set it (the OpenAI default then applies)."""

    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    max_new_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        bounds = {"temperature": (0.0, 2.0), "top_p": (1e-9, 1.0), "top_k": (0, 1_000_000),
                  "min_p": (0.0, 1.0), "repetition_penalty": (0.01, 10.0),
                  "max_new_tokens": (1, 10**9)}
        for name, (lo, hi) in bounds.items():
            v = getattr(self, name)
            if v is not None and not lo <= v <= hi:
                raise ValueError(f"{FILE}: invalid {name}={v!r}: must be in [{lo}, {hi}]")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "GenerationDefaults":
        kept: dict[str, Any] = {}
        for f in fields(cls):
            v = values.get(f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue   # absent, null or not a number: not a default
            kept[f.name] = int(v) if f.name in ("top_k", "max_new_tokens") else float(v)
        return cls(**kept)

    def merged_over(self, base: "GenerationDefaults") -> "GenerationDefaults":
        """These values, with ``base`` filling the ones left unset."""
        return GenerationDefaults(**{f.name: getattr(self, f.name) if getattr(self, f.name)
                                     is not None else getattr(base, f.name) for f in fields(self)})

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)
                is not None}


def load_generation_defaults(model_dir: str, mode: str = "auto",
                             fallback: Optional[Mapping[str, Any]] = None) -> GenerationDefaults:
    """The defaults for ``mode`` ('auto': the model's file, 'none': nothing); ``fallback`` fills
    what the file leaves unset (the built-in model's measured values, for builds made before the
    file carried them)."""
    if mode == "none":
        return GenerationDefaults()
    values: dict[str, Any] = {}
    path = os.path.join(model_dir, FILE)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                loaded = json.load(f)
            values = loaded if isinstance(loaded, dict) else {}
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("%s: ignored (%s)", path, exc)
    out = GenerationDefaults.from_mapping(values).merged_over(
        GenerationDefaults.from_mapping(fallback or {}))
    if out.as_dict():
        log.info("default sampling parameters from the model: %s", out.as_dict())
    return out
