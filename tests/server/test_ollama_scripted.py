"""Ollama's API on scripted gpt-oss replies through the HTTP app: thinking, a preamble and tool
calls, a failure mid-stream. Objects validate against the ollama client's own types, streamed
lines join to the whole reply, tool calls arrive whole with object arguments; and the conversion
of Ollama's messages (tool results named by tool_name) to chat messages."""
from __future__ import annotations

import asyncio
import json
from typing import Any, Optional

import httpx
import ollama
import pytest
from ollama import ChatResponse, GenerateResponse

from server.errors import APIError
from server.ollama_items import chat_messages, sampling
from server.tokenizer import TextTokenizer
from tests.server.test_harmony_scripted import ANSWER, CALL, PREAMBLE, THINK
from tests.server.test_responses_scripted import CALL2, app_for, call
from tests.server.test_tools import TOOLS

ASK = [{"role": "user", "content": "hi"}]


def lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line]


def through_client(app: Any, stream: bool, **request: Any) -> Any:
    """The ollama client's answer: the whole response, or the list of streamed parts."""
    async def go() -> Any:
        client = ollama.AsyncClient(host="http://127.0.0.1", transport=httpx.ASGITransport(app=app))
        out = await client.chat(model="tiny", stream=stream, **request)
        return [p async for p in out] if stream else out
    return asyncio.run(go())


@pytest.mark.parametrize("reply,calls,content", [
    (THINK + PREAMBLE + CALL + CALL2, ["get_weather", "get_time"], "Checking the forecast."),
    (THINK + ANSWER, [], "Sunny, 24 °C."),
])
def test_thinking_and_tool_calls_whole_and_streamed(scripted_dir: str, reply: str, calls: list[str],
                                                    content: str) -> None:
    app = app_for(scripted_dir, reply)
    body = {"model": "tiny", "messages": ASK, "tools": TOOLS}
    whole = call(app, "POST", "/api/chat", {**body, "stream": False}).json()
    r = ChatResponse.model_validate(whole, strict=True)
    assert r.message.thinking == "The user asks about Paris." and r.message.content == content
    assert [c.function.name for c in r.message.tool_calls or []] == calls
    assert all(isinstance(c.function.arguments, dict) for c in r.message.tool_calls or [])
    assert r.done and r.done_reason == "stop" and r.eval_count and r.prompt_eval_count
    parts = lines(call(app, "POST", "/api/chat", body).text)      # Ollama streams by default
    for p in parts:
        ChatResponse.model_validate(p, strict=True)
    assert [p["done"] for p in parts] == [False] * (len(parts) - 1) + [True]
    msgs = [p["message"] for p in parts]
    assert "".join(m.get("thinking", "") for m in msgs) == r.message.thinking
    assert "".join(m["content"] for m in msgs) == content
    streamed_calls = [c for m in msgs for c in m.get("tool_calls", [])]
    assert streamed_calls == [c.model_dump(exclude_none=True) for c in r.message.tool_calls or []]
    parts = through_client(app, True, messages=ASK, tools=TOOLS)
    assert [c.function.name for p in parts for c in p.message.tool_calls or []] == calls


def test_generate_reads_thinking_too(scripted_dir: str) -> None:
    app = app_for(scripted_dir, THINK + ANSWER)
    whole = GenerateResponse.model_validate(call(app, "POST", "/api/generate", {
        "model": "tiny", "prompt": "hi", "stream": False}).json(), strict=True)
    assert whole.thinking == "The user asks about Paris." and whole.response == "Sunny, 24 °C."
    parts = lines(call(app, "POST", "/api/generate", {"model": "tiny", "prompt": "hi"}).text)
    assert "".join(p["response"] for p in parts) == whole.response and parts[-1]["done"]


