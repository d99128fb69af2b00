"""Tool-call formats that write a call's arguments as tagged key/value pairs inside Hermes'
``<tool_call>`` tags, as their models' chat templates ask for them and render past calls:

GLM-4.5 (--tool-parser glm45)::

    <tool_call>get_weather
    <arg_key>city</arg_key>
    <arg_value>Paris</arg_value>
    </tool_call>

Qwen3-Coder (--tool-parser qwen3_coder)::

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

A value is the raw text for a string parameter (by the tool's schema) and JSON for any other (a
value that does not parse as JSON, or as a Python literal such as Qwen's template writes for
True/None, stays a string), as vLLM's glm45 and qwen3_coder parsers read them. Finding and
streaming the blocks is server/tools.py's; this module reads, cuts and forces one block's inside.
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Any, Optional

from server.structured import json_rule

_DECODER = json.JSONDecoder()
# what a raw string value cannot be held to (annotations such as title or default are fine)
_UNENFORCEABLE = ("pattern", "format", "contentEncoding", "contentMediaType", "contentSchema")
_NAME = r"[A-Za-z0-9_.\-]{1,64}"


@dataclass(frozen=True)
class ArgFormat:
    style: str                # the --tool-parser name
    marker: str               # what a chat template of this format writes (auto-detection)
    head: "re.Pattern[str]"   # the function name at the block's start: group 1, group 2 its end
    name_open: str            # forced calls: the text before and after the name
    name_close: str
    key: "re.Pattern[str]"    # a parameter's opening, its name in group 1
    key_open: str             # forced calls: the opening, with {key}
    value_close: str          # what ends a value (the parser looks for it)
    forced_close: str         # forced calls: what follows a value
    tail: str                 # after the last pair
    own_lines: bool           # the template writes values on lines of their own


GLM45 = ArgFormat(
    "glm45", "<arg_key>", re.compile(rf"\s*({_NAME})(\s+|$)"), "", "\n",
    re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>", re.S),
    "<arg_key>{key}</arg_key>\n<arg_value>", "</arg_value>", "</arg_value>\n", "", False)
QWEN3_CODER = ArgFormat(
    "qwen3_coder", "<parameter=", re.compile(rf"\s*<function=({_NAME})(>\s*|$)"), "\n<function=", ">\n",
    re.compile(r"\s*<parameter=([^>\n]{1,200})>\n?", re.S),
    "<parameter={key}>\n", "</parameter>", "\n</parameter>\n", "</function>\n", True)
FORMATS = {f.style: f for f in (GLM45, QWEN3_CODER)}


def _is_text(schema: Any) -> bool:
    """Whether a parameter's values are strings, which these formats write raw (not as JSON)."""
    if not isinstance(schema, dict):
        return False
    if "enum" in schema:
        enum = schema["enum"]
        return isinstance(enum, list) and bool(enum) and all(isinstance(v, str) for v in enum)
    if "const" in schema:
        return isinstance(schema["const"], str)
    return schema.get("type") == "string"


def properties(function: Optional[dict[str, Any]]) -> dict[str, Any]:
    props = ((function or {}).get("parameters") or {}).get("properties")
    return props if isinstance(props, dict) else {}


