"""response_format json_object / json_schema against a real server: grammar-constrained decoding
makes even the tiny random model's output valid, per request inside a shared batch."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.server.conftest import ServerProcess

ASK = [{"role": "user", "content": "Describe a person as JSON."}]
# bounded strings and numbers: the random model cannot run past max_tokens inside one value
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "pet": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/pet"}]}},
    "required": ["name", "age", "tags", "pet"], "additionalProperties": False,
    "$defs": {"pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]},
                                                       "good": {"type": "boolean"}},
                      "required": ["kind", "good"], "additionalProperties": False}}}


def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def schema_format(schema: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema,
                                                   "strict": strict}}


def test_json_schema_output_always_validates(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused")
    for seed in range(8):
        r = client.chat.completions.create(model=model(client), messages=ASK, seed=seed, max_tokens=120,
                                           temperature=1.0, response_format=schema_format(PERSON))
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_json_object_and_streaming(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused")
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=model(client), messages=ASK, seed=3, max_tokens=120, stream=True,
        response_format=schema_format(PERSON)) if c.choices)
    jsonschema.validate(json.loads(text), PERSON)
    r = client.chat.completions.create(model=model(client), messages=ASK, seed=5, max_tokens=200,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":   # an open object may still be cut by max_tokens
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")


def test_constrained_and_free_requests_share_a_batch(server: ServerProcess) -> None:
    async def one(client: httpx.AsyncClient, i: int) -> httpx.Response:
        body: dict[str, Any] = {"messages": ASK, "max_tokens": 120, "seed": i}
        if i % 2 == 0:
            body["response_format"] = schema_format(PERSON)
        return await client.post(server.base + "/v1/chat/completions", json=body, timeout=120)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(*(one(client, i) for i in range(6)))

    for i, r in enumerate(asyncio.run(run())):
        assert r.status_code == 200, r.text
        content = r.json()["choices"][0]["message"]["content"]
        if i % 2 == 0:
            jsonschema.validate(json.loads(content), PERSON)
        else:
            with pytest.raises(ValueError):   # the free rows are not masked
                jsonschema.validate(json.loads(content), PERSON)


@pytest.mark.parametrize("fmt,param,words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
        "type": "string", "format": "no-such-format"}}}, "response_format.json_schema.schema",
     "no-such-format"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}},
     "response_format.json_schema.schema", "objekt"),
    ({"type": "json_schema", "json_schema": "x"}, "response_format.json_schema", "object"),
    ({"type": "yaml"}, "response_format.type", "yaml"),
])
def test_a_schema_that_cannot_compile_is_a_400(server: ServerProcess, fmt: dict[str, Any],
                                               param: str, words: str) -> None:
    r = httpx.post(server.base + "/v1/chat/completions", timeout=60,
                   json={"messages": ASK, "response_format": fmt})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"]
    assert httpx.get(server.base + "/health", timeout=10).status_code == 200


def test_non_strict_schema_ignores_what_it_cannot_enforce(server: ServerProcess) -> None:
    schema = {"type": "object", "properties": {"d": {"enum": ["x", "y"], "format": "odd"}},
              "required": ["d"], "additionalProperties": False}
    r = httpx.post(server.base + "/v1/chat/completions", timeout=60, json={
        "messages": ASK, "max_tokens": 40, "response_format": schema_format(schema, strict=False)})
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["choices"][0]["message"]["content"])["d"] in ("x", "y")


def _log_line(server: ServerProcess, pattern: str) -> str:
    """The first server log line matching ``pattern`` (written just after the response went out,
    so it is polled for, with a deadline)."""
    import re
    import time
    deadline = time.monotonic() + 30
    while True:
        m = re.search(pattern, server.log(), re.M)
        if m:
            return m.group(0)
        assert time.monotonic() < deadline, f"no log line matching {pattern!r}:\n{server.log()}"
        time.sleep(0.05)


def test_access_and_error_lines(server: ServerProcess) -> None:
    r = httpx.post(server.base + "/v1/chat/completions", timeout=60, json={
        "messages": ASK, "max_tokens": 3, "ignore_eos": True, "seed": 424242})
    usage = r.json()["usage"]
    _log_line(server, rf"INFO moeserve\.access: POST /v1/chat/completions 200 prompt="
                      rf"{usage['prompt_tokens']} completion=3 [0-9.]+s$")
    httpx.post(server.base + "/v1/chat/completions", timeout=60,
               json={"messages": ASK, "response_format": {"type": "toml"}})
    _log_line(server, r"WARNING moeserve\.access: 400 on POST /v1/chat/completions: "
                      r"response_format type 'toml' is not supported.*\(param response_format\.type\)$")


def test_strict_schema_is_closed_and_only_strict() -> None:
    from server.structured import closed, json_rule
    open_schema = {"type": "object", "properties": {
        "city": {"type": "string"}, "where": {"type": "object", "properties": {"x": {"type": "integer"}}},
        "properties": {"type": "array", "items": {"type": "object"}}},     # a property named like the keyword
        "$defs": {"d": {"properties": {"y": {"type": "string"}}}}}
    shut = closed(open_schema)
    assert shut["additionalProperties"] is False
    assert shut["properties"]["where"]["additionalProperties"] is False
    assert shut["properties"]["properties"]["items"]["additionalProperties"] is False
    assert shut["$defs"]["d"]["additionalProperties"] is False
    assert "additionalProperties" not in shut["properties"]["city"]
    assert closed({"type": "object", "additionalProperties": True}) == {"type": "object", "additionalProperties": True}

    # the grammar: closed under strict, as given without
    strict_rule, lenient_rule = json_rule(open_schema, strict=True), json_rule(open_schema, strict=False)
    assert '"additionalProperties":false' in strict_rule.replace(" ", "")
    assert '"additionalProperties":false' not in lenient_rule.replace(" ", "")


def test_strict_open_schema_output_has_only_its_properties(server: ServerProcess) -> None:
    # an open object: the random model would add properties of its own without strict's closing
    schema = {"type": "object", "properties": {"d": {"enum": ["x", "y"]}}, "required": ["d"]}
    for seed in range(4):
        r = httpx.post(server.base + "/v1/chat/completions", timeout=60, json={
            "messages": ASK, "max_tokens": 40, "seed": seed, "temperature": 1.0,
            "response_format": schema_format(schema, strict=True)})
        assert r.status_code == 200, r.text
        got = json.loads(r.json()["choices"][0]["message"]["content"])
        assert list(got) == ["d"] and got["d"] in ("x", "y")
