"""The Responses API (/v1/responses) with the OpenAI SDK against a real server: the same reply as
chat completions, the typed stream events (checked by the SDK's own stream accumulator), forced
function calls and their outputs sent back with previous_response_id, JSON formats, the store,
and clear 400s for what a local model cannot do."""
from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.server.conftest import ServerProcess
from tests.server.test_tools import TIME, WEATHER

TOOLS = [{"type": "function", "name": "get_weather", "description": "forecast", "parameters": WEATHER},
         {"type": "function", "name": "get_time", "parameters": TIME}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = "What is the weather in Paris?"
EXACT = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def client(srv: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0)


def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_a_reply_is_the_chat_completion_as_output_items(client: openai.OpenAI) -> None:
    r = client.responses.create(model=model(client), input=ASK, instructions="Be brief.",
                                max_output_tokens=9, **EXACT)
    chat = client.chat.completions.create(model=model(client), max_tokens=9, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": ASK}], **EXACT)
    assert r.id.startswith("resp_") and r.object == "response"
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert [i.type for i in r.output] == ["message"] and r.output[0].role == "assistant"
    assert r.output_text == chat.choices[0].message.content and r.output_text
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == 9
    assert r.usage.total_tokens == r.usage.input_tokens + 9
    assert r.instructions == "Be brief." and r.max_output_tokens == 9


def test_stream_events_build_the_same_response(client: openai.OpenAI) -> None:
    whole = client.responses.create(model=model(client), input=ASK, max_output_tokens=9, **EXACT)
    with client.responses.stream(model=model(client), input=ASK, max_output_tokens=9, **EXACT) as stream:
        events = list(stream)     # the SDK's accumulator checks each event against the last
    # a reply cut by max_output_tokens ends with response.incomplete, as OpenAI's does (the
    # SDK's get_final_response() waits for response.completed only)
    final = events[-1].response
    kinds = [e.type for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == whole.output_text
    assert final.usage.output_tokens == 9 and final.id == events[0].response.id


def check_call(item: Any) -> dict[str, Any]:
    assert item.type == "function_call" and item.call_id.startswith("call_") and item.name in SCHEMAS
    args = json.loads(item.arguments)
    jsonschema.validate(args, SCHEMAS[item.name])
    return args


def test_forced_call_then_its_output_with_previous_response_id(client: openai.OpenAI) -> None:
    first = client.responses.create(model=model(client), input=ASK, tools=TOOLS, tool_choice="required",
                                    instructions="Use the tools.", max_output_tokens=150, extra_body={"seed": 3})
    calls = [i for i in first.output if i.type == "function_call"]
    assert first.status == "completed" and calls
    for c in calls:
        check_call(c)
    outputs = [{"type": "function_call_output", "call_id": c.call_id, "output": "sunny, 21 C"}
               for c in calls]
    follow = client.responses.create(model=model(client), previous_response_id=first.id,
                                     input=outputs, tools=TOOLS, max_output_tokens=5, **EXACT)
    assert follow.previous_response_id == first.id and follow.output_text
    # the same conversation sent whole, as a stateless client sends it (instructions are not
    # carried over by previous_response_id)
    items = [{"role": "user", "content": ASK}] + [
        {"type": "function_call", "call_id": c.call_id, "name": c.name, "arguments": c.arguments}
        for c in calls] + outputs
    whole = client.responses.create(model=model(client), input=items, tools=TOOLS,
                                    max_output_tokens=5, store=False, **EXACT)
    assert whole.usage.input_tokens == follow.usage.input_tokens
    assert whole.output_text == follow.output_text


def test_streamed_named_call(client: openai.OpenAI) -> None:
    with client.responses.stream(model=model(client), input=ASK, tools=TOOLS, max_output_tokens=150,
                                 tool_choice={"type": "function", "name": "get_time"}, extra_body={"seed": 5}) as stream:
        events = list(stream)
        final = stream.get_final_response()
    (call,) = [i for i in final.output if i.type == "function_call"]
    assert call.name == "get_time" and check_call(call)["zone"] in ("UTC", "CET")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [e.arguments for e in done] == [call.arguments]
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == call.arguments
    assert events[-1].type == "response.completed"


def test_json_schema_format(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
              "required": ["city"], "additionalProperties": False}
    r = client.responses.create(model=model(client), input="Name a city as JSON.", max_output_tokens=60,
                                text={"format": {"type": "json_schema", "name": "city", "schema": schema,
                                                 "strict": True}}, extra_body={"seed": 1})
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"


def test_store_retrieve_delete(client: openai.OpenAI) -> None:
    r = client.responses.create(model=model(client), input="Hi", max_output_tokens=3, **EXACT)
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    unstored = client.responses.create(model=model(client), input="Hi", max_output_tokens=3, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError) as e:      # OpenAI's answer: a 400 with this code
        client.responses.create(model=model(client), input="Hi", previous_response_id=unstored.id)
    assert e.value.body["code"] == "previous_response_not_found"


@pytest.mark.parametrize("body,param", [
    ({"input": "Hi", "tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input.0.content.0"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0"),
    ({"input": "Hi", "background": True}, "background"),
    ({"input": "Hi", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"input": "Hi", "tool_choice": {"type": "allowed_tools"}}, "tool_choice"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input.0"),
    ({"input": ""}, "input"),
])
def test_what_cannot_run_is_a_400_naming_the_field(srv: ServerProcess, body: dict[str, Any],
                                                   param: str) -> None:
    r = httpx.post(srv.base + "/v1/responses", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_thinking_models_reasoning_is_a_reasoning_item(thinking: ServerProcess) -> None:
    """The chat template opens a <think> block: what the reply writes inside it is a reasoning
    item, streamed as reasoning_text events; sent back, it is the history's reasoning."""
    client = openai.OpenAI(base_url=thinking.base + "/v1", api_key="unused", max_retries=0)
    name = model(client)
    chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": ASK}],
                                          max_tokens=12, temperature=0)
    r = client.responses.create(model=name, input=ASK, max_output_tokens=12, temperature=0)
    (item,) = r.output
    assert item.type == "reasoning" and item.content[0].type == "reasoning_text"
    assert item.content[0].text == chat.choices[0].message.reasoning_content
    assert 0 < r.usage.output_tokens_details.reasoning_tokens <= 12
    with client.responses.stream(model=name, input=ASK, max_output_tokens=12, temperature=0) as stream:
        events = list(stream)
    text = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert text == item.content[0].text
    assert [e.type for e in events if e.type.startswith("response.output_item")] == [
        "response.output_item.added", "response.output_item.done"]


def test_input_items_list_the_conversation_a_response_answered(client: openai.OpenAI) -> None:
    first = client.responses.create(model=model(client), input="Hello.", max_output_tokens=4, **EXACT)
    second = client.responses.create(model=model(client), input=[{"role": "user", "content": "More."}],
                                     previous_response_id=first.id, max_output_tokens=4, **EXACT)
    items = list(client.responses.input_items.list(second.id))      # newest first, OpenAI's default
    assert [i.type for i in items] == ["message"] * 3
    assert [(i.role, i.content[0].text) for i in items] == [
        ("user", "More."), ("assistant", first.output_text), ("user", "Hello.")]
    assert items[1].id == first.output[0].id                # the previous reply's own item
    asc = client.responses.input_items.list(second.id, order="asc", limit=1)
    assert [i.id for i in asc.data] == [items[-1].id] and asc.has_more
    nxt = client.responses.input_items.list(second.id, order="asc", limit=5, after=asc.data[0].id)
    assert [i.id for i in nxt.data] == [i.id for i in reversed(items[:2])] and not nxt.has_more
    back = client.responses.input_items.list(second.id, order="asc", limit=1,
                                             extra_query={"before": nxt.data[-1].id})
    assert [i.id for i in back.data] == [nxt.data[0].id] and back.has_more    # the page before it
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_unknown")
    with pytest.raises(openai.BadRequestError):
        client.responses.input_items.list(second.id, limit=0)
