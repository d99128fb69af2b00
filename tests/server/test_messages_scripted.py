"""The Messages API on scripted gpt-oss replies through the HTTP app: thinking, a preamble and
several tool uses in one reply, interleaved thinking and calls, a failure mid-stream. Every object
and event validates against the anthropic SDK's own types, the SDK's stream accumulator takes the
stream, and the content blocks sent back render as the same conversation through chat completions.
Also: the conversion of content blocks to chat messages."""
from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import httpx2
import pydantic
import pytest
from anthropic.types import ErrorResponse, Message, RawMessageStreamEvent

from server.anthropic_items import MessagesRequest, chat_messages
from tests.server.test_harmony_scripted import ANSWER, CALL, PREAMBLE, THINK
from tests.server.test_responses_scripted import CALL2, THINK2, app_for, call, events
from tests.server.test_tools import TOOLS as CHAT_TOOLS

TOOLS = [{"name": t["function"]["name"], "description": t["function"].get("description", ""),
          "input_schema": t["function"]["parameters"]} for t in CHAT_TOOLS]
EVENTS = pydantic.TypeAdapter(RawMessageStreamEvent)
ASK = [{"role": "user", "content": "hi"}]


def body(**more: Any) -> dict[str, Any]:
    return {"model": "tiny", "max_tokens": 200, "messages": ASK, "tools": TOOLS, **more}


def through_sdk(app: Any, request: dict[str, Any]) -> Message:
    """The stream read by the SDK's accumulator; its final message."""
    async def go() -> Message:
        # the SDK brings its own HTTP client package, httpx2 (a fork of httpx)
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://127.0.0.1") as h:
            client = anthropic.AsyncAnthropic(base_url="http://127.0.0.1", api_key="x", http_client=h,
                                              max_retries=0)
            async with client.messages.stream(**request) as stream:
                async for _ in stream:
                    pass
                return await stream.get_final_message()
    return asyncio.run(go())


@pytest.mark.parametrize("reply,kinds", [
    (THINK + PREAMBLE + CALL + CALL2, ["thinking", "text", "tool_use", "tool_use"]),
    (THINK + CALL + THINK2 + CALL2, ["thinking", "tool_use", "thinking", "tool_use"]),
    (THINK + ANSWER, ["thinking", "text"]),
])
def test_objects_and_events_are_the_sdks_types(scripted_dir: str, reply: str, kinds: list[str]) -> None:
    app = app_for(scripted_dir, reply)
    whole = call(app, "POST", "/v1/messages", body()).json()
    Message.model_validate(whole, strict=True)
    # whole, a reply's thinking is one block, first (the stream keeps the order written)
    assert {b["type"] for b in whole["content"]} == set(kinds) and whole["content"][0]["type"] == "thinking"
    expected = "tool_use" if "tool_use" in kinds else "end_turn"
    assert whole["stop_reason"] == expected
    streamed = events(call(app, "POST", "/v1/messages", body(stream=True)).text)
    for e in streamed:
        EVENTS.validate_python(e, strict=True)
    assert [e["type"] for e in streamed[-2:]] == ["message_delta", "message_stop"]
    assert streamed[-2]["delta"]["stop_reason"] == expected
    starts = [e for e in streamed if e["type"] == "content_block_start"]
    assert [e["content_block"]["type"] for e in starts] == kinds       # in the order written
    assert [e["index"] for e in starts] == list(range(len(kinds)))
    for i in range(len(kinds)):   # each block: start, deltas, stop, before the next begins
        own = [e["type"] for e in streamed if e.get("index") == i]
        assert own[0] == "content_block_start" and own[-1] == "content_block_stop"
        assert set(own[1:-1]) == {"content_block_delta"}
    sdk = through_sdk(app, body())
    assert [b.type for b in sdk.content] == kinds
    uses = [(b.name, b.input) for b in sdk.content if b.type == "tool_use"]
    assert uses == [(b["name"], b["input"]) for b in whole["content"] if b["type"] == "tool_use"]