def test_a_failure_mid_stream_is_an_error_line(scripted_dir: str) -> None:
    app = app_for(scripted_dir, THINK + ANSWER, fail_after=6)
    parts = lines(call(app, "POST", "/api/chat", {"model": "tiny", "messages": ASK}).text)
    assert parts[-1] == {"error": "the engine failed: the engine failed this request"}
    assert not any(p.get("done") for p in parts)
    with pytest.raises(ollama.ResponseError, match="the engine failed"):
        through_client(app, True, messages=ASK)


def test_tool_results_answer_calls_by_tool_name() -> None:
    def use(name: str) -> dict[str, Any]:
        return {"function": {"name": name, "arguments": {"x": 1}}}
    got = chat_messages([
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "thinking": "Hmm.", "tool_calls": [use("a"), use("b")]},
        {"role": "tool", "content": "B", "tool_name": "b"}, {"role": "tool", "content": "A"}])
    assert got[1] == {"role": "assistant", "content": "", "reasoning_content": "Hmm.", "tool_calls": [
        {"id": f"call_1_{k}", "type": "function", "function": {"name": n, "arguments": '{"x":1}'}}
        for k, n in enumerate("ab")]}
    assert [(m["content"], m["tool_call_id"]) for m in got[2:]] == [("B", "call_1_1"), ("A", "call_1_0")]


@pytest.mark.parametrize("path,body,status,field", [
    ("/api/chat", {"messages": ASK}, 400, "model"),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "bot", "content": "x"}]}, 400, "messages.0.role"),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "assistant", "tool_calls": [{}]}]}, 400,
     "messages.0.tool_calls.0.function"),
    ("/api/chat", {"model": "tiny", "messages": ASK, "options": {"num_predict": "x"}}, 400,
     "options.num_predict"),
    ("/api/chat", {"model": "tiny", "messages": ASK, "tools": [{"type": "function"}]}, 400, "tools.0"),
    ("/api/generate", {"model": "tiny", "prompt": "hi", "context": [1, 2]}, 400, "context"),
    ("/api/chat", {"model": "tiny", "messages": ASK, "format": {"type": "object", "properties": ["a"]}},
     400, "format"),
    ("/api/generate", {"model": "tiny", "prompt": "hi", "images": ["aGk="]}, 400, "images"),
    ("/api/show", {"model": "other"}, 404, "model"),
    ("/api/embed", {"model": "tiny", "input": "hi"}, 501, None),
    ("/api/delete", {"model": "tiny"}, 501, None),
])
def test_errors_are_ollamas(scripted_dir: str, path: str, body: dict[str, Any], status: int,
                            field: Optional[str]) -> None:
    r = call(app_for(scripted_dir, ANSWER), "POST", path, body)
    assert r.status_code == status, r.text
    assert list(r.json()) == ["error"] and r.json()["error"].startswith(field or "/api/")


def test_an_overflowing_number_is_a_400(scripted_dir: str) -> None:
    async def post(raw: bytes) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app_for(scripted_dir, ANSWER)),
                                     base_url="http://127.0.0.1") as h:
            return await h.post("/api/chat", content=raw)
    for name in ("seed", "num_predict", "top_k"):     # JSON's 1e400 reads as inf
        r = asyncio.run(post(b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
                             b'"options": {"%s": 1e400}}' % name.encode()))
        assert r.status_code == 400 and r.json()["error"].startswith(f"options.{name}"), r.text


def test_load_requests_answer_at_once(scripted_dir: str) -> None:
    app = app_for(scripted_dir, ANSWER)
    for path, body in [("/api/chat", {"model": "tiny:latest", "messages": []}),
                       ("/api/generate", {"model": "tiny", "keep_alive": "5m"})]:
        r = call(app, "POST", path, body).json()
        assert r["done"] is True and r["done_reason"] == "load" and r["model"] == body["model"]


