"""Grammar-constrained decoding with llguidance: one matcher per constrained request, its
allowed-token mask applied to that request's row only, so constrained and free requests share a
batch (continuous batching) unchanged.

llguidance was chosen by bench/constrained_decoding.py (README, "Structured output"): it compiled
every schema of the set, in about a millisecond (per-request schemas such as tools are compiled
on arrival), its mask costs ~0.2 ms a token on this vocabulary, and it needs no torch, so the HTTP
process can reject an uncompilable schema with a 400 before the engine sees it.
"""
from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Optional

import torch

from engine.protocol import Constraint

if TYPE_CHECKING:       # imported on the first constrained request: an engine that never gets
    import llguidance   # one (a CUDA machine with only torch, say) needs no llguidance

_BITS = torch.arange(32, dtype=torch.int32)


class GrammarCompiler:
    """The model's tokenizer for llguidance (built once, on the first constrained request: ~0.4 s)."""

    def __init__(self, model_dir: str, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self.model_dir, self.vocab_size, self.eos = model_dir, vocab_size, eos_token_ids
        self._tokenizer: Optional[llguidance.LLTokenizer] = None
        self._lock = threading.Lock()

    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                import llguidance
                path = os.path.join(self.model_dir, "tokenizer.json")
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                self._tokenizer = llguidance.LLTokenizer(
                    text, n_vocab=self.vocab_size, eos_token=self.eos[0] if self.eos else None)
            return self._tokenizer

    def matcher(self, constraint: Constraint) -> "GrammarMatcher":
        """A fresh matcher; ValueError (the request is refused, the engine goes on) when the
        grammar does not compile or the model's tokenizer cannot be read."""
        try:
            tokenizer = self.tokenizer()
        except (OSError, ValueError, RuntimeError) as exc:
            raise ValueError(f"structured output needs the model's tokenizer.json: {exc}") from None
        import llguidance
        m = llguidance.LLMatcher(tokenizer, constraint.lark, log_level=0)
        if m.is_error():
            raise ValueError(f"the output grammar does not compile: {m.get_error()}")
        return GrammarMatcher(m, self.vocab_size)


class GrammarMatcher:
    """One request's grammar state: the mask for its next token, advanced by each sampled token."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._m = matcher
        self._vocab = vocab_size
        self._words = torch.empty((vocab_size + 31) // 32, dtype=torch.int32)
        self.error: Optional[str] = None

    def allowed(self) -> torch.Tensor:
        """Bool [V]: the tokens the grammar allows next."""
        self._m.unsafe_compute_mask_ptr(self._words.data_ptr(), self._words.numel() * 4)
        return ((self._words[:, None] >> _BITS) & 1).flatten()[:self._vocab].bool()

    def consume(self, token: int) -> None:
        if self.error is None and not self._m.consume_token(token):
            self.error = f"the grammar rejected token {token}: {self._m.get_error()}"

    @property
    def finished(self) -> bool:
        """The grammar is complete (only end-of-sequence may follow)."""
        return self._m.is_stopped()
