"""Incremental detokenization and stop strings.

Text is released only once it is final: a token that ends inside a UTF-8 character decodes to
U+FFFD and is held until the character completes, and text that could be the start of a stop
string is held until it is known not to be one. Nothing of a matched stop string is ever released.
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Token ids in, text deltas out; the concatenated deltas equal decode(all ids).

    Decodes a short window (the previous token(s) plus the new ones) instead of the whole text, so
    that word-boundary spaces (SentencePiece) come out right without quadratic cost.
    """

    def __init__(self, tokenizer: Decoder) -> None:
        self._tok = tokenizer
        self.ids: list[int] = []
        self._prefix = 0   # window start: decoded text of ids[_prefix:_read] was already released
        self._read = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Release whatever is held (an incomplete character at the very end decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix_text = self._tok.decode(self.ids[self._prefix:self._read])
        new_text = self._tok.decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text):]
        return ""


class StopMatcher:
    """Releases generated text while withholding anything that may belong to a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._max = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self._sent = 0
        self.stopped = False
        self.matched: Optional[str] = None    # the stop string that matched

    def feed(self, delta: str) -> str:
        """Add ``delta``; return the text that is now safe to release. Sets ``stopped`` on a match
        (the returned text then ends right before the stop string)."""
        if self.stopped:
            return ""
        self.text += delta
        if not self.stops:
            out, self._sent = self.text[self._sent:], len(self.text)
            return out
        hit = -1
        for s in self.stops:
            i = self.text.find(s, self._sent)
            if i != -1 and (hit == -1 or i < hit):
                hit, self.matched = i, s
        if hit != -1:
            self.stopped = True
            out, self._sent = self.text[self._sent:hit], hit
            self.text = self.text[:hit]
            return out
        end = len(self.text) - self._held_suffix()
        out, self._sent = self.text[self._sent:end], max(self._sent, end)
        return out

    def _held_suffix(self) -> int:
        """Length of the longest unreleased suffix that is a proper prefix of some stop string."""
        avail = len(self.text) - self._sent
        for k in range(min(self._max - 1, avail), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def flush(self) -> str:
        """Generation ended without a match: release the held text."""
        if self.stopped:
            return ""
        out, self._sent = self.text[self._sent:], len(self.text)
        return out


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
