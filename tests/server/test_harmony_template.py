"""convert/data/harmony.jinja, moeserve's own chat template for gpt-oss's harmony format, rendered
by the server's renderer. The expected texts are openai/harmony's: docs/format.md's examples and
the renderer's test-data (test_render_functions_with_parameters.txt, test_simple_convo_*.txt)."""
from __future__ import annotations

import datetime
import json
import os
from typing import Any

import pytest

import convert
from server.harmony import template_harmony, template_messages, template_tools
from server.reasoning import REASONING
from server.tokenizer import TemplateError, compile_chat_template
from server.tool_prompt import prompt_messages
from server.tool_setup import ToolSetup

SOURCE = open(os.path.join(os.path.dirname(convert.__file__), "data", "harmony.jinja"), encoding="utf-8").read()
TEMPLATE = compile_chat_template(SOURCE)


def render(messages: list[dict[str, Any]], **kwargs: Any) -> str:
    """The prompt on 2025-06-28, the date of format.md's examples."""
    return TEMPLATE.render(messages=messages, add_generation_prompt=True,
                           strftime_now=datetime.date(2025, 6, 28).strftime, **kwargs)


def function(name: str, description: str, parameters: Any = None) -> dict[str, Any]:
    f = {"name": name, "description": description}
    return {"type": "function", "function": f if parameters is None else {**f, "parameters": parameters}}


