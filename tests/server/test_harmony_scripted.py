"""The harmony replies of gpt-oss through the HTTP app with scripted engine replies: each parser
choice, streamed and whole, response_format, cut calls, bare replies, and the server's own replies
sent back through a gpt-oss-like template."""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

import httpx
import pytest

from configs import ServerConfig
from engine.client import EngineClient
from engine.protocol import (FINISH_LENGTH, FINISH_STOP, EngineStats, GenerateRequest, ModelInfo,
                             TokenDelta)
from server.app import create_app
from server.tokenizer import HARMONY_TAGS, TextTokenizer
from tests.server.test_tools import ASK, SCHEMAS, TOOLS



THINK = "<|channel|>analysis<|message|>The user asks about Paris.<|end|>"
PREAMBLE = "<|start|>assistant<|channel|>commentary<|message|>Checking the forecast.<|end|>"
CALL = ('<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
        '{"city": "Paris", "days": 2}<|call|>')
ANSWER = "<|start|>assistant<|channel|>final<|message|>Sunny, 24 °C.<|return|>"


class ScriptedStream:
    """The deltas of one request: the script's tokens one by one, as the engine sends them."""

    def __init__(self, req: GenerateRequest, script: list[int]) -> None:
        n = min(len(script), req.sampling.max_tokens)
        reason = FINISH_STOP if n == len(script) else FINISH_LENGTH
        self._deltas = [TokenDelta(req.request_id, (t,), (-0.25,), None, k == n - 1,
                                   reason if k == n - 1 else None, None, len(req.prompt_token_ids), k + 1)
                        for k, t in enumerate(script[:n])]

    def __aiter__(self) -> "ScriptedStream":
        return self

    async def __anext__(self) -> TokenDelta:
        if not self._deltas:
            raise StopAsyncIteration
        await asyncio.sleep(0)
        return self._deltas.pop(0)

    def close(self) -> None:
        self._deltas = []


class ScriptedClient(EngineClient):
    """An engine that answers every request with the same tokens."""

    def __init__(self, info: ModelInfo, script: list[int]) -> None:
        self.info, self.script = info, script

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def submit(self, req: GenerateRequest) -> AsyncIterator[TokenDelta]:
        return ScriptedStream(req, self.script)

    async def abort(self, request_id: str) -> None: ...

    async def stats(self) -> EngineStats:
        return EngineStats()

    @property
    def ready(self) -> bool:
        return True

    @property
    def model_info(self) -> ModelInfo:
        return self.info

    @property
    def queue_depth(self) -> int:
        return 0

    @property
    def in_flight(self) -> int:
        return 0


def scripted(model_dir: str, reply: str, body: dict[str, Any], stream: bool, status: int = 200,
             **cfg: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the JSON response, or for a stream the chunks) of the app answering ``reply``; the error
    for a ``status`` other than 200."""
    tok = TextTokenizer(model_dir)
    info = ModelInfo("tiny", model_dir, "mixtral", 1024, tok.vocab_size + 1, ())
    app = create_app(ServerConfig(**cfg), ScriptedClient(info, tok.encode(reply, add_special_tokens=False)),
                     tok, "tiny")

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as http:
            return await http.post("/v1/chat/completions", json={"messages": ASK, "stream": stream, **body})
    r = asyncio.run(go())
    assert r.status_code == status, r.text
    if not stream or status != 200:
        return r.json(), []
    lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return {}, [json.loads(x) for x in lines[:-1]]


def joined(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """A stream's deltas put together as a message: text fields joined, calls by index."""
    out: dict[str, Any] = {}
    calls: dict[int, dict[str, Any]] = {}
    for c in chunks:
        if not c["choices"]:
            continue
        d = c["choices"][0]["delta"]
        for key in ("content", "reasoning_content"):
            if d.get(key):
                out[key] = out.get(key, "") + d[key]
        for tc in d.get("tool_calls", []):
            call = calls.setdefault(tc["index"], {"arguments": ""})
            call.update({k: tc[k] for k in ("id", "type") if k in tc})
            call["name"] = tc["function"].get("name", call.get("name"))
            call["arguments"] += tc["function"].get("arguments", "")
        out["finish_reason"] = c["choices"][0]["finish_reason"] or out.get("finish_reason")
    out["calls"] = [calls[i] for i in sorted(calls)]
    return out


