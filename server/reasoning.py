"""Thinking models' reasoning (--reasoning-parser): the text between <think> and </think> at the
start of a reply, or from its start when the chat template already opened the block at the end
of the prompt (Qwen3 thinking, DeepSeek-R1), is sent as ``reasoning_content`` instead of
``content``, as vLLM's reasoning parsers and llama.cpp's server send it. Templates that close an
empty block in the prompt (Qwen3 with enable_thinking false) leave the reply all content.
"""
from __future__ import annotations

from typing import Optional

from server.detokenize import partial_suffix

OPEN, CLOSE = "<think>", "</think>"
REASONING, CONTENT = "reasoning_content", "content"


def template_thinks(template: str) -> bool:
    """Whether a chat template belongs to a thinking model (it writes the closing tag)."""
    return CLOSE in template


def prompt_opens_block(prompt_tail: str) -> bool:
    """Whether the rendered prompt ends inside an open <think> block."""
    return prompt_tail.rstrip().endswith(OPEN)


class ReasoningSplit:
    """Splits one choice's text, as it streams, into (field, text) parts: reasoning first, then
    content. A piece that may be the start of a tag is held back until the next one decides."""

    def __init__(self, inside: bool) -> None:
        self._state = "reasoning" if inside else "start"
        self._buf = ""

    def feed(self, text: str, final: bool = False) -> list[tuple[str, str]]:
        self._buf += text
        out: list[tuple[str, str]] = []
        while True:
            if self._state == "start":               # before the first visible character
                head = self._buf.lstrip()
                if head.startswith(OPEN):
                    self._state, self._buf = "reasoning", head[len(OPEN):]
                    continue
                if not final and (not head or OPEN.startswith(head)):
                    return out                       # may still become <think>
                self._state = "content"
            if self._state == "reasoning":
                end = self._buf.find(CLOSE)
                if end < 0:
                    keep = 0 if final else partial_suffix(self._buf, CLOSE)
                    _emit(out, REASONING, self._buf[:len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    return out
                _emit(out, REASONING, self._buf[:end])
                self._state, self._buf = "after", self._buf[end + len(CLOSE):]
            if self._state == "after":               # the whitespace between the two parts
                self._buf = self._buf.lstrip()
                if not self._buf and not final:
                    return out
                self._state = "content"
            _emit(out, CONTENT, self._buf)
            self._buf = ""
            return out


def split(text: str, inside: bool) -> tuple[Optional[str], str]:
    """(reasoning or None, content) of a whole reply."""
    parts = ReasoningSplit(inside).feed(text, final=True)
    reasoning = "".join(t for f, t in parts if f == REASONING)
    content = "".join(t for f, t in parts if f == CONTENT)
    thought = inside or any(f == REASONING for f, _ in parts) or text.lstrip().startswith(OPEN)
    return (reasoning if thought else None), content


def _emit(out: list[tuple[str, str]], field: str, text: str) -> None:
    if text:
        out.append((field, text))