@pytest.mark.parametrize("reply", [THINK + PREAMBLE + CALL, THINK + CALL + CALL2, THINK + ANSWER])
def test_blocks_sent_back_render_as_the_chat_conversation(gptoss_like_dir: str, reply: str) -> None:
    app = app_for(gptoss_like_dir, reply)
    first = call(app, "POST", "/v1/messages", body(system="Be brief.")).json()
    chat = call(app, "POST", "/v1/chat/completions", {
        "messages": [{"role": "system", "content": "Be brief."}, *ASK], "tools": CHAT_TOOLS}).json()
    message = chat["choices"][0]["message"]
    results = [{"type": "tool_result", "tool_use_id": b["id"], "content": "sunny"}
               for b in first["content"] if b["type"] == "tool_use"] or [{"type": "text", "text": "thanks"}]
    follow = call(app, "POST", "/v1/messages/count_tokens", body(system="Be brief.", messages=[
        *ASK, {"role": "assistant", "content": first["content"]}, {"role": "user", "content": results}])).json()
    ids = [b["id"] for b in first["content"] if b["type"] == "tool_use"]
    for c, i in zip(message.get("tool_calls") or [], ids):
        c["id"] = i
    outs = ([{"role": "tool", "tool_call_id": i, "content": "sunny"} for i in ids]
            or [{"role": "user", "content": "thanks"}])
    resent = call(app, "POST", "/v1/chat/completions", {
        "messages": [{"role": "system", "content": "Be brief."}, *ASK, message, *outs], "tools": CHAT_TOOLS}).json()
    assert follow["input_tokens"] == resent["usage"]["prompt_tokens"] > first["usage"]["input_tokens"]


def test_a_failure_mid_stream_is_an_error_event(scripted_dir: str) -> None:
    app = app_for(scripted_dir, THINK + ANSWER, fail_after=6)
    streamed = events(call(app, "POST", "/v1/messages", body(stream=True)).text)
    for e in streamed[:-1]:
        EVENTS.validate_python(e, strict=True)
    assert streamed[0]["type"] == "message_start"
    err = ErrorResponse.model_validate(streamed[-1], strict=True)
    assert err.error.type == "api_error" and err.error.message.startswith("the engine failed")
    with pytest.raises(anthropic.APIStatusError, match="the engine failed"):
        through_sdk(app, body())


def turns(**request: Any) -> tuple[list[dict[str, Any]], str]:
    return chat_messages(MessagesRequest.model_validate({"max_tokens": 1, **request}))


def test_content_blocks_become_chat_messages() -> None:
    use = {"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {"zone": "CET"}}
    messages, prefill = turns(system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "In French."}],
                              messages=[
        {"role": "user", "content": "hi"}, {"role": "user", "content": [{"type": "text", "text": "again"}]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "Hmm.", "signature": "x"},
                                          {"type": "redacted_thinking", "data": "x"},
                                          {"type": "text", "text": "Checking."}, use]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "12:00"},
                                     {"type": "text", "text": "and now?"}]},
        {"role": "assistant", "content": "It is"}, {"role": "assistant", "content": " noon"}])
    assert prefill == "It is noon"     # consecutive final turns merged, then continued
    assert messages == [
        {"role": "system", "content": "Be brief.\nIn French."},
        {"role": "user", "content": "hi\n\nagain"},       # consecutive user turns merged
        {"role": "assistant", "content": "Checking.", "reasoning_content": "Hmm.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone":"CET"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "12:00"},
        {"role": "user", "content": "and now?"}]
    with pytest.raises(Exception, match="prefill"):
        turns(messages=[*ASK, {"role": "assistant", "content": [use]}])


