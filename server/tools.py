"""Tool calling: request validation, the prompt (through the chat template when it takes
``tools``, else a Hermes-style system prompt), the grammar that forces calls for
tool_choice required/named, and the parsers that read calls out of the model's text.

Output styles (--tool-parser): 'hermes' is ``<tool_call>{"name": .., "arguments": {..}}</tool_call>``
(Hermes, Qwen); 'glm45' (GLM-4.5) and 'qwen3_coder' (Qwen3-Coder) write a call's arguments as
tagged pairs in the same tags (server/tool_formats.py; their parsers read Hermes blocks too);
'json' is a bare ``{"name": .., "arguments": {..}}`` object (or a list of them).
"""
from __future__ import annotations

import functools
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from server.tool_formats import FORMATS, call_rule, check_schemas, read_block
from server.detokenize import partial_suffix
from server.errors import bad_request
from server.structured import json_rule

OPEN, CLOSE = "<tool_call>", "</tool_call>"
TAGGED = ("hermes", *FORMATS)        # the styles whose calls sit between OPEN and CLOSE
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")

SYSTEM_PROMPT = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n"
    "</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    "{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")
JSON_SYSTEM_PROMPT = (
    "You may call a function to assist with the user query. The functions:\n{tools}\n\n"
    "To call one, reply with only a JSON object: "
    "{{\"name\": <function-name>, \"arguments\": <args-json-object>}}")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str          # JSON text, as OpenAI sends it
    id: str

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolSetup:
    """What a chat request asked of its tools, validated."""

    tools: tuple[dict[str, Any], ...]     # the "function" objects
    choice: str                           # none | auto | required | named
    named: Optional[str]
    parallel: bool
    style: str                            # hermes | glm45 | qwen3_coder | json

    @functools.cached_property
    def by_name(self) -> dict[str, dict[str, Any]]:
        return {f["name"]: f for f in self.tools}

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.active and self.choice in ("required", "named")


def template_style(template: str) -> str:
    """The output style a chat template teaches its model: a tagged-pairs format whose tags it
    writes (GLM-4.5's <arg_key>, Qwen3-Coder's <parameter=), else hermes."""
    return next((f.style for f in FORMATS.values() if f.marker in template), "hermes")


def new_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parse_setup(tools: Optional[list[Any]], tool_choice: Any, parallel: Optional[bool],
                style: str) -> ToolSetup:
    """Validate ``tools``/``tool_choice``; 400 naming the field on anything malformed."""
    funcs = []
    for i, t in enumerate(tools or []):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(f, dict):
            raise bad_request("each tool must be {\"type\": \"function\", \"function\": {...}}",
                              f"tools.{i}")
        name = f.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise bad_request("a function name must be 1-64 characters of a-z, A-Z, 0-9, _, . "
                              "or -", f"tools.{i}.function.name")
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise bad_request("parameters must be a JSON Schema object",
                              f"tools.{i}.function.parameters")
        funcs.append({**f, "parameters": params})
    if len({f["name"] for f in funcs}) != len(funcs):
        raise bad_request("function names must be unique", "tools")
    named = None
    if tool_choice is None:
        choice = "auto" if funcs else "none"
    elif isinstance(tool_choice, str) and tool_choice in ("none", "auto", "required"):
        choice = tool_choice
    elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        choice, named = "named", tool_choice["function"].get("name")
        if named not in {f["name"] for f in funcs}:
            raise bad_request(f"tool_choice names function {named!r}, which is not in tools",
                              "tool_choice")
    else:
        raise bad_request("tool_choice must be 'none', 'auto', 'required' or "
                          "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    if choice in ("required",) and not funcs:
        raise bad_request("tool_choice 'required' needs at least one tool", "tool_choice")
    return ToolSetup(tuple(funcs), choice, named, True if parallel is None else bool(parallel),
                     style)


def _render_call(name: str, arguments: Any, style: str) -> str:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{OPEN}\n{body}\n{CLOSE}" if style in TAGGED else body


def prompt_messages(messages: list[dict[str, Any]], setup: ToolSetup,
                    template_takes_tools: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages (and extra template variables) for the chat template.

    A template that takes ``tools`` gets them and the history as is (arguments as objects, as
    transformers templates expect). Otherwise the tools go into the system message and the
    history is rewritten in the output style: assistant tool_calls as text, tool results as a
    user turn in <tool_response> tags (the Hermes convention).
    """
    if template_takes_tools:
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [_object_arguments(c) for c in m["tool_calls"]]
            out.append(m)
        return out, ({"tools": [{"type": "function", "function": f} for f in setup.tools]}
                     if setup.active else {})
    out = []
    for m in messages:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            calls = [_render_call(c.get("function", {}).get("name", ""),
                                  c.get("function", {}).get("arguments", {}), setup.style)
                     for c in m["tool_calls"] if isinstance(c, dict)]
            text = "\n".join(([m["content"]] if m.get("content") else []) + calls)
            out.append({"role": "assistant", "content": text})
        elif role == "tool":
            text = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("_tool_turn"):
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "_tool_turn": True})
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content")})
    for m in out:
        m.pop("_tool_turn", None)
    if setup.active:
        listing = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False)
                            for f in setup.tools)
        tpl = SYSTEM_PROMPT if setup.style in TAGGED else JSON_SYSTEM_PROMPT
        text = tpl.format(tools=listing)
        if out and out[0].get("role") == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{text}"}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out, {}


def _object_arguments(call: Any) -> Any:
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        args = call["function"].get("arguments")
        if isinstance(args, str):
            try:
                return {**call, "function": {**call["function"], "arguments": json.loads(args)}}
            except json.JSONDecodeError:
                pass
    return call


def forcing_grammar(setup: ToolSetup) -> str:
    """Lark grammar for tool_choice required/named: one call (or several, when parallel calls
    are allowed and no function is named), each argument object following its schema."""
    funcs = [f for f in setup.tools if setup.named is None or f["name"] == setup.named]
    fmt = FORMATS.get(setup.style)
    problem = check_schemas(funcs) if fmt else None
    if problem is not None:
        raise bad_request(*problem)
    rules = []
    for i, f in enumerate(funcs):
        if fmt:
            rules.append(f"fn{i}: " + call_rule(fmt, f, strict=bool(f.get("strict"))))
            continue
        schema = {"type": "object", "properties": {"name": {"const": f["name"]},
                                                   "arguments": f["parameters"]},
                  "required": ["name", "arguments"], "additionalProperties": False}
        rules.append(f"fn{i}: " + json_rule(schema, strict=bool(f.get("strict"))))
    body = "call_body: " + " | ".join(f"fn{i}" for i in range(len(funcs)))
    many = setup.parallel and setup.named is None
    if fmt:                             # the call's own text follows the tag directly
        call = f'call: "{OPEN}" call_body "{CLOSE}"'
        start = 'start: call ("\\n" call)*' if many else "start: call"
    elif setup.style == "hermes":
        call = f'call: "{OPEN}\\n" call_body "\\n{CLOSE}"'
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
    fragments). A reply that opens with '{' or '[' is held to its end and parsed whole."""

    FRAGMENT = 24   # characters of arguments per delta

    def __init__(self, setup: ToolSetup) -> None:
        self.setup, self.buf, self.calls = setup, "", 0
        self._mode: Optional[str] = None   # None (undecided), "text", "json"

    def feed(self, text: str) -> list[dict[str, Any]]:
        self.buf += text
        if self._mode is None:
            head = self.buf.lstrip()
            if not head:
                return []
            self._mode = "json" if head[0] in "{[" else "text"
        return [] if self._mode == "json" else self._drain(final=False)

    def finish(self) -> list[dict[str, Any]]:
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