def test_scripted_reasoning_preamble_and_call(scripted_dir: str) -> None:
    body = {"tools": TOOLS, "logprobs": True}
    full, _ = scripted(scripted_dir, THINK + PREAMBLE + CALL, body, stream=False)
    choice = full["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    msg = choice["message"]
    assert msg["reasoning_content"] == "The user asks about Paris."
    assert msg["content"] == "Checking the forecast."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg["tool_calls"]] == [
        ("get_weather", {"city": "Paris", "days": 2})]
    assert "".join(t["token"] for t in choice["logprobs"]["content"]) == THINK + PREAMBLE + CALL
    _, chunks = scripted(scripted_dir, THINK + PREAMBLE + CALL, body, stream=True)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    got = joined(chunks)
    assert got["reasoning_content"] == msg["reasoning_content"] and got["content"] == msg["content"]
    assert [(c["name"], c["arguments"]) for c in got["calls"]] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]]
    assert got["finish_reason"] == "tool_calls"
    # every token's logprobs came on some chunk, in order; no tag shows in any text
    tokens = [t["token"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
              for t in c["choices"][0]["logprobs"]["content"]]
    assert "".join(tokens) == THINK + PREAMBLE + CALL
    texts = [v for c in chunks if c["choices"] for k, v in c["choices"][0]["delta"].items() if k != "role"]
    assert not any(tag in json.dumps(v) for v in texts for tag in HARMONY_TAGS)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("cfg,reasoning,content", [
    ({}, "The user asks about Paris.", "Sunny, 24 °C."),
    ({"reasoning_parser": "none"}, None, "The user asks about Paris.\nSunny, 24 °C."),
    ({"tool_parser": "harmony", "reasoning_parser": "think"}, "The user asks about Paris.", "Sunny, 24 °C."),
    # both parsers set to others: the reply's raw text, its tags included
    ({"tool_parser": "hermes", "reasoning_parser": "think"}, None, THINK + ANSWER),
])
def test_scripted_answer_under_each_parser_choice(scripted_dir: str, cfg: dict[str, str], reasoning: Any,
                                                  content: str, stream: bool) -> None:
    full, chunks = scripted(scripted_dir, THINK + ANSWER, {"tools": TOOLS}, stream, **cfg)
    got = joined(chunks) if stream else {**full["choices"][0]["message"], **full["choices"][0]}
    assert got.get("reasoning_content") == reasoning and got["content"] == content
    assert got["finish_reason"] == "stop"


def test_a_scripted_reply_cut_inside_a_call(scripted_dir: str) -> None:
    """max_tokens cuts the call: with tool_choice auto its text is content; forced, the call keeps
    its arguments so far, with finish_reason length (as the other formats' forced calls)."""
    tok = TextTokenizer(scripted_dir)
    cut = len(tok.encode(THINK + CALL[:-20], add_special_tokens=False))
    full, _ = scripted(scripted_dir, THINK + CALL, {"tools": TOOLS, "max_tokens": cut}, stream=False)
    choice = full["choices"][0]
    assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"].startswith('{"city": "Paris"')
    forced = {"tools": TOOLS, "max_tokens": cut, "tool_choice": "required"}
    _, chunks = scripted(scripted_dir, THINK + CALL, forced, stream=True)
    got = joined(chunks)
    assert got["finish_reason"] == "length" and got["calls"][0]["name"] == "get_weather"
    assert got["calls"][0]["arguments"].startswith('{"city": "Paris"') and "content" not in got


RF = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMAS["get_weather"]}}
JSON_ANSWER = '<|start|>assistant<|channel|>final <|constrain|>json<|message|>{"city": "Paris", "days": 2}<|return|>'


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("cfg,reasoning,content", [
    ({}, "The user asks about Paris.", '{"city": "Paris", "days": 2}'),
    ({"reasoning_parser": "none"}, None, 'The user asks about Paris.\n{"city": "Paris", "days": 2}'),
])
def test_scripted_response_format_reply(scripted_dir: str, cfg: dict[str, str], reasoning: Any, content: str,
                                        stream: bool) -> None:
    """A response_format reply is read as harmony: the final channel's JSON is the content, the
    analysis reasoning_content. (With --reasoning-parser none the grammar has no analysis
    message, so the content is the JSON alone; the scripted engine does not follow grammars.)"""
    full, chunks = scripted(scripted_dir, THINK + JSON_ANSWER, {"tools": TOOLS, "response_format": RF}, stream, **cfg)
    got = joined(chunks) if stream else {**full["choices"][0]["message"], **full["choices"][0]}
    assert got.get("reasoning_content") == reasoning and got["content"] == content
    assert got["finish_reason"] == "stop" and not got.get("calls") and not got.get("tool_calls")


