"""Tool calling with the OpenAI SDK against a real server: every tool_choice, streamed and not,
and a tool-result round trip. The tiny random model calls tools only when forced; `auto` is
checked through the parser on what it writes, and the prompt rendering on the server's tokens."""
from __future__ import annotations

import json
from typing import Any, Iterator

import jsonschema
import openai
import pytest

from server.tools import ToolSetup, ToolStream, parse, prompt_messages
from tests.server.conftest import ServerProcess

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "minLength": 1, "maxLength": 10},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "forecast",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(tiny_model_dir: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    """The tiny model with room for the tool listing in its prompt (its own 256 is too short)."""
    with ServerProcess(tiny_model_dir, str(tmp_path_factory.mktemp("tools") / "server.log"),
                       extra=("--context-length", "1024")) as srv:
        yield openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0)


def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def check_calls(calls: Any, names: set[str]) -> None:
    assert calls, "no tool call"
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_") and c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_always_calls_with_valid_arguments(client: openai.OpenAI, seed: int) -> None:
    r = client.chat.completions.create(model=model(client), messages=ASK, tools=TOOLS,
                                       tool_choice="required", seed=seed, max_tokens=150)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    check_calls(choice.message.tool_calls, set(SCHEMAS))


def test_named_function_and_parallel_off(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=model(client), messages=ASK, tools=TOOLS, seed=4, max_tokens=150,
        parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    check_calls(calls, {"get_time"})


def test_streamed_tool_call_deltas(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=model(client), messages=ASK, tools=TOOLS, seed=5, max_tokens=150, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        for tc in d.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            if tc.id:   # the first delta of a call carries id, type and name
                assert tc.type == "function" and not entry["id"]
                entry["id"], entry["name"] = tc.id, tc.function.name
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER)


def test_forced_call_cut_by_max_tokens_is_a_partial_call(client: openai.OpenAI) -> None:
    """As OpenAI answers it (LangChain's bind_tools(tool_choice=...) on a weak model rambling in
    an open schema hit this): tool_calls with the arguments so far, finish_reason 'length',
    never the call markup as content."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    full = client.chat.completions.create(model=model(client), messages=ASK, tools=TOOLS, seed=9,
                                          max_tokens=150, tool_choice=named)
    assert full.choices[0].finish_reason == "tool_calls"
    cut = full.usage.completion_tokens - 5   # inside the arguments: the same tokens, fewer
    r = client.chat.completions.create(model=model(client), messages=ASK, tools=TOOLS, seed=9,
                                       max_tokens=cut, tool_choice=named)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments.startswith("{")
    stream = client.chat.completions.create(model=model(client), messages=ASK, tools=TOOLS,
                                            seed=9, max_tokens=cut, tool_choice=named, stream=True)
    names, args, finish = [], "", None
    for chunk in stream:
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            names += [tc.function.name] if tc.function.name else []
            args += tc.function.arguments or ""
        finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
    assert finish == "length" and names == ["get_weather"] and args == call.function.arguments


def test_forced_call_cut_in_its_closing_tag_keeps_whole_arguments(client: openai.OpenAI) -> None:
    """A cut that took only (part of) the closing </tool_call> leaves a complete call: its
    arguments are the whole JSON object, not the text after '"arguments":' up to the cut, which
    carried the call object's own closing brace ('{"city": ...}}', not JSON; the default model
    writing parallel calls until max_tokens hit it, in the OpenAI SDK, LiteLLM and LangChain)."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    full = client.chat.completions.create(model=model(client), messages=ASK, tools=TOOLS, seed=9,
                                          max_tokens=150, tool_choice=named)
    assert full.choices[0].finish_reason == "tool_calls"
    whole = json.loads(full.choices[0].message.tool_calls[0].function.arguments)
    for back in (2, 3, 4):   # "\n</tool_call>" is 6 tokens: each of these cuts lands inside it
        r = client.chat.completions.create(model=model(client), messages=ASK, tools=TOOLS,
                                           seed=9, tool_choice=named,
                                           max_tokens=full.usage.completion_tokens - back)
        (call,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "length"
        assert json.loads(call.function.arguments) == whole, (back, call.function.arguments)


def test_none_and_auto_answer_with_text(client: openai.OpenAI) -> None:
    for choice in ("none", "auto"):
        r = client.chat.completions.create(model=model(client), messages=ASK, tools=TOOLS,
                                           tool_choice=choice, seed=6, max_tokens=12)
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.choices[0].message.tool_calls is None
        assert isinstance(r.choices[0].message.content, str)


def test_tool_result_round_trip(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model=model(client), messages=ASK, tools=TOOLS,
                                           tool_choice="required", seed=7, max_tokens=150)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": "sunny"})}]
    final = client.chat.completions.create(model=model(client), messages=history, tools=TOOLS,
                                           seed=8, max_tokens=12)
    assert final.choices[0].finish_reason in ("stop", "length")
    # the call and its result were rendered into the prompt after the tool listing
    assert final.usage.prompt_tokens > first.usage.prompt_tokens + 20


# like Open WebUI's built-in tools (36 of them, ~7,000 tokens), sent with every chat
MANY_TOOLS = [{"type": "function", "function": {
    "name": f"builtin_tool_{i}", "description": "Looks things up in the user's notes, memories, "
    "knowledge bases, calendars and chats, and returns what it found, with dates. " * 3,
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}
    for i in range(30)]


def test_auto_tools_the_context_cannot_hold_are_left_out(client: openai.OpenAI) -> None:
    """Open WebUI 0.12.4 sends its built-in tools with every chat; a listing longer than the
    context was a 400 ('the prompt has 7015 tokens ...') on its first message. With
    tool_choice auto the request is served without them; forced, it stays a 400 naming tools."""
    r = client.chat.completions.create(model=model(client), messages=ASK, tools=MANY_TOOLS,
                                       seed=3, max_tokens=8)
    assert r.choices[0].message.tool_calls is None
    assert isinstance(r.choices[0].message.content, str)
    assert r.usage.prompt_tokens < 100   # the question alone
    chunks = list(client.chat.completions.create(model=model(client), messages=ASK, stream=True,
                                                 tools=MANY_TOOLS, seed=3, max_tokens=8))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model(client), messages=ASK, tools=MANY_TOOLS,
                                       tool_choice="required", max_tokens=8)
    assert e.value.body["param"] == "tools" and "30 tools" in e.value.body["message"]


@pytest.mark.parametrize("body,param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strin"}}}}}],
      "tool_choice": "required"}, "tools"),
])
def test_bad_tool_requests_are_400(client: openai.OpenAI, body: dict[str, Any],
                                   param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model(client), messages=ASK,
                                       **{"tools": TOOLS, **body})
    assert e.value.body["param"] == param


