"""GLM-4.5's tool-call format (--tool-parser glm45), as its chat template asks for it and renders
past calls:

    <tool_call>get_weather
    <arg_key>city</arg_key>
    <arg_value>Paris</arg_value>
    <arg_key>days</arg_key>
    <arg_value>3</arg_value>
    </tool_call>

A value is the raw text for a string parameter and JSON for any other (the template writes
``v | tojson if v is not string else v``); a value that does not parse as JSON stays a string, as
vLLM's glm45 parser does. The blocks share Hermes' tags, so finding and streaming them is
server/tools.py's; this module reads, cuts and forces the inside of one block.
"""
from __future__ import annotations

import json
import re
from typing import Any, Optional

from server.structured import json_rule

KEY_OPEN, KEY_CLOSE = "<arg_key>", "</arg_key>"
VALUE_OPEN, VALUE_CLOSE = "<arg_value>", "</arg_value>"
_HEAD = re.compile(r"\s*([A-Za-z0-9_.\-]{1,64})[ \t]*(?:\n|$)")
_ARG = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


def _is_text(schema: Any) -> bool:
    """Whether a parameter's values are strings, which GLM writes raw (not as JSON)."""
    if not isinstance(schema, dict):
        return False
    if "enum" in schema:
        return bool(schema["enum"]) and all(isinstance(v, str) for v in schema["enum"])
    if "const" in schema:
        return isinstance(schema["const"], str)
    return schema.get("type") == "string"


def _string_params(function: Optional[dict[str, Any]]) -> set[str]:
    """The parameters whose values are taken as written."""
    props = ((function or {}).get("parameters") or {}).get("properties") or {}
    return {k for k, v in props.items() if _is_text(v)}


def _value(raw: str, as_string: bool) -> Any:
    if as_string:
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def read_block(inner: str, functions: dict[str, dict[str, Any]],
               partial: bool = False) -> Optional[tuple[str, str]]:
    """(name, arguments as JSON text) of one block's inside, or None if it is not this format.
    ``partial``: the block was cut short; the arguments are the complete pairs so far as an
    unclosed JSON object (OpenAI's partial arguments of a cut call are a JSON prefix too)."""
    head = _HEAD.match(inner)
    if head is None or (partial and not head.group(0).endswith("\n")):
        return None                         # (a cut name may be any prefix of a name)
    name, pos, args = head.group(1), head.end(), {}
    strings = _string_params(functions.get(name))
    while True:
        m = _ARG.match(inner, pos)
        if m is None:
            break
        args[m.group(1).strip()] = _value(m.group(2), m.group(1).strip() in strings)
        pos = m.end()
    if inner[pos:].strip() and not partial:
        return None                         # text that is neither a pair nor the end
    text = json.dumps(args, ensure_ascii=False)
    return name, (text[:-1] if partial else text)


def _value_rule(schema: dict[str, Any], strict: bool) -> str:
    """Lark for a value and its closing tag: a string parameter's raw text (one of its enum or
    const, else text of its length bounds without '<', else any text without '</'), JSON following
    the schema for the others. Free text and its closing tag are one regex: llguidance's lexer is
    greedy, so a separate closing tag after a text lexeme that may contain '<' would never begin."""
    close = json.dumps(VALUE_CLOSE + "\n")
    if not _is_text(schema):
        return f"({json_rule(schema, strict)}) {close}"
    if "enum" in schema or "const" in schema:
        words = " | ".join(json.dumps(v) for v in schema.get("enum", [schema.get("const")]))
        return f"({words}) {close}"
    lo, hi = int(schema.get("minLength", 0)), schema.get("maxLength")
    if lo == 0 and hi is None:
        return r"/([^<]|<[^\/])*<\/arg_value>\n/"
    return "/[^<]{%d,%s}/ %s" % (lo, "" if hi is None else int(hi), close)


def call_rule(function: dict[str, Any], strict: bool) -> str:
    """Lark body of one forced call's inside: its name, then its declared parameters in schema
    order (required ones always, the others optional), each with a value as _value_rule writes."""
    params = function["parameters"]
    required = set(params.get("required") or ())
    parts = [json.dumps(function["name"] + "\n")]
    for key, schema in (params.get("properties") or {}).items():
        opening = json.dumps(f"{KEY_OPEN}{key}{KEY_CLOSE}\n{VALUE_OPEN}")
        pair = f"{opening} {_value_rule(schema if isinstance(schema, dict) else {}, strict)}"
        parts.append(pair if key in required else f"({pair})?")
    return " ".join(parts)
