"""The Responses API on scripted gpt-oss replies through the HTTP app: reasoning, a preamble and
several calls in one reply, interleaved reasoning and calls, a failure mid-stream. Every object
and event validates against the OpenAI SDK's own types, the SDK's stream accumulator takes the
stream, and a conversation continued with previous_response_id renders exactly as the same
conversation resent whole (output items sent back as the SDK sends them)."""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Optional

import httpx
import openai
import pydantic
import pytest
from openai.types.responses import Response, ResponseItem, ResponseStreamEvent

from configs import ServerConfig
from engine.client import EngineFailure
from engine.protocol import GenerateRequest, ModelInfo, TokenDelta
from server.app import create_app
from server.responses_items import history_message, input_messages, with_instructions
from server.tokenizer import TextTokenizer
from tests.server.test_harmony_scripted import (ANSWER, CALL, PREAMBLE, THINK, ScriptedClient,
                                                ScriptedStream)
from tests.server.test_tools import TOOLS as CHAT_TOOLS

TOOLS = [{"type": "function", **t["function"]} for t in CHAT_TOOLS]
CALL2 = ('<|start|>assistant<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>'
         '{"zone": "CET"}<|call|>')
THINK2 = "<|start|>assistant<|channel|>analysis<|message|>Now the time.<|end|>"
EVENTS = pydantic.TypeAdapter(ResponseStreamEvent)
ITEMS = pydantic.TypeAdapter(ResponseItem)


class _Failing(ScriptedClient):
    """Replies with the script, then fails after ``tokens`` tokens."""

    def __init__(self, info: ModelInfo, script: list[int], tokens: int) -> None:
        super().__init__(info, script)
        self.tokens = tokens

    def submit(self, req: GenerateRequest) -> AsyncIterator[TokenDelta]:
        inner, limit = ScriptedStream(req, self.script), self.tokens

        class Stream:
            sent = 0

            def __aiter__(self) -> "Stream":
                return self

            async def __anext__(self) -> TokenDelta:
                self.sent += 1
                if self.sent > limit:
                    raise EngineFailure("the engine failed this request")
                return await inner.__anext__()

            def close(self) -> None:
                pass
        return Stream()


def app_for(model_dir: str, reply: str, fail_after: Optional[int] = None) -> Any:
    tok = TextTokenizer(model_dir)
    info = ModelInfo("tiny", model_dir, "mixtral", 1024, tok.vocab_size + 1, ())
    ids = tok.encode(reply, add_special_tokens=False)
    client = ScriptedClient(info, ids) if fail_after is None else _Failing(info, ids, fail_after)
    return create_app(ServerConfig(), client, tok, "tiny")


def call(app: Any, method: str, path: str, body: Optional[dict[str, Any]] = None) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as h:
            return await h.request(method, path, json=body)
    return asyncio.run(go())


def events(text: str) -> list[dict[str, Any]]:
    """A stream's events, each checked: its SSE event name is its type."""
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        event = json.loads(lines["data"])
        assert lines["event"] == event["type"]
        out.append(event)
    return out


def through_sdk(app: Any, body: dict[str, Any]) -> Any:
    """The stream read by the SDK's accumulator; its final response."""
    async def go() -> Any:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as h:
            client = openai.AsyncOpenAI(base_url="http://127.0.0.1/v1", api_key="x", http_client=h,
                                        max_retries=0)
            async with client.responses.stream(model="tiny", **body) as stream:
                async for _ in stream:
                    pass
                return await stream.get_final_response()
    return asyncio.run(go())


@pytest.mark.parametrize("reply,kinds", [
    (THINK + PREAMBLE + CALL + CALL2, ["reasoning", "message", "function_call", "function_call"]),
    (THINK + CALL + THINK2 + CALL2, ["reasoning", "function_call", "reasoning", "function_call"]),
    (THINK + ANSWER, ["reasoning", "message"]),
])
def test_objects_and_events_are_the_sdks_types(scripted_dir: str, reply: str, kinds: list[str]) -> None:
    app = app_for(scripted_dir, reply)
    whole = call(app, "POST", "/v1/responses", {"input": "hi", "tools": TOOLS}).json()
    Response.model_validate(whole, strict=True)
    # whole, a reply's reasoning is one item, first (the stream keeps the order written)
    assert {i["type"] for i in whole["output"]} == set(kinds) and whole["output"][0]["type"] == "reasoning"
    streamed = events(call(app, "POST", "/v1/responses", {"input": "hi", "tools": TOOLS, "stream": True}).text)
    for e in streamed:
        EVENTS.validate_python(e, strict=True)
    assert [e["sequence_number"] for e in streamed] == list(range(len(streamed)))
    final = streamed[-1]
    assert final["type"] == "response.completed"
    assert [i["type"] for i in final["response"]["output"]] == kinds       # in the order written
    added = [e["item"]["status"] for e in streamed if e["type"] == "response.output_item.added"
             and e["item"]["type"] != "reasoning"]
    assert set(added) <= {"in_progress"}
    sdk = through_sdk(app, {"input": "hi", "tools": TOOLS})
    assert [i.type for i in sdk.output] == kinds
    calls = [(i.name, json.loads(i.arguments)) for i in sdk.output if i.type == "function_call"]
    assert calls == [(i["name"], json.loads(i["arguments"])) for i in final["response"]["output"]
                     if i["type"] == "function_call"]


