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
_HEAD = re.compile(r"\s*([A-Za-z0-9_.\-]{1,64})[ \t]*(\n|$)")
_KEY = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>", re.S)
_DECODER = json.JSONDecoder()
_TEXT_KEYS = {"type", "enum", "const", "minLength", "maxLength", "description", "title", "examples"}


def _is_text(schema: Any) -> bool:
    """Whether a parameter's values are strings, which GLM writes raw (not as JSON)."""
    if not isinstance(schema, dict):
        return False
    if "enum" in schema:
        return bool(schema["enum"]) and all(isinstance(v, str) for v in schema["enum"])
    if "const" in schema:
        return isinstance(schema["const"], str)
    return schema.get("type") == "string"


def properties(function: Optional[dict[str, Any]]) -> dict[str, Any]:
    props = ((function or {}).get("parameters") or {}).get("properties")
    return props if isinstance(props, dict) else {}


def _value_at(inner: str, pos: int, as_string: bool) -> Optional[tuple[Any, int]]:
    """The value that starts at ``pos`` and the position after its closing tag: raw text up to
    the first closing tag for a string parameter; else the JSON value there when the closing
    tag follows it (a JSON string may hold the tag), else the raw text as a string."""
    if not as_string:
        try:
            value, end = _DECODER.raw_decode(inner, pos)
            if inner.startswith(VALUE_CLOSE, end):
                return value, end + len(VALUE_CLOSE)
        except json.JSONDecodeError:
            pass
    end = inner.find(VALUE_CLOSE, pos)
    if end < 0:
        return None
    raw = inner[pos:end]
    if not as_string:
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            pass
    return raw, end + len(VALUE_CLOSE)


def read_block(inner: str, functions: dict[str, dict[str, Any]],
               partial: bool = False) -> Optional[tuple[str, str]]:
    """(name, arguments as JSON text) of one block's inside, or None if it is not this format.
    ``partial``: the block was cut short; the arguments are the complete pairs so far as an
    unclosed JSON object (OpenAI's partial arguments of a cut call are a JSON prefix too)."""
    head = _HEAD.match(inner)
    if head is None or (partial and not head.group(2)):
        return None                         # (a cut name may be any prefix of a name)
    name, pos, args = head.group(1), head.end(), {}
    props = properties(functions.get(name))
    while True:
        m = _KEY.match(inner, pos)
        if m is None:
            break
        key = m.group(1).strip()
        got = _value_at(inner, m.end(), _is_text(props.get(key)))
        if got is None:
            break
        args[key], pos = got
    if inner[pos:].strip() and not partial:
        return None                         # text that is neither a pair nor the end
    text = json.dumps(args, ensure_ascii=False)
    return name, (text[:-1] if partial else text)


def _bound(schema: dict[str, Any], key: str) -> Optional[int]:
    """A length bound of the schema when it is a count (an int >= 0), else None."""
    v = schema.get(key, 0 if key == "minLength" else None)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _value_rule(schema: dict[str, Any], strict: bool) -> str:
    """Lark for a value and its closing tag: a string parameter's raw text (one of its enum or
    const; else text of its length bounds without '<'; else any text without '</'), JSON
    following the schema for the others. Free text and its closing tag are one regex:
    llguidance's lexer is greedy, so a separate closing tag after a text lexeme that may
    contain '<' would never begin. A string schema with more than this to enforce (pattern,
    format) has been refused by check_schemas."""
    close = json.dumps(VALUE_CLOSE + "\n")
    if not _is_text(schema):
        return f"({json_rule(schema, strict)}) {close}"
    if "enum" in schema or "const" in schema:
        words = " | ".join(json.dumps(v) for v in schema.get("enum", [schema.get("const")]))
        return f"({words}) {close}"
    lo, hi = _bound(schema, "minLength") or 0, _bound(schema, "maxLength")
    if lo == 0 and hi is None:      # '<' runs end in neither '<' nor '/', or just before the tag
        return r"/([^<]|<+[^<\/])*<*<\/arg_value>\n/"
    return "/[^<]{%d,%s}/ %s" % (lo, "" if hi is None else hi, close)


def check_schemas(functions: list[dict[str, Any]]) -> Optional[tuple[str, str]]:
    """(message, param) for a function whose parameters GLM's form cannot hold or enforce, or
    None: properties must be an object; a string parameter written raw can enforce its enum,
    const and length bounds (0 <= minLength <= maxLength) but not a pattern or format."""
    for i, f in enumerate(functions):
        props = (f.get("parameters") or {}).get("properties", {})
        where = f"tools.{i}.function.parameters"
        if not isinstance(props, dict):
            return "properties must be an object", where
        for key, schema in props.items():
            if not _is_text(schema):
                continue
            extra = sorted(set(schema) - _TEXT_KEYS)
            # each bound a count when given (None: given but not a count; -1: no maxLength)
            lo, hi = (_bound(schema, k) if k in schema else d for k, d in (("minLength", 0), ("maxLength", -1)))
            bad_length = lo is None or hi is None or 0 <= hi < lo
            if extra or bad_length:
                what = f"its {', '.join(extra)}" if extra else "length bounds other than 0 <= minLength <= maxLength"
                return (f"string parameter {key!r}: GLM-4.5's tool format writes it raw, which cannot "
                        f"enforce {what} in a forced call (use --tool-parser hermes)",
                        f"{where}.properties.{key}")
    return None


def call_rule(function: dict[str, Any], strict: bool) -> str:
    """Lark body of one forced call's inside: its name, then its declared parameters in schema
    order (required ones always, the others optional), each with a value as _value_rule writes."""
    params = function["parameters"]
    required = set(params.get("required") or ())
    parts = [json.dumps(function["name"] + "\n")]
    for key, schema in properties(function).items():
        opening = json.dumps(f"{KEY_OPEN}{key}{KEY_CLOSE}\n{VALUE_OPEN}")
        pair = f"{opening} {_value_rule(schema if isinstance(schema, dict) else {}, strict)}"
        parts.append(pair if key in required else f"({pair})?")
    return " ".join(parts)