def _literal(raw: str) -> Any:
    """A non-string parameter's value: JSON, else a Python literal (True, None, {'a': 1}), else
    the text itself; only what JSON can hold (no NaN, sets, tuples as keys)."""
    text = raw.strip()
    for read in (json.loads, ast.literal_eval):
        try:
            value = read(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if _json_safe(value):
            return value
    return text


def _json_safe(value: Any) -> bool:
    """Whether the arguments' JSON can hold ``value`` (no NaN or infinity, sets, tuple keys)."""
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (ValueError, TypeError, RecursionError):
        return False


def _value_at(fmt: ArgFormat, inner: str, pos: int, as_string: bool) -> Optional[tuple[Any, int]]:
    """The value that starts at ``pos`` and the position after its closing tag: raw text up to
    the first closing tag for a string parameter; else the JSON value there when the closing
    tag follows it (a JSON string may hold the tag), else the text read as a literal."""
    if not as_string:
        try:
            value, end = _DECODER.raw_decode(inner, pos)
            after = len(inner) - len(inner[end:].lstrip())
            if inner.startswith(fmt.value_close, after) and _json_safe(value):
                return value, after + len(fmt.value_close)
        except json.JSONDecodeError:
            pass
    end = inner.find(fmt.value_close, pos)
    if end < 0:
        return None
    raw = inner[pos:end]
    if as_string and fmt.own_lines:      # (the key pattern took the newline after the opening)
        raw = raw.removesuffix("\n")
    return (raw if as_string else _literal(raw)), end + len(fmt.value_close)


def read_block(fmt: ArgFormat, inner: str, functions: dict[str, dict[str, Any]],
               partial: bool = False) -> Optional[tuple[str, str]]:
    """(name, arguments as JSON text) of one block's inside, or None if it is not this format.
    ``partial``: the block was cut short; the arguments are the complete pairs so far as an
    unclosed JSON object (OpenAI's partial arguments of a cut call are a JSON prefix too)."""
    head = fmt.head.match(inner)
    if head is None or (partial and not head.group(2)):
        return None                         # (a cut name may be any prefix of a name)
    name, pos, args = head.group(1), head.end(), {}
    props = properties(functions.get(name))
    while True:
        m = fmt.key.match(inner, pos)
        if m is None:
            break
        key = m.group(1).strip()
        got = _value_at(fmt, inner, m.end(), _is_text(props.get(key)))
        if got is None:
            break
        args[key], pos = got
    rest = inner[pos:].strip()
    if fmt.tail and rest.startswith(fmt.tail.strip()):
        rest = rest[len(fmt.tail.strip()):].strip()
    if rest and not partial:
        return None                         # text that is neither a pair nor the end
    text = json.dumps(args, ensure_ascii=False)
    return name, (text[:-1] if partial else text)


def _bound(schema: dict[str, Any], key: str) -> Optional[int]:
    """A length bound of the schema when it is a count (an int >= 0), else None."""
    v = schema.get(key, 0 if key == "minLength" else None)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _value_rule(fmt: ArgFormat, schema: dict[str, Any], strict: bool) -> str:
    """Lark for a value and what ends it: a string parameter's raw text (one of its enum or
    const; else text of its length bounds without '<'; else any text without '</'), JSON
    following the schema for the others. Free text and its closing tag are one regex:
    llguidance's lexer is greedy, so a separate closing tag after a text lexeme that may
    contain '<' would never begin. check_schemas has refused what this cannot enforce."""
    close = json.dumps(fmt.forced_close)
    if not _is_text(schema):
        return f"({json_rule(schema, strict)}) {close}"
    if "enum" in schema or "const" in schema:
        words = " | ".join(json.dumps(v) for v in schema.get("enum", [schema.get("const")]))
        return f"({words}) {close}"
    lo, hi = _bound(schema, "minLength") or 0, _bound(schema, "maxLength")
    tag = fmt.forced_close.replace("/", "\\/").replace("\n", "\\n")
    if lo == 0 and hi is None:      # '<' runs end in neither '<' nor '/', or just before the tag
        return r"/([^<]|<+[^<\/])*<*" + tag + "/"
    # bounded: no '<' at all, so that the bounds count characters; the tag in the same regex, as
    # Qwen3-Coder's starts with a newline that the text could take
    return "/[^<]{%d,%s}%s/" % (lo, "" if hi is None else hi, tag)


def check_schemas(functions: list[dict[str, Any]]) -> Optional[tuple[str, str]]:
    """(message, param) for a function whose parameters these forms cannot hold or enforce, or
    None: properties must be an object and required a list of names; a string parameter written
    raw can enforce its enum, const and length bounds (0 <= minLength <= maxLength) but not a
    pattern or format, and none of its words may hold a closing tag."""
    for i, f in enumerate(functions):
        params = f.get("parameters") or {}
        props, required = params.get("properties", {}), params.get("required", [])
        where = f"tools.{i}.function.parameters"
        if not isinstance(props, dict):
            return "properties must be an object", where
        if not (isinstance(required, list) and all(isinstance(k, str) and k in props for k in required)):
            return "required must be a list of names of properties", f"{where}.required"
        for key, schema in props.items():
            if not _is_text(schema):
                continue
            words = schema.get("enum", [schema.get("const", "")])
            if any("</" in w for w in words):
                return (f"string parameter {key!r}: a value holding '</' cannot be written in this "
                        f"tool format (use --tool-parser hermes)", f"{where}.properties.{key}")
            extra = [k for k in _UNENFORCEABLE if k in schema]
            # each bound a count when given (None: given but not a count; -1: no maxLength)
            lo, hi = (_bound(schema, k) if k in schema else d for k, d in (("minLength", 0), ("maxLength", -1)))
            if extra or lo is None or hi is None or 0 <= hi < lo:
                what = f"its {', '.join(extra)}" if extra else "length bounds other than 0 <= minLength <= maxLength"
                return (f"string parameter {key!r}: this tool format writes it raw, which cannot enforce "
                        f"{what} in a forced call (use --tool-parser hermes)", f"{where}.properties.{key}")
    return None


def call_rule(fmt: ArgFormat, function: dict[str, Any], strict: bool) -> str:
    """Lark body of one forced call's inside: its name, then its declared parameters in schema
    order (required ones always, the others optional), each with a value as _value_rule writes."""
    required = set(function["parameters"].get("required") or ())
    parts = [json.dumps(fmt.name_open + function["name"] + fmt.name_close)]
    for key, schema in properties(function).items():
        opening = json.dumps(fmt.key_open.format(key=key))
        pair = f"{opening} {_value_rule(fmt, schema if isinstance(schema, dict) else {}, strict)}"
        parts.append(pair if key in required else f"({pair})?")
    if fmt.tail:
        parts.append(json.dumps(fmt.tail))
    return " ".join(parts)
