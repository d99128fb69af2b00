"""Tool-call formats that write a reply's calls as a block of calls in tags of their own, as
vLLM's parsers of the same names read them:

MiniMax-M2 (--tool-parser minimax_m2), its values as server/tool_formats.py reads them::

    <minimax:tool_call>
    <invoke name="get_weather">
    <parameter name="city">Paris</parameter>
    </invoke>
    </minimax:tool_call>

DeepSeek-V3 and R1 (deepseek_v3), calls one a line, and DeepSeek-V3.1 (deepseek_v31), calls
back to back, in DeepSeek's special tokens (fullwidth bars, U+2581 for spaces)::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
    ```json
    {"city": "Paris"}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>

A call is sent when its closing tag arrives; one naming a function not in ``tools``, or whose
arguments do not parse as a JSON object, stays text (the whole block when none of its calls is
one). DeepSeek's tags never reach the content: they are removed from it (its separator reads as a
space). Whitespace after a block of calls, and at the end of a reply with calls, is dropped.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

from server.detokenize import partial_suffix
from server.errors import bad_request
from server.structured import json_rule
from server.tool_formats import MINIMAX_INVOKE, call_rule, check_schemas, read_block
from server.tool_setup import ToolCall, ToolSetup, lit, new_id

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
DEEPSEEK_TAGS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)
MINIMAX_TAGS = ("<minimax:tool_call>", "</minimax:tool_call>")
_NAME = r"[A-Za-z0-9_.\-]{1,64}"
_V3 = re.compile(rf"\s*\w*\s*{SEP}\s*({_NAME})[ \t]*\n```(?:json)?[ \t]*\n?(.*)", re.S)
_V31 = re.compile(rf"\s*({_NAME})\s*{SEP}(.*)", re.S)
_FENCE_END = re.compile(r"\s*`{1,3}\s*$")
Event = tuple[str, Union[str, ToolCall]]        # ("text", str) or ("call", ToolCall)


@dataclass(frozen=True)
class BlockFormat:
    style: str
    open: str                 # the block of calls
    close: str
    call_open: str            # one call in it
    call_close: str
    between: str              # what a forced reply writes between two calls
    hidden: tuple[str, ...]   # tags removed from the content (special tokens, never shown)


MINIMAX_M2 = BlockFormat("minimax_m2", *MINIMAX_TAGS, "<invoke", "</invoke>", "", ())
DEEPSEEK_V3 = BlockFormat("deepseek_v3", CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, "\n", DEEPSEEK_TAGS)
DEEPSEEK_V31 = BlockFormat("deepseek_v31", CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, "", DEEPSEEK_TAGS)
BLOCKS = {f.style: f for f in (MINIMAX_M2, DEEPSEEK_V3, DEEPSEEK_V31)}


def _arguments(text: str, partial: bool) -> Optional[str]:
    """DeepSeek's arguments as JSON text: a JSON object; cut short (``partial``), the text so far."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text.rstrip() if partial else None
    if not isinstance(value, dict):
        return None
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError:                  # NaN or infinity: no JSON
        return None


def read_call(fmt: BlockFormat, text: str, functions: dict[str, dict[str, Any]],
              partial: bool = False) -> Optional[tuple[str, str]]:
    """(name, arguments as JSON text) of one call's text, from its opening tag through its
    closing one, or None if it is not one. ``partial``: the reply was cut in it (a forced call):
    the arguments so far, once the name is complete."""
    if fmt is MINIMAX_M2:
        return read_block(MINIMAX_INVOKE, text, functions, partial)
    inner = text[len(fmt.call_open):].removesuffix(fmt.call_close)
    m = (_V3 if fmt is DEEPSEEK_V3 else _V31).match(inner)
    if m is None:
        return None
    args = m.group(2).strip() if fmt is DEEPSEEK_V31 else m.group(2)
    if fmt is DEEPSEEK_V3:
        fence = _FENCE_END.search(args)
        if fence is None and not partial:
            return None
        args = args[:fence.start()] if fence else args
    got = _arguments(args, partial)
    return None if got is None else (m.group(1), got)


