"""Anthropic's Messages API (/v1/messages) with the anthropic SDK against a real server: the same
reply as chat completions, the stream read by the SDK's accumulator, stop sequences, forced tool
use and its result sent back, a prefilled reply, count_tokens, thinking blocks, the x-api-key
header, and Anthropic's error shape for what a local model cannot do."""
from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import jsonschema
import openai
import pytest

from server.tokenizer import TextTokenizer
from tests.server.conftest import API_KEY, ServerProcess
from tests.server.test_tools import WEATHER

TOOLS = [{"name": "get_weather", "description": "forecast", "input_schema": WEATHER, "strict": True}]
ASK = "What is the weather in Paris?"
# greedy, full length: the SDK has no temperature parameter any more; the API still takes it
EXACT = {"extra_body": {"temperature": 0, "ignore_eos": True}}


@pytest.fixture(scope="module")
def client(srv: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.base, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def chat(srv: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0)


def model(chat: openai.OpenAI) -> str:
    return chat.models.list().data[0].id


def test_a_reply_is_the_chat_completion_as_a_text_block(client: anthropic.Anthropic, chat: openai.OpenAI) -> None:
    m = client.messages.create(model=model(chat), max_tokens=9, system="Be brief.",
                               messages=[{"role": "user", "content": ASK}], **EXACT)
    c = chat.chat.completions.create(model=model(chat), max_tokens=9, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": ASK}],
        extra_body={"ignore_eos": True})
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant"
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == c.choices[0].message.content
    assert m.stop_reason == "max_tokens" and m.stop_sequence is None
    # Anthropic's input_tokens leave out the tokens read from the cache
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == c.usage.prompt_tokens
    assert m.usage.output_tokens == 9


def test_the_stream_builds_the_same_message(client: anthropic.Anthropic, chat: openai.OpenAI) -> None:
    body = dict(model=model(chat), max_tokens=9, messages=[{"role": "user", "content": ASK}], **EXACT)
    whole = client.messages.create(**body)
    with client.messages.stream(**body) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert final.content[0].text == whole.content[0].text and final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 9
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == \
        whole.usage.input_tokens + whole.usage.cache_read_input_tokens


def test_a_stop_sequence_ends_the_reply_and_is_named(client: anthropic.Anthropic, chat: openai.OpenAI) -> None:
    body = dict(model=model(chat), max_tokens=16, messages=[{"role": "user", "content": ASK}], **EXACT)
    text = client.messages.create(**body).content[0].text
    stop = text[6:8]
    cut = text[:text.index(stop)]
    for stream in (False, True):
        if stream:
            with client.messages.stream(**body, stop_sequences=[stop, "never-written"]) as s:
                m = s.get_final_message()
        else:
            m = client.messages.create(**body, stop_sequences=[stop, "never-written"])
        assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
        assert "".join(b.text for b in m.content) == cut


def test_forced_tool_use_then_its_result(client: anthropic.Anthropic, chat: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": ASK}]
    m = client.messages.create(model=model(chat), max_tokens=80, messages=ask, tools=TOOLS,
                               tool_choice={"type": "tool", "name": "get_weather",
                                            "disable_parallel_tool_use": True})
    (use,) = m.content
    assert use.type == "tool_use" and use.name == "get_weather" and m.stop_reason == "tool_use"
    jsonschema.validate(use.input, WEATHER)
    follow = [*ask, {"role": "assistant", "content": m.content},
              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                            "content": [{"type": "text", "text": "sunny, 21 C"}]}]}]
    counted = client.messages.count_tokens(model=model(chat), messages=follow, tools=TOOLS)
    r = client.messages.create(model=model(chat), max_tokens=8, messages=follow, tools=TOOLS, **EXACT)
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == counted.input_tokens
    # the turn with the call is read from the cache: the prefix the first request left
    assert r.usage.cache_read_input_tokens > 0
    # the same conversation through chat completions: the same prompt
    c = chat.chat.completions.create(model=model(chat), max_tokens=1, messages=[
        {"role": "user", "content": ASK},
        {"role": "assistant", "content": "", "tool_calls": [{"id": use.id, "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps(use.input, separators=(",", ":"))}}]},
        {"role": "tool", "tool_call_id": use.id, "content": "sunny, 21 C"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "description": "forecast",
                                                 "parameters": WEATHER, "strict": True}}])
    assert c.usage.prompt_tokens == counted.input_tokens


def test_streamed_tool_use_is_read_by_the_sdk(client: anthropic.Anthropic, chat: openai.OpenAI) -> None:
    body = dict(model=model(chat), max_tokens=80, messages=[{"role": "user", "content": ASK}], tools=TOOLS,
                tool_choice={"type": "any", "disable_parallel_tool_use": True},
                extra_body={"temperature": 0})
    whole = client.messages.create(**body)
    with client.messages.stream(**body) as s:
        events = list(s)
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["tool_use"] and final.stop_reason == "tool_use"
    assert final.content[0].input == whole.content[0].input     # the JSON deltas, joined by the SDK
    assert any(e.type == "content_block_delta" and e.delta.type == "input_json_delta" for e in events)


def test_a_final_assistant_turn_is_continued(client: anthropic.Anthropic, chat: openai.OpenAI,
                                             tiny_model_dir: str) -> None:
    prefill = "The weather in Paris is"
    messages = [{"role": "user", "content": ASK}, {"role": "assistant", "content": prefill}]
    m = client.messages.create(model=model(chat), max_tokens=8, messages=messages, **EXACT)
    tok = TextTokenizer(tiny_model_dir)
    ids = tok.encode(tok.render_chat([{"role": "user", "content": ASK}]) + prefill, add_special_tokens=False)
    assert client.messages.count_tokens(model=model(chat), messages=messages).input_tokens == len(ids)
    c = chat.completions.create(model=model(chat), prompt=ids, max_tokens=8, temperature=0,
                                extra_body={"ignore_eos": True})
    assert m.content[0].text == c.choices[0].text     # the reply goes on from the prefill


def test_structured_output_follows_the_schema(client: anthropic.Anthropic, chat: openai.OpenAI) -> None:
    m = client.messages.create(model=model(chat), max_tokens=60, messages=[{"role": "user", "content": ASK}],
                               output_config={"format": {"type": "json_schema", "schema": WEATHER}})
    if m.stop_reason == "end_turn":
        jsonschema.validate(json.loads(m.content[0].text), WEATHER)
    else:
        assert m.stop_reason == "max_tokens"


def test_thinking_blocks_and_thinking_disabled(thinking: ServerProcess) -> None:
    client = anthropic.Anthropic(base_url=thinking.base, api_key="unused", max_retries=0)
    name = httpx.get(thinking.base + "/v1/models").json()["data"][0]["id"]
    body = dict(model=name, max_tokens=6, messages=[{"role": "user", "content": ASK}], **EXACT)
    m = client.messages.create(**body)     # the template opened <think>: a reply cut inside it
    assert [b.type for b in m.content] == ["thinking"] and m.content[0].thinking
    with client.messages.stream(**body) as s:
        kinds = [e.delta.type for e in s if e.type == "content_block_delta"]
        assert s.get_final_message().content[0].thinking == m.content[0].thinking
    assert set(kinds) == {"thinking_delta"}
    off = client.messages.create(**body, thinking={"type": "disabled"})
    assert [b.type for b in off.content] == ["text"]
    # the thinking sent back is the assistant turn's reasoning (this template drops it)
    follow = client.messages.count_tokens(model=name, thinking={"type": "disabled"}, messages=[
        {"role": "user", "content": ASK}, {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Hmm.", "signature": ""}, {"type": "text", "text": "Sunny."}]},
        {"role": "user", "content": "Thanks"}])
    assert follow.input_tokens > off.usage.input_tokens + off.usage.cache_read_input_tokens


def test_the_sdks_models_list_and_retrieve(client: anthropic.Anthropic, chat: openai.OpenAI) -> None:
    (listed,) = client.models.list().data        # Anthropic's page over the same /v1/models
    assert listed.id == model(chat) and listed.type == "model" and listed.display_name == listed.id
    assert client.models.retrieve(listed.id).created_at == listed.created_at
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("claude-sonnet-4-5")


def test_x_api_key_is_accepted_and_errors_are_anthropics(auth_server: ServerProcess) -> None:
    name = httpx.get(auth_server.base + "/v1/models", headers=auth_server.headers).json()["data"][0]["id"]
    ok = anthropic.Anthropic(base_url=auth_server.base, api_key=API_KEY, max_retries=0)
    m = ok.messages.create(model=name, max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    assert m.usage.output_tokens <= 3
    with pytest.raises(anthropic.AuthenticationError) as e:
        anthropic.Anthropic(base_url=auth_server.base, api_key="wrong", max_retries=0).messages.create(
            model=name, max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as e:
        ok.messages.create(model="claude-sonnet-4-5", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body == {"type": "error", "error": {"type": "not_found_error", "message": (
        f"model: The model 'claude-sonnet-4-5' does not exist; this server serves '{name}'")}}


@pytest.mark.parametrize("body,field", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": {"type": "all"}}, "tool_choice.type"),
    ({"messages": [{"role": "system", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi"}], "thinking": {"type": "on"}}, "thinking.type"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 1.5}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}],
      "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
      "tools": TOOLS, "tool_choice": {"type": "any"}}, "output_config.format"),
])
def test_bad_input_is_anthropics_400_naming_the_field(srv: ServerProcess, chat: openai.OpenAI,
                                                      body: dict[str, Any], field: str) -> None:
    full = {"model": model(chat), "max_tokens": 5, **body}
    if field == "max_tokens":
        del full["max_tokens"]
    r = httpx.post(srv.base + "/v1/messages", json=full, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert field in err["error"]["message"]