FORMAT = {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}
WEATHER_TOOLS = [
    function("get_location", "Gets the location of the user."),
    function("get_current_weather", "Gets the current weather in the provided location.",
             {"type": "object", "required": ["location"], "properties": {
                 "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                 "format": FORMAT}}),
    function("get_multiple_weathers", "Gets the current weather in the provided list of locations.",
             {"type": "object", "required": ["locations"], "properties": {
                 "locations": {"type": "array", "items": {"type": "string"},
                               "description": 'List of city and state, e.g. ["San Francisco, CA", "New York, NY"]'},
                 "format": FORMAT}}),
]
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"location":"San Francisco"}'}}
CALLED = [  # format.md, "Function calling": the model's reasoning, its call, the tool's result
    {"role": "system", "content": "Use a friendly tone."},
    {"role": "user", "content": "What is the weather like in SF?"},
    {"role": "assistant", "thinking": "Need to use function get_weather.", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"sunny": true, "temperature": 20}'},
]
# format.md, "Example system message" and "Defining available tools" (with its instructions)
SYSTEM_HIGH_TOOLS = """\
<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06
Current date: 2025-06-28

Reasoning: high

# Valid channels: analysis, commentary, final. Channel must be included for every message.
Calls to these tools must go to the commentary channel: 'functions'.<|end|>"""
DEVELOPER = """\
<|start|>developer<|message|># Instructions

Use a friendly tone.

# Tools

## functions

namespace functions {

// Gets the location of the user.
type get_location = () => any;

// Gets the current weather in the provided location.
type get_current_weather = (_: {
// The city and state, e.g. San Francisco, CA
location: string,
format?: "celsius" | "fahrenheit", // default: celsius
}) => any;

// Gets the current weather in the provided list of locations.
type get_multiple_weathers = (_: {
// List of city and state, e.g. ["San Francisco, CA", "New York, NY"]
locations: string[],
format?: "celsius" | "fahrenheit", // default: celsius
}) => any;

} // namespace functions<|end|>"""
# format.md, "Function calling": its complete input after the tool call, the system and developer
# messages above as printed there (the source has a stray vertical tab before the tool's message)
SPEC_AFTER_CALL = SYSTEM_HIGH_TOOLS + DEVELOPER + (
    "<|start|>user<|message|>What is the weather like in SF?<|end|>"
    "<|start|>assistant<|channel|>analysis<|message|>Need to use function get_weather.<|end|>"
    '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
    '{"location":"San Francisco"}<|call|>'
    '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>'
    '{"sunny": true, "temperature": 20}<|end|>'
    "<|start|>assistant")


def system(effort: str) -> str:
    """The system message without function tools (test-data/test_no_tools.txt's)."""
    return ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
            f"Knowledge cutoff: 2024-06\nCurrent date: 2025-06-28\n\nReasoning: {effort}\n\n# Valid channels: "
            "analysis, commentary, final. Channel must be included for every message.<|end|>")


def test_spec_function_calling_example() -> None:
    assert render(CALLED, tools=WEATHER_TOOLS, reasoning_effort="high") == SPEC_AFTER_CALL


def test_final_answer_drops_the_turns_reasoning() -> None:
    # format.md, "Handling reasoning output in subsequent sampling": once the turn ended in a final
    # answer its reasoning goes (the call and its result stay); a past answer ends in <|end|>
    answer = {"role": "assistant", "content": "Sunny, 20 degrees.", "thinking": "It is sunny."}
    out = render(CALLED + [answer, {"role": "user", "content": "Thanks!"}],
                 tools=WEATHER_TOOLS, reasoning_effort="high")
    assert out == (SYSTEM_HIGH_TOOLS + DEVELOPER + "<|start|>user<|message|>What is the weather like in SF?<|end|>"
                   '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
                   '{"location":"San Francisco"}<|call|><|start|>functions.get_weather to=assistant<|channel|>'
                   'commentary<|message|>{"sunny": true, "temperature": 20}<|end|><|start|>assistant<|channel|>'
                   "final<|message|>Sunny, 20 degrees.<|end|><|start|>user<|message|>Thanks!<|end|><|start|>assistant")


def test_spec_dropping_reasoning_without_tools() -> None:
    # format.md's example: "What is 2 + 2?" answered, then "What about 9 / 2?"; no developer message
    history = [{"role": "user", "content": "What is 2 + 2?"},
               {"role": "assistant", "thinking": 'User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.',
                "content": "2 + 2 = 4."},
               {"role": "user", "content": "What about 9 / 2?"}]
    assert render(history) == system("medium") + (
        "<|start|>user<|message|>What is 2 + 2?<|end|>"
        "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|end|>"
        "<|start|>user<|message|>What about 9 / 2?<|end|>"
        "<|start|>assistant")


@pytest.mark.parametrize("effort", ["low", "high"])
def test_reasoning_effort_and_instructions(effort: str) -> None:
    # test-data/test_simple_convo_{low,high}_effort.txt (there without a date); no tools: no
    # "Calls to these tools" line and only instructions in the developer message
    question = {"role": "user", "content": "What is the capital of the largest country in the world?"}
    instructions = {"role": "developer", "content": "Answer the user's questions like a robot."}
    tail = ("<|start|>user<|message|>What is the capital of the largest country in the world?<|end|>"
            "<|start|>assistant")
    assert render([question], reasoning_effort=effort) == system(effort) + tail
    assert render([instructions, question], reasoning_effort=effort) == system(effort) + (
        "<|start|>developer<|message|># Instructions\n\nAnswer the user's questions like a robot.<|end|>" + tail)


def test_todays_date_and_default_effort() -> None:
    before = datetime.date.today()
    out = TEMPLATE.render(messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    dates = {f"Current date: {d:%Y-%m-%d}\n" for d in (before, datetime.date.today())}  # (at midnight)
    assert any(d in out for d in dates) and "\n\nReasoning: medium\n\n" in out
    assert out.endswith("<|start|>user<|message|>Hi<|end|>")


def test_turn_in_progress_keeps_its_reasoning() -> None:
    # an earlier turn's reasoning goes, the current one's (before its call) stays; arguments as an
    # object (as the server passes them) are compact JSON, as the model writes them
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "thinking": "Old thought.", "content": "Where?"},
               {"role": "user", "content": "Paris"},
               {"role": "assistant", "thinking": "Call it.",
                "tool_calls": [{"function": {"name": "get_current_weather", "arguments": {"location": "Paris"}}}]},
               {"role": "tool", "content": "rain"}]
    out = render(history, tools=WEATHER_TOOLS[1:2])
    assert "Old thought." not in out
    assert out.endswith(
        "<|start|>assistant<|channel|>final<|message|>Where?<|end|><|start|>user<|message|>Paris<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>Call it.<|end|>"
        '<|start|>assistant<|channel|>commentary to=functions.get_current_weather <|constrain|>json<|message|>'
        '{"location":"Paris"}<|call|>'
        "<|start|>functions.get_current_weather to=assistant<|channel|>commentary<|message|>rain<|end|>"
        "<|start|>assistant")


