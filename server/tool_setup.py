"""Tool calling's request side: the validated ``tools``/``tool_choice`` (ToolSetup), the output
style (--tool-parser, or the one a chat template teaches its model), and the Lark spelling of a
format's tags in forcing grammars.

Styles: 'hermes' (<tool_call>{json}</tool_call>), 'glm45' and 'qwen3_coder' (tagged key/value
pairs in the same tags, server/tool_formats.py), 'minimax_m2', 'deepseek_v3' and 'deepseek_v31'
(blocks of calls in their own tags, server/tool_blocks.py), 'json' (a bare JSON call) and
'harmony' (gpt-oss, server/harmony.py).
"""
from __future__ import annotations

import functools
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from server.errors import bad_request
from server.tokenizer import KEPT_TAGS

_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
DEEPSEEK_CALLS = "<｜tool▁calls▁begin｜>"     # (fullwidth bars and U+2581, as DeepSeek spells them)
# (style, the strings a chat template of that style writes, all of them), first match wins:
# DeepSeek-V3/R1 templates write the arguments in a ```json fence, V3.1's bare after the name
TEMPLATE_MARKERS = (("deepseek_v3", (DEEPSEEK_CALLS, "```json")), ("deepseek_v31", (DEEPSEEK_CALLS,)),
                    ("minimax_m2", ("<minimax:tool_call>",)), ("glm45", ("<arg_key>",)),
                    ("qwen3_coder", ("<parameter=",)))


def lit(text: str, tokens: frozenset[str]) -> str:
    """Lark for the literal ``text``: quoted, except the tags in it that are single tokens of the
    model's tokenizer (``tokens``, see ToolSetup.tokens), which are named bare."""
    parts, pos = [], 0
    while pos < len(text):
        hits = [(text.find(t, pos), -len(t), t) for t in tokens if text.find(t, pos) >= 0]
        if not hits:
            parts.append(json.dumps(text[pos:], ensure_ascii=False))
            break
        at, _, tag = min(hits)
        if at > pos:
            parts.append(json.dumps(text[pos:at], ensure_ascii=False))
        parts.append(tag)
        pos = at + len(tag)
    return " ".join(parts) or '""'


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str          # JSON text, as OpenAI sends it
    id: str

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def arguments_object(arguments: str) -> dict[str, Any]:
    """A call's JSON arguments as an object, for the APIs that send them as one (Anthropic's,
    Ollama's): arguments that are not a JSON object (cut by max_tokens) are {}."""
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class ToolSetup:
    """What a chat request asked of its tools, validated."""

    tools: tuple[dict[str, Any], ...]     # the "function" objects
    choice: str                           # none | auto | required | named
    named: Optional[str]
    parallel: bool
    style: str                            # a --tool-parser style
    # the tags of the tool formats (server/tokenizer.py's KEPT_TAGS) that are single tokens of the
    # model's tokenizer: a forcing grammar names those bare, since llguidance takes a quoted
    # literal equal to such a token's text only spelled out byte by byte while its mask offers the
    # token itself, which it then rejects (a forced call would fail at its first tag)
    tokens: frozenset[str] = frozenset()

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
    """The output style a chat template teaches its model: the format whose tags it writes
    (DeepSeek's, MiniMax-M2's, GLM-4.5's <arg_key>, Qwen3-Coder's <parameter=), else hermes."""
    return next((style for style, marks in TEMPLATE_MARKERS if all(m in template for m in marks)),
                "hermes")


def new_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parse_setup(tools: Optional[list[Any]], tool_choice: Any, parallel: Optional[bool],
                style: str, tokens: Iterable[str] = ()) -> ToolSetup:
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
                     style, frozenset(tokens) & frozenset(KEPT_TAGS))
