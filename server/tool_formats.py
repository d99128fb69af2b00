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

MiniMax-M2's ``<invoke>`` (--tool-parser minimax_m2) is one more such call, several of them in a
``<minimax:tool_call>`` block (server/tool_blocks.py finds the blocks)::

    <invoke name="get_weather">
    <parameter name="city">Paris</parameter>
    </invoke>

A value is the raw text for a string parameter (by the tool's schema) and JSON for any other (a
value that does not parse as JSON, or as a Python literal such as Qwen's template writes for
True/None, stays a string), as vLLM's glm45, qwen3_coder and minimax_m2 parsers read them (MiniMax's
values trimmed of surrounding whitespace, and null/none/nil, and yes/no/on/off for a boolean, read
as its parser reads them). Finding and streaming the blocks is server/tools.py's and
server/tool_blocks.py's; this module reads, cuts and forces one call's inside.
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Any, Optional

from server.structured import json_rule
from server.tool_setup import lit

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
    trim: bool = False        # values are read without surrounding whitespace (MiniMax-M2)


GLM45 = ArgFormat(
    "glm45", "<arg_key>", re.compile(rf"\s*({_NAME})(\s+|$)"), "", "\n",
    re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>", re.S),
    "<arg_key>{key}</arg_key>\n<arg_value>", "</arg_value>", "</arg_value>\n", "", False)
QWEN3_CODER = ArgFormat(
    "qwen3_coder", "<parameter=", re.compile(rf"\s*<function=({_NAME})(>\s*|$)"), "\n<function=", ">\n",
    re.compile(r"\s*<parameter=([^>\n]{1,200})>\n?", re.S),
    "<parameter={key}>\n", "</parameter>", "\n</parameter>\n", "</function>\n", True)
FORMATS = {f.style: f for f in (GLM45, QWEN3_CODER)}     # the ones inside <tool_call> tags
MINIMAX_INVOKE = ArgFormat(
    "minimax_m2", "<minimax:tool_call>", re.compile(rf"""\s*<invoke name=["']?({_NAME})["']?(>)\s*"""),
    '<invoke name="', '">\n', re.compile(r"""\s*<parameter name=["']?([^"'>\n]{1,200})["']?>"""),
    '<parameter name="{key}">', "</parameter>", "</parameter>\n", "</invoke>\n", False, trim=True)
_WORDS = {"null": None, "none": None, "nil": None}
_BOOLEANS = {"true": True, "1": True, "yes": True, "on": True,
             "false": False, "0": False, "no": False, "off": False}


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


def _types(schema: Any) -> set[Any]:
    kind = schema.get("type") if isinstance(schema, dict) else None
    return set(kind) if isinstance(kind, list) else {kind}


def _loose(raw: str, schema: Any) -> Any:
    """A trimmed format's non-string value: vLLM's minimax_m2 reads null/none/nil as null and
    yes/no/on/off/1/0 as a boolean's words; else as _literal."""
    text = raw.strip()
    if text.lower() in _WORDS:
        return None
    if "boolean" in _types(schema) and text.lower() in _BOOLEANS:
        return _BOOLEANS[text.lower()]
    return _literal(text)


def _value_at(fmt: ArgFormat, inner: str, pos: int, schema: Any) -> Optional[tuple[Any, int]]:
    """The value that starts at ``pos`` and the position after its closing tag: raw text up to
    the first closing tag for a string parameter; else the JSON value there when the closing
    tag follows it (a JSON string may hold the tag), else the text read as a literal."""
    as_string = _is_text(schema)
    if fmt.trim:
        pos = len(inner) - len(inner[pos:].lstrip())
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
    if fmt.trim:
        value = raw.rstrip() if as_string else _loose(raw, schema)
    elif as_string:       # (on lines of their own, the key took the newline after the opening)
        value = raw.removesuffix("\n") if fmt.own_lines else raw
    else:
        value = _literal(raw)
    return value, end + len(fmt.value_close)


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
        got = _value_at(fmt, inner, m.end(), props.get(key))
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