def test_response_format_with_a_forced_call_is_refused(scripted_dir: str) -> None:
    body = {"tools": TOOLS, "tool_choice": "required", "response_format": RF}
    err, _ = scripted(scripted_dir, THINK + JSON_ANSWER, body, False, status=400)
    assert err["error"]["param"] == "response_format"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("reply,reasoning,content", [
    ("assistant: the answer is 4.<|return|>", None, "assistant: the answer is 4."),
    ("analysis<|message|>The user says hi.<|end|><|start|>assistant<|channel|>final<|message|>Hello!<|return|>",
     "The user says hi.", "Hello!"),
])
def test_scripted_replies_without_full_headers(scripted_dir: str, reply: str, reasoning: Any, content: str,
                                              stream: bool) -> None:
    """Header words ended without a message are the content as written; a header that names its
    channel without <|channel|> is read on that channel."""
    full, chunks = scripted(scripted_dir, reply, {}, stream)
    got = joined(chunks) if stream else {**full["choices"][0]["message"], **full["choices"][0]}
    assert got.get("reasoning_content") == reasoning and got["content"] == content


def test_the_servers_own_replies_go_back_to_a_gpt_oss_like_template(gptoss_like_dir: str) -> None:
    """A reply with reasoning, a preamble and a call (and tools without a description) sent back
    with its result renders; so does a turn with several calls, each call before its own result."""
    body = {"tools": TOOLS}                               # get_time has no description
    full, _ = scripted(gptoss_like_dir, THINK + PREAMBLE + CALL, body, stream=False)
    msg = full["choices"][0]["message"]
    assert msg["content"] and msg["reasoning_content"] and msg["tool_calls"]
    history = [*ASK, msg, {"role": "tool", "tool_call_id": msg["tool_calls"][0]["id"], "content": "sunny"}]
    full, _ = scripted(gptoss_like_dir, ANSWER, {**body, "messages": history}, stream=False)
    assert full["choices"][0]["message"]["content"] == "Sunny, 24 °C."
    # two calls in one turn, their results in the other order
    weather = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}
    time = {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}
    history = [*ASK, {"role": "assistant", "content": None, "reasoning_content": "Two calls.", "tool_calls": [weather, time]},
               {"role": "tool", "tool_call_id": "c2", "content": "12:00"},
               {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    full, _ = scripted(gptoss_like_dir, ANSWER, {**body, "messages": history}, stream=False)
    tools = [{"type": "function", "function": {**t["function"], "description": t["function"].get("description", "")}}
             for t in TOOLS]
    objects = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
               for c in (weather, time)]                 # (as the server gives a template calls)
    one_by_one = [*ASK, {"role": "assistant", "thinking": "Two calls.", "tool_calls": objects[:1]},
                  {"role": "tool", "content": "sunny"},
                  {"role": "assistant", "tool_calls": objects[1:]}, {"role": "tool", "content": "12:00"}]
    want = TextTokenizer(gptoss_like_dir).encode_chat(one_by_one, {"tools": tools})
    assert full["usage"]["prompt_tokens"] == len(want)