@pytest.mark.parametrize("request_body,field", [
    ({"messages": [{"role": "user", "content": [{"type": "document"}]}]}, "messages.0.content.0.type"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                  "content": [{"type": "image"}]}]}]}, "messages.0.content.0.content.0.type"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"system": [{"type": "image"}]}, "system.0"),
    ({"tools": [{"name": "f"}]}, "tools.0.input_schema"),
    ({"tool_choice": {"type": "tool"}}, "tool_choice.name"),
    ({"output_config": {"effort": "extreme"}}, "output_config.effort"),
    ({"output_format": {"type": "json_object"}}, "output_format"),
    ({"mcp_servers": [{"url": "http://x"}]}, "mcp_servers"),
    ({"stop_sequences": ["a"] * 17}, "stop_sequences"),
    ({"stop": ["a"]}, "stop"),                         # chat completions' name, not silently ignored
    ({"output_config": {"effort": ["low"]}}, "output_config.effort"),
    ({"system": 5}, "system"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                  "content": ["x"]}]}]}, "messages.0.content.0.content.0"),
    ({"tools": [{"name": "f", "input_schema": {"type": "object", "properties": 5}}],
      "tool_choice": {"type": "any"}}, "tools"),     # the grammar's error: no index
])
def test_bad_input_is_a_400_naming_the_messages_field(scripted_dir: str, request_body: dict[str, Any],
                                                      field: str) -> None:
    r = call(app_for(scripted_dir, ANSWER), "POST", "/v1/messages",
             {"model": "tiny", "max_tokens": 5, "messages": ASK, **request_body})
    assert r.status_code == 400, r.text
    err = ErrorResponse.model_validate(r.json(), strict=True)
    assert err.error.type == "invalid_request_error" and field in err.error.message, err


def test_unknown_route_and_unknown_model_in_anthropics_shape(scripted_dir: str) -> None:
    app = app_for(scripted_dir, ANSWER)
    for method, path, payload, status in [("GET", "/v1/messages/batches", None, 404),
                                          ("POST", "/v1/messages", body(model="claude-opus-4"), 404),
                                          ("POST", "/v1/messages", {"messages": ASK}, 400)]:
        r = call(app, method, path, payload)
        assert r.status_code == status
        assert ErrorResponse.model_validate(r.json(), strict=True).type == "error"
    r = call(app, "POST", "/v1/chat/completions", {"model": "claude-opus-4", "messages": ASK})
    assert r.json()["error"]["code"] == "model_not_found"     # OpenAI's shape off these routes


HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": %s}\n</tool_call>'


@pytest.mark.parametrize("args,expected", [('{"city": "Paris", "days": 2}', {"city": "Paris", "days": 2}),
                                           ('"Paris"', {}), ("[1, 2]", {})])
def test_tool_input_is_the_same_object_whole_and_streamed(tiny_model_dir: str, args: str,
                                                          expected: dict[str, Any]) -> None:
    app = app_for(tiny_model_dir, "\n\n" + HERMES_CALL % args)
    whole = call(app, "POST", "/v1/messages", body()).json()
    assert [(b["type"], b["input"]) for b in whole["content"]] == [("tool_use", expected)]
    streamed = events(call(app, "POST", "/v1/messages", body(stream=True)).text)
    # the whitespace before the call is no text block, as in the whole reply
    assert [e["content_block"]["type"] for e in streamed if e["type"] == "content_block_start"] == ["tool_use"]
    sdk = through_sdk(app, body())        # the SDK's accumulator parses the input JSON
    assert [(b.type, b.input) for b in sdk.content] == [("tool_use", expected)]


PREFILL = [*ASK, {"role": "assistant", "content": "{"}]


def test_a_prefill_only_where_the_reply_is_free_text(tiny_model_dir: str, scripted_dir: str,
                                                     thinking_dir: str) -> None:
    plain = {"model": "tiny", "max_tokens": 5, "messages": PREFILL}
    fmt = {"output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}
    for where, request, field in [
            (tiny_model_dir, {**plain, **fmt}, "messages"),          # the grammar would start after it
            (tiny_model_dir, {**plain, "tools": TOOLS, "tool_choice": {"type": "any"}}, "messages"),
            (scripted_dir, plain, "messages"),                       # harmony
            (thinking_dir, plain, "thinking")]:                      # it would be read as thinking
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            r = call(app_for(where, "x"), "POST", path, request)
            assert r.status_code == 400 and r.json()["error"]["message"].startswith(field), r.text
    for where, request in [(tiny_model_dir, plain), (thinking_dir, {**plain, "thinking": {"type": "disabled"}})]:
        r = call(app_for(where, "x"), "POST", "/v1/messages", request)
        assert r.status_code == 200 and r.json()["content"] == [{"type": "text", "text": "x"}], r.text