def _text_rule(fmt: ArgFormat, schema: dict[str, Any]) -> str:
    """The regex body of a string parameter's free text: of its length bounds without '<'; else
    any text without '</' ('<' runs end in neither '<' nor '/', or just before the closing tag).
    A trimmed format's text neither starts nor ends with whitespace (its parser would drop it)."""
    lo, hi = _bound(schema, "minLength") or 0, _bound(schema, "maxLength")
    if not fmt.trim:
        if lo == 0 and hi is None:
            return r"([^<]|<+[^<\/])*<*"
        return "[^<]{%d,%s}" % (lo, "" if hi is None else hi)
    # (no space: Python's, which the parser strips, holds \x1c-\x1f, which \s does not)
    if lo == 0 and hi is None:       # a first unit that starts, and a last that ends, with no space
        return r"((([^<\s\x1c-\x1f]|<+[^<\/])([^<]|<+[^<\/])*)?([^<\s\x1c-\x1f]|<+[^<\/\s\x1c-\x1f]))?<*"
    solid = r"[^<\s\x1c-\x1f]"
    alts = [solid] if lo <= 1 and (hi is None or hi >= 1) else []     # one character
    if hi is None or hi >= 2:                                         # or more
        alts.append("%s[^<]{%d,%s}%s" % (solid, max(lo - 2, 0), "" if hi is None else hi - 2, solid))
    return "(" + "|".join(alts) + ")" + ("?" if lo == 0 else "") if alts else ""


def _value_rule(fmt: ArgFormat, schema: dict[str, Any], strict: bool, tokens: frozenset[str]) -> str:
    """Lark for a value and what ends it: a string parameter's raw text (one of its enum or
    const; else _text_rule's), JSON following the schema for the others. Free text and its
    closing tag are one regex: llguidance's lexer is greedy, so a separate closing tag after a
    text lexeme that may contain '<' would never begin; a closing tag that is one token of the
    model's (``tokens``) follows the text as that token, which no text can hold.
    check_schemas has refused what this cannot enforce."""
    close = lit(fmt.forced_close, tokens)
    if not _is_text(schema):
        return f"({json_rule(schema, strict)}) {close}"
    if "enum" in schema or "const" in schema:
        words = " | ".join(json.dumps(v) for v in schema.get("enum", [schema.get("const")]))
        return f"({words}) {close}"
    tag = next((t for t in sorted(tokens, key=len, reverse=True) if t in fmt.forced_close), None)
    if tag is not None:     # (a newline before the tag, Qwen3-Coder's, stays in the text's regex)
        before, after = fmt.forced_close.split(tag, 1)
        return f"/{_text_rule(fmt, schema)}{_escape(before)}/ {lit(tag + after, tokens)}"
    return f"/{_text_rule(fmt, schema)}{_escape(fmt.forced_close)}/"


def _escape(text: str) -> str:
    return text.replace("/", "\\/").replace("\n", "\\n")


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


def call_rule(fmt: ArgFormat, function: dict[str, Any], strict: bool,
              tokens: frozenset[str] = frozenset()) -> str:
    """Lark body of one forced call's inside: its name, then its declared parameters in schema
    order (required ones always, the others optional), each with a value as _value_rule writes;
    ``tokens``: the format's tags that are single tokens of the model's tokenizer."""
    required = set(function["parameters"].get("required") or ())
    parts = [lit(fmt.name_open + function["name"] + fmt.name_close, tokens)]
    for key, schema in properties(function).items():
        opening = lit(fmt.key_open.format(key=key), tokens)
        pair = f"{opening} {_value_rule(fmt, schema if isinstance(schema, dict) else {}, strict, tokens)}"
        parts.append(pair if key in required else f"({pair})?")
    if fmt.tail:
        parts.append(lit(fmt.tail, tokens))
    return " ".join(parts)
