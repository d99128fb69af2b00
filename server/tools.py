"""Tool calling: reading calls out of the model's text, whole and as it streams, and the grammar
that forces calls for tool_choice required/named. The request's tools and style are
server/tool_setup.py's, the prompt server/tool_prompt.py's.

Output styles (--tool-parser): 'hermes' is ``<tool_call>{"name": .., "arguments": {..}}</tool_call>``
(Hermes, Qwen); 'glm45' (GLM-4.5) and 'qwen3_coder' (Qwen3-Coder) write a call's arguments as
tagged pairs in the same tags (server/tool_formats.py; their parsers read Hermes blocks too);
'minimax_m2', 'deepseek_v3' and 'deepseek_v31' write blocks of calls in tags of their own
(server/tool_blocks.py); 'json' is a bare ``{"name": .., "arguments": {..}}`` object (or a list).
"""
from __future__ import annotations

import json
import re
from typing import Any, Optional

from server import tool_blocks
from server.detokenize import partial_suffix
from server.errors import bad_request
from server.structured import json_rule
from server.tool_blocks import BLOCKS, BlockScanner
from server.tool_formats import FORMATS, call_rule, check_schemas, read_block
from server.tool_prompt import CLOSE, OPEN, TAGGED, prompt_messages
from server.tool_setup import (ToolCall, ToolSetup, lit, new_id, parse_setup,
                               template_style)

__all__ = ["ToolCall", "ToolSetup", "ToolStream", "forcing_grammar", "new_id", "parse",
           "parse_setup", "prompt_messages", "template_style"]


def forcing_grammar(setup: ToolSetup) -> str:
    """Lark grammar for tool_choice required/named: one call (or several, when parallel calls
    are allowed and no function is named), each argument object following its schema, in the
    model's own format; the format's tags that are single tokens of the model's tokenizer are
    named as those tokens (server/tool_setup.py's ToolSetup.tokens)."""
    if setup.style in BLOCKS:
        return tool_blocks.forcing_grammar(setup)
    funcs = [f for f in setup.tools if setup.named is None or f["name"] == setup.named]
    fmt, tokens = FORMATS.get(setup.style), setup.tokens
    problem = check_schemas(funcs) if fmt else None
    if problem is not None:
        raise bad_request(*problem)
    rules = []
    for i, f in enumerate(funcs):
        if fmt:
            rules.append(f"fn{i}: " + call_rule(fmt, f, bool(f.get("strict")), tokens))
            continue
        schema = {"type": "object", "properties": {"name": {"const": f["name"]},
                                                   "arguments": f["parameters"]},
                  "required": ["name", "arguments"], "additionalProperties": False}
        rules.append(f"fn{i}: " + json_rule(schema, strict=bool(f.get("strict"))))
    body = "call_body: " + " | ".join(f"fn{i}" for i in range(len(funcs)))
    many = setup.parallel and setup.named is None
    if fmt:                             # the call's own text follows the tag directly
        call = f"call: {lit(OPEN, tokens)} call_body {lit(CLOSE, tokens)}"
        start = 'start: call ("\\n" call)*' if many else "start: call"
    elif setup.style == "hermes":
        call = f"call: {lit(OPEN + chr(10), tokens)} call_body {lit(chr(10) + CLOSE, tokens)}"
        start = 'start: call ("\\n" call)*' if many else "start: call"
    else:
        call = "call: call_body"
        start = 'start: call | "[" call ("," call)* "]"' if many else "start: call"
    return "\n".join([start, call, body, *rules])


def _calls_from_json(value: Any) -> Optional[list[ToolCall]]:
    items = value if isinstance(value, list) else [value]
    calls = []
    for v in items:
        if not isinstance(v, dict) or not isinstance(v.get("name"), str):
            return None
        args = v.get("arguments", v.get("parameters", {}))
        text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        calls.append(ToolCall(v["name"], text, new_id()))
    return calls or None


def parse_hermes(text: str, setup: Optional[ToolSetup] = None) -> tuple[str, list[ToolCall]]:
    """Content outside the tags, and the calls whose JSON parses (a last unclosed tag counts);
    in the glm45 style a block that is not JSON is read as GLM's name and argument pairs."""
    calls, content, pos = [], [], 0
    while True:
        start = text.find(OPEN, pos)
        if start < 0:
            content.append(text[pos:])
            break
        content.append(text[pos:start])
        end = text.find(CLOSE, start)
        inner = text[start + len(OPEN):end if end >= 0 else len(text)]
        try:
            parsed = _calls_from_json(json.loads(inner))
        except json.JSONDecodeError:
            parsed = None
        fmt = FORMATS.get(setup.style) if setup is not None else None
        if parsed is None and fmt and end >= 0:
            pairs = read_block(fmt, inner, setup.by_name)
            parsed = [ToolCall(pairs[0], pairs[1], new_id())] if pairs else None
        if parsed is None:
            content.append(text[start:end + len(CLOSE) if end >= 0 else len(text)])
        else:
            calls += parsed
        if end < 0:
            break
        pos = end + len(CLOSE)
    return "".join(content).strip() if calls else "".join(content), calls


def parse_json(text: str) -> tuple[str, list[ToolCall]]:
    try:
        calls = _calls_from_json(json.loads(text))
    except json.JSONDecodeError:
        calls = None
    return ("", calls) if calls else (text, [])


_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"arguments"\s*:\s*')
_DECODER = json.JSONDecoder()