class BlockScanner:
    """One reply of a block format, read as it streams: ``feed`` gives its text and calls as
    events as soon as they are known, holding back what may be the start of a tag, and
    ``finish`` the rest. Reading a whole reply is feeding it at once, so both agree."""

    def __init__(self, fmt: BlockFormat, setup: ToolSetup) -> None:
        self.fmt, self.setup, self.buf = fmt, setup, ""
        self.block: Optional[list[str]] = None  # the open block's text so far
        self.found = 0                          # its calls
        self.skipped: list[str] = []            # its text that was no call
        self.space = ""                         # trailing whitespace held back
        self.after = False                      # right after a block of calls
        self.calls = 0                          # the reply's calls

    def feed(self, text: str, final: bool = False) -> list[Event]:
        f, out = self.fmt, []
        self.buf += text
        while True:
            if self.block is None:
                at = self.buf.find(f.open)
                if at < 0:
                    keep = 0 if final else max(partial_suffix(self.buf, t) for t in (f.open, *f.hidden))
                    self._text(out, self.buf[:len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    return out
                self._text(out, self.buf[:at])
                self.buf = self.buf[at + len(f.open):]
                self.block, self.found, self.skipped = [f.open], 0, []
                continue
            body = self.buf.lstrip()
            gap = self.buf[:len(self.buf) - len(body)]
            if body.startswith(f.close):
                self.block.append(gap + f.close)
                self.buf = body[len(f.close):]
                self._end(out)
            elif body.startswith(f.call_open):
                end = body.find(f.call_close)
                if end < 0:
                    if final:
                        self._call(out, gap, body, complete=False)
                        self.buf = ""
                        self._end(out)
                    return out
                self.buf = body[end + len(f.call_close):]
                self._call(out, gap, body[:end + len(f.call_close)], complete=True)
            elif not final and (not body or any(t.startswith(body) for t in (f.close, f.call_open))):
                return out                      # (the start of a tag, or nothing yet)
            elif not body:                      # the reply ended inside the block
                self._end(out)
                return out
            else:                               # text that is no call, up to the next tag
                stops = [i for i in (body.find(f.call_open), body.find(f.close)) if i > 0]
                cut = min(stops) if stops else len(body) - (
                    0 if final else max(partial_suffix(body, t) for t in (f.call_open, f.close)))
                if cut == 0:
                    return out
                self.block.append(gap + body[:cut])
                self.skipped.append(body[:cut])
                self.buf = body[cut:]

    def finish(self) -> list[Event]:
        out = self.feed("", final=True)
        if self.space and not self.calls:       # (a reply with calls: its content is stripped)
            out.append(("text", self.space))
        self.space = ""
        return out

    def _call(self, out: list[Event], gap: str, text: str, complete: bool) -> None:
        assert self.block is not None
        self.block.append(gap + text)
        got = read_call(self.fmt, text, self.setup.by_name, partial=not complete)
        if got is not None and got[0] in self.setup.by_name and (complete or self.setup.forced):
            out.append(("call", ToolCall(got[0], got[1], new_id())))
            self.found += 1
            self.calls += 1
        else:
            self.skipped.append(text)

    def _end(self, out: list[Event]) -> None:
        """The block is over: a block of no calls is text as written; else the calls are out,
        and the text in it that was no call follows them."""
        assert self.block is not None
        raw, self.block = "".join(self.block), None
        if not self.found:
            self._text(out, raw)
        else:
            self.after = True
            self._text(out, "\n".join(self.skipped))

    def _text(self, out: list[Event], text: str) -> None:
        for tag in self.fmt.hidden:
            text = text.replace(tag, " " if tag == SEP else "")
        if self.after:
            text = text.lstrip()
            self.after = not text
        text = self.space + text
        body = text.rstrip()
        self.space = text[len(body):]
        if body:
            out.append(("text", body))


def parse(text: str, setup: ToolSetup) -> tuple[str, list[ToolCall]]:
    """(content, calls) of one finished reply; one call without parallel_tool_calls."""
    scanner = BlockScanner(BLOCKS[setup.style], setup)
    events = scanner.feed(text) + scanner.finish()
    calls = [v for k, v in events if isinstance(v, ToolCall)]
    content = "".join(v for k, v in events if isinstance(v, str))
    return content, calls if setup.parallel else calls[:1]


def forcing_grammar(setup: ToolSetup) -> str:
    """Lark for tool_choice required/named in the model's own format: one block of one call (or
    several, when parallel calls are allowed and no function is named), each call's arguments
    following its schema; its tags named as tokens where the model's tokenizer has them."""
    fmt, tokens = BLOCKS[setup.style], setup.tokens
    funcs = [f for f in setup.tools if setup.named is None or f["name"] == setup.named]
    rules = []
    if fmt is MINIMAX_M2:
        problem = check_schemas(funcs)
        if problem is not None:
            raise bad_request(*problem)
        for i, f in enumerate(funcs):
            rules.append(f"fn{i}: " + call_rule(MINIMAX_INVOKE, f, bool(f.get("strict")), tokens))
        head = lit(fmt.open + "\n", tokens)
    else:
        for i, f in enumerate(funcs):
            name = f"function{SEP}{f['name']}\n```json\n" if fmt is DEEPSEEK_V3 else f["name"] + SEP
            end = "\n```" + CALL_END if fmt is DEEPSEEK_V3 else CALL_END
            args = json_rule(f["parameters"], strict=bool(f.get("strict")))
            rules.append(f"fn{i}: {lit(CALL_BEGIN + name, tokens)} ({args}) {lit(end, tokens)}")
        head = lit(fmt.open, tokens)
    many = setup.parallel and setup.named is None
    between = lit(fmt.between, tokens) + " " if fmt.between else ""
    more = f" ({between}call)*" if many else ""
    return "\n".join([f"start: {head} call{more} {lit(fmt.close, tokens)}",
                      "call: " + " | ".join(f"fn{i}" for i in range(len(funcs))), *rules])