def test_renderer_kitchensink_schema() -> None:
    # test-data/test_render_functions_with_parameters.txt: titles, examples, nullable, enum, oneOf,
    # the object's own description, defaults quoted unless the schema is an enum
    sink = function("kitchensink", "A function with various complex schemas.", {
        "description": "params object", "type": "object", "properties": {
            "string": {"type": "string", "title": "STRING", "description": "A string", "examples": ["hello", "world"]},
            "string_nullable": {"type": "string", "nullable": True, "description": "A nullable string",
                                "default": "the default"},
            "string_enum": {"type": "string", "enum": ["a", "b", "c"]},
            "oneof_string_or_number": {"oneOf": [{"type": "string", "default": "default_string_in_oneof"},
                                                 {"type": "number", "description": "numbers can happen too"}],
                                       "description": "a oneof", "default": 20}}})
    out = render([{"role": "user", "content": "What is the weather like in SF?"}], tools=[sink])
    assert """\
// A function with various complex schemas.
type kitchensink = (_: // params object
{
// STRING
//
// A string
// Examples:
// - "hello"
// - "world"
string?: string,
// A nullable string
string_nullable?: string | null, // default: "the default"
string_enum?: "a" | "b" | "c",
// a oneof
// default: 20
oneof_string_or_number?:
 | string // default: "default_string_in_oneof"
 | number // numbers can happen too
,
}) => any;

} // namespace functions<|end|>""" in out


def test_nested_and_bare_tools() -> None:
    # encoding.rs json_schema_to_typescript as it is: a nested object's description also above its
    # "{", its "}" at the inner indent; integer as number, type lists as unions; a bare function
    # dict, an empty object schema and a description of two lines
    search = {"name": "search", "description": "Searches.\nFast.", "parameters": {
        "type": "object", "required": ["exact"], "properties": {
            "count": {"type": "integer", "default": 3},
            "exact": {"type": "boolean", "description": "Match exactly", "default": False},
            "filter": {"type": "object", "description": "Narrows it", "required": ["tags"], "properties": {
                "tags": {"type": "array", "items": {"type": "string"}}, "max": {"type": ["integer", "null"]}}},
            "units": {"type": "array", "items": {"type": "string", "enum": ["km", "mi"]}}}}}
    out = render([{"role": "user", "content": "Hi"}], tools=[search, function("now", "", {"type": "object"})])
    assert """\
namespace functions {

// Searches.
// Fast.
type search = (_: {
count?: number, // default: 3
// Match exactly
exact: boolean, // default: false
// Narrows it
filter?:     // Narrows it
{
    tags: string[],
    max?: number | null,
    },
units?: "km" | "mi"[],
}) => any;

type now = () => any;

} // namespace functions<|end|>""" in out


@pytest.mark.parametrize("messages, kwargs, error", [
    ([{"role": "tool", "content": "x"}], {}, "without a tool call"),
    ([{"role": "user", "content": "x"}], {"reasoning_effort": "max"}, "reasoning_effort"),
    ([{"role": "assistant", "tool_calls": [CALL, CALL]}], {}, "one tool call"),
    ([{"role": "ipython", "content": "x"}], {}, "no role ipython"),
])
def test_refuses_what_harmony_cannot_say(messages: list[dict[str, Any]], kwargs: dict[str, Any], error: str) -> None:
    with pytest.raises(TemplateError, match=error):
        render(messages, **kwargs)


def test_through_the_servers_harmony_handling() -> None:
    # an OpenAI request's history, shaped as server/openai_routes.py shapes it: reasoning_content,
    # two calls in one turn (each followed by its own result), arguments as JSON text
    assert template_harmony(SOURCE)
    calls = [{"id": f"c{i}", "type": "function", "function": {"name": "get_current_weather",
                                                              "arguments": json.dumps({"location": city})}}
             for i, city in enumerate(["Paris", "Rome"])]
    history = template_messages([
        {"role": "user", "content": "Paris or Rome?"},
        {"role": "assistant", "content": "", REASONING: "Check both.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c1", "content": "sun"},
        {"role": "tool", "tool_call_id": "c0", "content": "rain"}])
    setup = ToolSetup(tuple(t["function"] for t in WEATHER_TOOLS), "auto", None, True, "harmony")
    messages, extra = prompt_messages(history, setup, True)
    out = render(messages, tools=template_tools(extra["tools"]))
    call = '<|start|>assistant<|channel|>commentary to=functions.get_current_weather <|constrain|>json<|message|>'
    result = "<|start|>functions.get_current_weather to=assistant<|channel|>commentary<|message|>"
    assert out.endswith("<|start|>user<|message|>Paris or Rome?<|end|>"
                        "<|start|>assistant<|channel|>analysis<|message|>Check both.<|end|>"
                        f'{call}{{"location":"Paris"}}<|call|>{result}rain<|end|>'
                        f'{call}{{"location":"Rome"}}<|call|>{result}sun<|end|><|start|>assistant')
