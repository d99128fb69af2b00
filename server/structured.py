"""response_format -> a Constraint (a Lark grammar embedding the JSON schema), checked here with
llguidance (it needs no torch) so that a schema it cannot compile is a 400 naming the problem
before the engine sees the request.

json_schema with ``strict: true`` compiles the schema closed (objects without
``additionalProperties`` get ``false``, as OpenAI's strict mode demands) and refuses keywords
llguidance does not enforce; without strict, such keywords are ignored (``lenient``), as OpenAI treats a
non-strict schema as guidance. Whitespace between JSON tokens is fixed (no free whitespace): a
small model left free to emit whitespace can pad until max_tokens.
"""
from __future__ import annotations

import json
from typing import Any, Optional

import llguidance

from engine.protocol import Constraint
from server.errors import bad_request


def closed(node: Any) -> Any:
    """``node`` with ``additionalProperties: false`` on every object schema that does not say
    (strict mode's rule: OpenAI refuses a strict schema with open objects; JSON Schema's default
    would let a small model invent properties until max_tokens)."""
    if isinstance(node, list):
        return [closed(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: (closed(v) if k not in ("enum", "const", "default", "examples", "required") else v)
           for k, v in node.items()}
    if isinstance(node.get("properties"), dict):   # names map to schemas, not keywords
        out["properties"] = {k: closed(v) for k, v in node["properties"].items()}
    kinds = node.get("type")
    is_object = kinds == "object" or (isinstance(kinds, list) and "object" in kinds) or "properties" in node
    if is_object and "additionalProperties" not in node and "patternProperties" not in node:
        out["additionalProperties"] = False
    return out


def schema_options(schema: dict[str, Any], strict: bool) -> dict[str, Any]:
    """The schema (closed when strict) with llguidance's options (x-guidance) for how moeserve
    enforces it."""
    opts = {"whitespace_flexible": False, "lenient": not strict}
    base = closed(schema) if strict else schema
    return {**base, "x-guidance": {**opts, **(schema.get("x-guidance") or {})}}


def json_rule(schema: dict[str, Any], strict: bool) -> str:
    """A Lark rule body for JSON following ``schema``."""
    return "%json " + json.dumps(schema_options(schema, strict), ensure_ascii=False)


def check(lark: str, param: str) -> Constraint:
    """The Constraint for ``lark``, or a 400 naming ``param`` with llguidance's message."""
    try:
        error = llguidance.LLMatcher.validate_grammar(lark)
    except (ValueError, RuntimeError) as exc:
        error = str(exc)
    if error:
        # llguidance quotes the grammar line with a caret under it: the first line says what failed
        first = error.strip().splitlines()[0]
        first = first.split(": ", 1)[1] if first.startswith("at ") and ": " in first else first
        raise bad_request(f"{param}: the schema cannot be enforced: {first}", param)
    return Constraint(lark)


def response_format_constraint(rf: Optional[dict[str, Any]]) -> Optional[Constraint]:
    """None for text output; else the grammar the reply must follow."""
    if rf is None:
        return None
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":   # any JSON object (OpenAI: the prompt should also ask for JSON)
        return check("start: " + json_rule({"type": "object"}, strict=False), "response_format")
    if kind != "json_schema":
        raise bad_request(f"response_format type {kind!r} is not supported; use 'text', "
                          "'json_object' or 'json_schema'", "response_format.type")
    spec = rf.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request("response_format.json_schema must be an object with 'name' and "
                          "'schema'", "response_format.json_schema")
    schema = spec.get("schema", {})
    if isinstance(schema, bool):   # JSON Schema allows true (anything) / false (nothing)
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise bad_request("response_format.json_schema.schema must be a JSON Schema object",
                          "response_format.json_schema.schema")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad_request("response_format.json_schema.strict must be a boolean",
                          "response_format.json_schema.strict")
    return check("start: " + json_rule(schema, bool(strict)), "response_format.json_schema.schema")
