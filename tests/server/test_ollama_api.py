"""Ollama's API (/api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version) with the
ollama Python client against a real server: the same reply as chat completions, streamed as
newline-delimited JSON, raw generation, JSON formats, options, a tool result sent back by
tool_name, the model listing, and Ollama's errors."""
from __future__ import annotations

import json

import httpx
import jsonschema
import ollama
import openai
import pytest

from tests.server.conftest import ServerProcess
from tests.server.test_tools import WEATHER

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
EXACT = {"temperature": 0, "num_predict": 9}


@pytest.fixture(scope="module")
def client(srv: ServerProcess) -> ollama.Client:
    return ollama.Client(host=srv.base)


@pytest.fixture(scope="module")
def chat(srv: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def name(client: ollama.Client) -> str:
    (model,) = client.list().models
    return str(model.model)


def test_the_model_is_listed_shown_and_running(client: ollama.Client, chat: openai.OpenAI, name: str) -> None:
    served = chat.models.list().data[0].id
    assert name == served + ":latest"
    (listed,) = client.list().models
    assert listed.size > 0 and len(listed.digest) == 64 and listed.details.family == "mixtral"
    shown = client.show(name)
    assert shown.modelinfo["mixtral.context_length"] == 1024 and "tools" in shown.capabilities
    assert shown.template and "{%" in shown.template
    (running,) = client.ps().models
    assert running.model == name and running.context_length == 1024
    assert httpx.get(str(client._client.base_url) + "/api/version").json()["version"]


def test_a_reply_is_the_chat_completion(client: ollama.Client, chat: openai.OpenAI, name: str) -> None:
    r = client.chat(model=name, messages=ASK, options=EXACT, stream=False)
    c = chat.chat.completions.create(model=name.removesuffix(":latest"), messages=ASK, max_tokens=9,
                                     temperature=0, extra_body={"ignore_eos": True})
    if c.choices[0].finish_reason == "length":     # the same tokens, unless EOS came first
        assert r.done_reason == "length" and r.eval_count == 9
    assert r.message.content == c.choices[0].message.content and r.message.role == "assistant"
    assert r.done and r.prompt_eval_count <= c.usage.prompt_tokens
    assert r.total_duration >= r.prompt_eval_duration + r.eval_duration > 0


def test_the_stream_is_ndjson_ending_with_the_counts(client: ollama.Client, name: str, srv: ServerProcess) -> None:
    whole = client.chat(model=name, messages=ASK, options=EXACT)
    parts = list(client.chat(model=name, messages=ASK, options=EXACT, stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count and parts[-1].done_reason == whole.done_reason
    with httpx.stream("POST", srv.base + "/api/chat", json={"model": name, "messages": ASK,
                                                            "options": EXACT}, timeout=60) as r:
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] is True and len(lines) == len(parts)


def test_generate_templated_and_raw(client: ollama.Client, chat: openai.OpenAI, name: str) -> None:
    g = client.generate(model=name, prompt=ASK[0]["content"], system="Be brief.", options=EXACT)
    c = client.chat(model=name, options=EXACT, messages=[{"role": "system", "content": "Be brief."}, *ASK])
    assert g.response == c.message.content      # the prompt with its template, as a chat
    raw = client.generate(model=name, prompt="The sky is", raw=True, options=EXACT)
    plain = chat.completions.create(model=name.removesuffix(":latest"), prompt="The sky is",
                                    max_tokens=9, temperature=0)
    assert raw.response == plain.choices[0].text
    streamed = "".join(p.response for p in client.generate(model=name, prompt="The sky is", raw=True,
                                                           options=EXACT, stream=True))
    assert streamed == raw.response


def test_options_stop_and_seed(client: ollama.Client, name: str) -> None:
    text = client.chat(model=name, messages=ASK, options={**EXACT, "num_predict": 16}).message.content
    stop = text[6:8]
    cut = client.chat(model=name, messages=ASK, options={**EXACT, "num_predict": 16, "stop": [stop]})
    assert cut.message.content == text[:text.index(stop)] and cut.done_reason == "stop"
    sampled = [client.chat(model=name, messages=ASK, options={"seed": 7, "num_predict": 8,
                                                              "temperature": 1.0}).message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_format_schema_is_followed(client: ollama.Client, name: str) -> None:
    r = client.chat(model=name, messages=ASK, format=WEATHER, options={"num_predict": 60})
    if r.done_reason == "stop":
        jsonschema.validate(json.loads(r.message.content), WEATHER)
    r = client.chat(model=name, messages=ASK, format="json", options={"num_predict": 60})
    if r.done_reason == "stop":
        assert isinstance(json.loads(r.message.content), dict)


def test_a_tool_result_by_tool_name_is_the_chat_conversation(client: ollama.Client, chat: openai.OpenAI,
                                                            name: str) -> None:
    call = {"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "forecast",
                                               "parameters": WEATHER}}]
    messages = [*ASK, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]
    r = client.chat(model=name, messages=messages, tools=tools, options=EXACT)
    c = chat.chat.completions.create(model=name.removesuffix(":latest"), tools=tools, max_tokens=9,
                                     temperature=0, messages=[*ASK, {
                                         "role": "assistant", "content": "", "tool_calls": [{
                                             "id": "call_1_0", "type": "function", "function": {
                                                 "name": "get_weather",
                                                 "arguments": '{"city":"Paris","days":2}'}}]},
                                         {"role": "tool", "tool_call_id": "call_1_0", "content": "sunny"}])
    assert r.prompt_eval_count <= c.usage.prompt_tokens
    assert r.message.content == (c.choices[0].message.content or "")


def test_a_load_request_and_errors(client: ollama.Client, name: str, srv: ServerProcess) -> None:
    loaded = httpx.post(srv.base + "/api/chat", json={"model": name, "messages": []}, timeout=30).json()
    assert loaded["done"] is True and loaded["done_reason"] == "load"
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="llama3.2", messages=ASK)
    assert e.value.status_code == 404 and "llama3.2" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("llama3.2")
    assert e.value.status_code == 501
    for body, field in [({"messages": ASK, "options": {"temperature": "hot"}}, "options.temperature"),
                        ({"messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]},
                         "messages.0.images"),
                        ({"messages": ASK, "format": "xml"}, "format"),
                        ({"messages": ASK, "think": "hard"}, "think")]:
        r = httpx.post(srv.base + "/api/chat", json={"model": name, **body}, timeout=30)
        assert r.status_code == 400 and r.json()["error"].startswith(field), r.text
        assert list(r.json()) == ["error"]