def test_options_are_read_as_ollama_reads_them() -> None:
    assert sampling({"num_predict": -1, "seed": -1, "top_p": 0, "top_k": -5}, 1000) == {
        "max_tokens": 1000, "top_k": 0}                  # until the context is full; no seed
    assert sampling({"num_predict": 64.0, "temperature": 3, "presence_penalty": -7, "top_k": 10**9,
                     "num_ctx": 8192, "mirostat": 2}, 1000) == {
        "max_tokens": 64, "temperature": 2.0, "presence_penalty": -2.0, "top_k": 1_000_000}
    for bad in ({"temperature": "hot"}, {"seed": True}, {"num_predict": float("inf")}):
        with pytest.raises(APIError, match="options"):
            sampling(bad, 1000)
    with pytest.raises(APIError, match="options must be an object"):
        sampling([1], 1000)


def test_a_final_assistant_message_is_continued(tiny_model_dir: str) -> None:
    app = app_for(tiny_model_dir, "x")
    tok = TextTokenizer(tiny_model_dir)
    r = call(app, "POST", "/api/chat", {"model": "tiny", "stream": None, "messages": [
        *ASK, {"role": "assistant", "content": "The answer is"}]})
    parts = lines(r.text)          # stream null streams, as in Ollama
    assert parts[-1]["done"] and parts[-1]["prompt_eval_count"] == len(tok.encode(
        tok.render_chat(ASK) + "The answer is", add_special_tokens=False))
    # where no prefill can start the reply (here a format's grammar), a finished turn, as before
    turn = [*ASK, {"role": "assistant", "content": "{"}]
    r = call(app, "POST", "/api/chat", {"model": "tiny", "format": "json", "stream": False, "messages": turn})
    assert r.status_code == 200 and r.json()["prompt_eval_count"] == len(tok.encode(
        tok.render_chat(turn), add_special_tokens=False))
    only = call(app, "POST", "/api/chat", {"model": "tiny", "stream": False, "messages": turn[1:]})
    assert only.json()["prompt_eval_count"] == len(tok.encode(tok.render_chat(turn[1:]), add_special_tokens=False))


def test_unload_raw_system_and_app_origins(scripted_dir: str) -> None:
    app = app_for(scripted_dir, ANSWER)
    for zero in (0, "0", "0m", "0.0s"):
        r = call(app, "POST", "/api/generate", {"model": "tiny", "keep_alive": zero}).json()
        assert r["done_reason"] == "unload" and r["model"] == "tiny"       # the name as sent
    assert call(app, "POST", "/api/generate", {"model": "tiny", "keep_alive": "5m"}).json()["done_reason"] == "load"
    r = call(app, "POST", "/api/generate", {"model": "tiny", "prompt": "hi", "raw": True, "system": "x"})
    assert r.status_code == 400 and r.json()["error"].startswith("system:")

    async def tags(origin: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as h:
            return await h.get("/api/tags", headers={"Origin": origin})
    for origin in ("app://obsidian.md", "vscode-webview://abc", "http://localhost:3000"):
        r = asyncio.run(tags(origin))
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    assert asyncio.run(tags("https://evil.example")).status_code == 403


def test_a_model_pulled_as_name_latest_answers_to_both_names(scripted_dir: str) -> None:
    """Ollama's names without a tag mean ':latest': `moeserve serve --model glm-4.7-flash` serves
    'glm-4.7-flash:latest', which clients of both APIs ask for either way."""
    app = app_for(scripted_dir, ANSWER)
    app.state.moeserve.model_name = "glm-4.7-flash:latest"
    for path, name in [("/v1/chat/completions", "glm-4.7-flash"), ("/v1/chat/completions", "glm-4.7-flash:latest"),
                       ("/api/chat", "glm-4.7-flash"), ("/api/chat", "glm-4.7-flash:latest")]:
        r = call(app, "POST", path, {"model": name, "messages": [{"role": "user", "content": "hi"}], "stream": False})
        assert r.status_code == 200, (path, name, r.text)
    for path in ("/v1/chat/completions", "/api/chat"):
        r = call(app, "POST", path, {"model": "glm-4.7-flash:q8", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404, r.text