@pytest.mark.parametrize("reply", [THINK + PREAMBLE + CALL, THINK + CALL + CALL2,
                                   THINK + CALL + THINK2 + CALL2, THINK + ANSWER])
def test_previous_response_id_renders_as_the_conversation_resent(gptoss_like_dir: str, reply: str) -> None:
    app = app_for(gptoss_like_dir, reply)
    ask = "What is the weather?"
    first = call(app, "POST", "/v1/responses", {"input": ask, "tools": TOOLS, "instructions": "Be brief."}).json()
    sent_back = [o.model_dump(exclude_none=True) for o in Response.model_validate(first).output]
    outs = [{"type": "function_call_output", "call_id": i["call_id"], "output": "sunny"}
            for i in first["output"] if i["type"] == "function_call"] or [{"role": "user", "content": "thanks"}]
    follow = call(app, "POST", "/v1/responses", {"previous_response_id": first["id"], "input": outs,
                                                 "tools": TOOLS, "instructions": "Be brief."}).json()
    whole = call(app, "POST", "/v1/responses", {"input": [{"role": "user", "content": ask}, *sent_back, *outs],
                                                "tools": TOOLS, "instructions": "Be brief.", "store": False}).json()
    assert follow["usage"]["input_tokens"] == whole["usage"]["input_tokens"] > first["usage"]["input_tokens"]


@pytest.mark.parametrize("reply", [THINK + PREAMBLE + CALL + CALL2, THINK + ANSWER])
def test_input_items_are_the_sdks_types(gptoss_like_dir: str, reply: str) -> None:
    app = app_for(gptoss_like_dir, reply)
    first = call(app, "POST", "/v1/responses", {"input": "What is the weather?", "tools": TOOLS}).json()
    outs = [{"type": "function_call_output", "call_id": i["call_id"], "output": "sunny"}
            for i in first["output"] if i["type"] == "function_call"] or [{"role": "user", "content": "thanks"}]
    second = call(app, "POST", "/v1/responses", {"previous_response_id": first["id"], "input": outs,
                                                 "tools": TOOLS}).json()
    listed = call(app, "GET", f"/v1/responses/{second['id']}/input_items?order=asc&limit=100").json()
    for item in listed["data"]:
        ITEMS.validate_python(item, strict=True)
    assert [i["type"] for i in listed["data"]] == ["message", *(o["type"] for o in first["output"]),
                                                   *(o.get("type", "message") for o in outs)]
    assert listed["data"][1:1 + len(first["output"])] == first["output"]     # the items themselves
    assert listed["first_id"] == listed["data"][0]["id"] and not listed["has_more"]


def test_sent_back_items_are_one_assistant_turn() -> None:
    reasoning = {"type": "reasoning", "id": "rs_1", "summary": [],
                 "content": [{"type": "reasoning_text", "text": "Think."}]}
    message = {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]}
    fc = [{"type": "function_call", "id": f"fc_{n}", "call_id": f"call_{n}", "name": n,
           "arguments": "{}", "status": "completed"} for n in ("a", "b")]
    (turn,) = history_message([reasoning, message, *fc])
    assert turn == {"role": "assistant", "content": "Checking.", "reasoning_content": "Think.",
                    "tool_calls": [{"id": f"call_{n}", "type": "function",
                                    "function": {"name": n, "arguments": "{}"}} for n in ("a", "b")]}
    (turn,) = history_message([reasoning, fc[0], reasoning, fc[1]])
    assert turn["content"] is None and turn["reasoning_content"] == "Think.\nThink."
    assert len(turn["tool_calls"]) == 2
    (turn,) = history_message([reasoning])                      # a reply cut while reasoning
    assert turn == {"role": "assistant", "content": "", "reasoning_content": "Think."}
    user = {"role": "user", "content": "hi"}
    assert input_messages([user, message, user, message]) == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Checking."}] * 2
    assert with_instructions("Be brief.", [{"role": "system", "content": "In French."}, user]) == [
        {"role": "system", "content": "Be brief.\n\nIn French."}, user]


def test_a_failure_mid_stream_is_an_error_then_response_failed(scripted_dir: str) -> None:
    app = app_for(scripted_dir, THINK + ANSWER, fail_after=6)
    streamed = events(call(app, "POST", "/v1/responses", {"input": "hi", "stream": True}).text)
    for e in streamed:
        EVENTS.validate_python(e, strict=True)
    assert [e["type"] for e in streamed[-2:]] == ["error", "response.failed"]
    failed = streamed[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["message"].startswith("the engine failed")
    assert call(app, "GET", f"/v1/responses/{failed['id']}").status_code == 404     # not stored


@pytest.mark.parametrize("body,param", [
    ({"input": [{"type": "reasoning", "summary": 5}]}, "input.0.summary"),
    ({"input": "hi", "text": {"format": "json_object"}}, "text.format"),
    ({"input": ["hi"]}, "input.0"),
    ({"input": "hi", "tool_choice": ["auto"]}, "tool_choice"),
    ({"input": "hi", "tools": ["get_time"]}, "tools.0"),
    ({"input": "hi", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ({"input": "hi", "tools": [{"type": "function", "parameters": {}}]}, "tools.0.name"),
    ({"input": "hi", "top_logprobs": 3}, "top_logprobs"),
])
def test_bad_input_is_a_400_naming_the_responses_field(scripted_dir: str, body: dict[str, Any],
                                                       param: str) -> None:
    r = call(app_for(scripted_dir, ANSWER), "POST", "/v1/responses", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