def _truncated_call(text: str, setup: ToolSetup) -> Optional[tuple[str, list[ToolCall]]]:
    """A forced reply cut short (max_tokens): (text before the cut call, the calls in it). OpenAI
    too answers such a cut with the partial call and finish_reason 'length'; returning it as
    content would hand a client that forced a call our call markup as text.

    The calls whose JSON is complete come back whole (a cut that took only ``</tool_call>``, or
    the rest of a JSON list, leaves them intact), the last incomplete one with the arguments
    written so far."""
    start = text.rfind(OPEN) if setup.style in TAGGED else -1
    if start >= 0 and text.find(CLOSE, start) >= 0:
        return None   # the last call is complete
    fmt = FORMATS.get(setup.style)
    if fmt and start >= 0:
        pairs = read_block(fmt, text[start + len(OPEN):], setup.by_name, partial=True)
        return (text[:start], [ToolCall(pairs[0], pairs[1], new_id())]) if pairs else None
    body = text[start + len(OPEN):] if start >= 0 else text.lstrip().removeprefix("[")
    calls: list[ToolCall] = []
    pos = 0
    while True:   # complete call objects first (separated by whitespace or commas)
        while pos < len(body) and body[pos] in " \t\r\n,":
            pos += 1
        try:
            value, end = _DECODER.raw_decode(body, pos)
        except json.JSONDecodeError:
            break
        done = _calls_from_json(value)
        if done is None:
            return None
        calls, pos = calls + done, end
    m = _CALL_HEAD.match(body, pos)
    if m is not None:
        calls.append(ToolCall(m.group(1), body[m.end():].rstrip(), new_id()))
    return (text[:max(start, 0)], calls) if calls else None


def parse(text: str, setup: ToolSetup) -> tuple[str, list[ToolCall]]:
    """(content, calls) of one finished reply; known function names only; one call without
    parallel_tool_calls. With tool_choice required/named the reply is only calls (the grammar
    allows nothing else), so a last one cut short comes back with its partial arguments."""
    if setup.style in BLOCKS:
        return tool_blocks.parse(text, setup)
    tagged = setup.style in TAGGED
    content, calls = parse_hermes(text, setup) if tagged else ("", [])
    if not calls:
        content, calls = parse_json(text.strip())
        if not calls:
            content = text
    cut = _truncated_call(text, setup) if setup.forced else None
    if cut is not None and (tagged or not calls):
        before, tail = cut
        calls = (parse_hermes(before, setup)[1] if tagged else []) + tail
        content = ""
    calls = [c for c in calls if c.name in setup.by_name]
    if not calls:
        return text, []
    return content, calls if setup.parallel else calls[:1]


class ToolStream:
    """Streams one choice: content deltas pass through until a call may begin; each call is sent
    once its text is complete, as OpenAI's deltas (index, id, type and name, then the arguments in
    fragments). A reply that opens with '{' or '[' is held to its end and parsed whole. The block
    styles are read by server/tool_blocks.py's BlockScanner, as their whole replies are."""

    FRAGMENT = 24   # characters of arguments per delta

    def __init__(self, setup: ToolSetup) -> None:
        self.setup, self.buf, self.calls = setup, "", 0
        self._mode: Optional[str] = None   # None (undecided), "text", "json"
        self._blocks = BlockScanner(BLOCKS[setup.style], setup) if setup.style in BLOCKS else None

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self._blocks is not None:
            return self._events(self._blocks.feed(text))
        self.buf += text
        if self._mode is None:
            head = self.buf.lstrip()
            if not head:
                return []
            self._mode = "json" if head[0] in "{[" else "text"
        return [] if self._mode == "json" else self._drain(final=False)

    def finish(self) -> list[dict[str, Any]]:
        if self._blocks is not None:
            return self._events(self._blocks.finish())
        if self._mode == "json":
            content, calls = parse(self.buf, self.setup)
            self.buf = ""
            return self._call_deltas(calls) if calls else self._content(content)
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.setup.style not in TAGGED:
            out += self._content(self.buf)
            self.buf = ""
            return out
        while self.buf:
            start = self.buf.find(OPEN)
            if start < 0:
                keep = 0 if final else partial_suffix(self.buf, OPEN)
                out += self._content(self.buf[:len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                break
            out += self._content(self.buf[:start])
            self.buf = self.buf[start:]
            end = self.buf.find(CLOSE)
            if end < 0 and not final:
                break
            whole = self.buf if end < 0 else self.buf[:end + len(CLOSE)]
            self.buf = "" if end < 0 else self.buf[end + len(CLOSE):]
            _, calls = parse(whole, self.setup)
            out += self._call_deltas(calls) if calls else self._content(whole)
        return out

    def _events(self, events: list[tuple[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for _, value in events:
            out += self._call_deltas([value]) if isinstance(value, ToolCall) else [{"content": value}]
        return out

    def _content(self, text: str) -> list[dict[str, Any]]:
        if self.calls:   # after a call, text between calls is only whitespace or noise
            text = text.strip()
        return [{"content": text}] if text else []

    def _call_deltas(self, calls: list[ToolCall]) -> list[dict[str, Any]]:
        out = []
        for c in calls:
            if self.calls and not self.setup.parallel:
                break
            i = self.calls
            self.calls += 1
            out.append({"tool_calls": [{"index": i, "id": c.id, "type": "function",
                                        "function": {"name": c.name, "arguments": ""}}]})
            for k in range(0, len(c.arguments), self.FRAGMENT):
                out.append({"tool_calls": [{"index": i, "function": {
                    "arguments": c.arguments[k:k + self.FRAGMENT]}}]})
        return out