SETUP = ToolSetup(tuple(t["function"] for t in TOOLS), "auto", None, True, "hermes")


def test_parsers_read_hermes_and_plain_json() -> None:
    text = 'Sure.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    content, calls = parse(text, SETUP)
    assert content == "Sure." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_time", {"zone": "UTC"})]
    content, calls = parse('[{"name": "get_time", "parameters": {"zone": "CET"}}, '
                           '{"name": "get_weather", "arguments": {"city": "Rome", "days": 1}}]',
                           SETUP)
    assert content == "" and [c.name for c in calls] == ["get_time", "get_weather"]
    for text in ('{"name": "unknown", "arguments": {}}', "<tool_call>{not json</tool_call>",
                 "plain words"):
        assert parse(text, SETUP) == (text, [])


def test_a_cut_forced_call_parses_as_partial_and_an_auto_one_as_text() -> None:
    cut = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Pa'
    for choice, named in (("named", "get_weather"), ("required", None)):
        forced = ToolSetup(SETUP.tools, choice, named, True, "hermes")
        content, calls = parse(cut, forced)
        assert content == "" and [(c.name, c.arguments) for c in calls] == [
            ("get_weather", '{"city":"Pa')]
    done = '<tool_call>\n{"name":"get_time","arguments":{"zone":"UTC"}}\n</tool_call>\n'
    assert [c.name for c in parse(done + cut, forced)[1]] == ["get_time", "get_weather"]
    assert parse(cut, SETUP) == (cut, [])   # auto: the model chose to write this, keep it
    head_only = '<tool_call>\n{"name":"get_wea'
    assert parse(head_only, forced) == (head_only, [])
    plain = ToolSetup(SETUP.tools, "required", None, True, "json")
    assert [c.arguments for c in parse('{"name":"get_time","arguments":{"zo', plain)[1]] == ['{"zo']
    # complete calls before the cut come back whole, in either style
    for text in ('<tool_call>\n{"name":"get_time","arguments":{"zone":"UTC"}}',
                 '<tool_call>\n{"name":"get_time","arguments":{"zone":"UTC"}}\n</tool_'):
        assert [(c.name, c.arguments) for c in parse(text, forced)[1]] == [
            ("get_time", '{"zone": "UTC"}')]
    cut_list = '[{"name":"get_time","arguments":{"zone":"UTC"}},{"name":"get_time","arguments":{"zo'
    assert [c.arguments for c in parse(cut_list, plain)[1]] == ['{"zone": "UTC"}', '{"zo']


def test_tool_stream_holds_back_only_what_may_be_a_call() -> None:
    st = ToolStream(SETUP)
    deltas = []
    for piece in ["Let me ", "check.<tool", "_call>\n{\"name\": \"get_time\", ",
                  "\"arguments\": {\"zone\": \"UTC\"}}\n</tool_call>"]:
        deltas += st.feed(piece)
    deltas += st.finish()
    assert "".join(d.get("content", "") for d in deltas) == "Let me check."
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_time" and calls[0]["index"] == 0
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"zone": "UTC"}


def test_history_without_a_tools_template_is_rendered_hermes_style() -> None:
    msgs = [{"role": "system", "content": "Be brief."}, *ASK,
            {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
             "function": {"name": "get_time", "arguments": "{\"zone\": \"UTC\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    out, extra = prompt_messages(msgs, SETUP, template_takes_tools=False)
    assert extra == {} and [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.") and "<tools>" in out[0]["content"]
    assert '"get_weather"' in out[0]["content"]
    assert out[2]["content"] == ('<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}'
                                 "\n</tool_call>")
    assert out[3]["content"] == "<tool_response>\n12:00\n</tool_response>"
    out, extra = prompt_messages(msgs, SETUP, template_takes_tools=True)
    assert extra["tools"][0]["function"]["name"] == "get_weather"
    assert out[2]["tool_calls"][0]["function"]["arguments"] == {"zone": "UTC"}
