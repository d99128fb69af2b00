"""The HTTP contract against a real server process (tiny model, real SmolLM2 tokenizer)."""
from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest

from server.tokenizer import TextTokenizer
from tests.server.conftest import ServerProcess

HELLO = [{"role": "user", "content": "Tell me about the sea."}]


def chat(srv: ServerProcess, **body: object) -> httpx.Response:
    body.setdefault("messages", HELLO)
    return httpx.post(srv.base + "/v1/chat/completions", json=body, headers=srv.headers, timeout=120)


def sse_events(resp: httpx.Response) -> list[object]:
    out: list[object] = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def metric(srv: ServerProcess, name: str) -> float:
    text = httpx.get(srv.base + "/metrics", headers=srv.headers, timeout=30).text
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def test_models_routes_with_and_without_v1(server: ServerProcess, tiny_model_dir: str) -> None:
    name = tiny_model_dir.rstrip("/").split("/")[-1]
    for prefix in ("/v1", ""):
        listing = httpx.get(server.base + prefix + "/models").json()
        assert listing["object"] == "list" and [m["id"] for m in listing["data"]] == [name]
        assert httpx.get(server.base + f"{prefix}/models/{name}").json()["id"] == name
    missing = httpx.get(server.base + "/v1/models/org/unknown-model")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_chat_non_streaming_usage_matches_tokenizer(server: ServerProcess, tiny_model_dir: str) -> None:
    r = chat(server, max_tokens=7, temperature=0, ignore_eos=True)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    tok = TextTokenizer(tiny_model_dir)
    want_prompt = len(tok.encode_chat(HELLO))
    details = out["usage"].pop("prompt_tokens_details")
    assert out["usage"] == {"prompt_tokens": want_prompt, "completion_tokens": 7,
                            "total_tokens": want_prompt + 7}
    assert 0 <= details["cached_tokens"] < want_prompt
    # the same prompt again: all of it but the last token is read from the slot's cache
    name = "moeserve_engine_prompt_tokens_cached_total"
    before = metric(server, name)
    again = chat(server, max_tokens=7, temperature=0, ignore_eos=True).json()
    assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": want_prompt - 1}
    assert again["choices"][0]["message"] == choice["message"]
    deadline = time.monotonic() + 30            # the engine publishes its counters as it steps
    while metric(server, name) < before + want_prompt - 1:
        assert time.monotonic() < deadline, f"{name} did not count the cached tokens"
        time.sleep(0.05)
    assert metric(server, name) == before + want_prompt - 1


def test_streaming_chat_shape_and_same_text_as_non_streaming(server: ServerProcess) -> None:
    full = chat(server, max_tokens=9, temperature=0, ignore_eos=True).json()
    body = {"messages": HELLO, "max_tokens": 9, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.base + "/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if isinstance(e, dict)]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["delta"] == {}
    assert finals[0]["choices"][0]["finish_reason"] == "length"
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == full["usage"]["completion_tokens"]
    assert usage["prompt_tokens"] == full["usage"]["prompt_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": usage["prompt_tokens"] - 1}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == full["choices"][0]["message"]["content"]


def test_completions_string_and_list_prompt(server: ServerProcess, tiny_model_dir: str) -> None:
    tok = TextTokenizer(tiny_model_dir)
    one = httpx.post(server.base + "/v1/completions", timeout=120, json={
        "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, "ignore_eos": True}).json()
    assert one["object"] == "text_completion" and len(one["choices"]) == 1
    assert one["usage"]["prompt_tokens"] == len(tok.encode("The capital of France is"))
    many = httpx.post(server.base + "/completions", timeout=120, json={
        "prompt": ["The capital of France is", "One two three"], "max_tokens": 5, "temperature": 0,
        "ignore_eos": True}).json()
    assert [c["index"] for c in many["choices"]] == [0, 1]
    assert many["choices"][0]["text"] == one["choices"][0]["text"]
    assert all(c["finish_reason"] == "length" for c in many["choices"])
    assert many["usage"]["completion_tokens"] == 10


def test_n2_seeded_sampling_is_reproducible(server: ServerProcess) -> None:
    body = dict(max_tokens=8, temperature=1.0, seed=1234, n=2, ignore_eos=True)
    a, b = chat(server, **body).json(), chat(server, **body).json()
    assert len(a["choices"]) == 2 and [c["index"] for c in a["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in a["choices"]] == [c["message"]["content"] for c in b["choices"]]
    # seed+i per choice: the two choices sample differently
    assert a["choices"][0]["message"]["content"] != a["choices"][1]["message"]["content"]
    assert a["usage"]["completion_tokens"] == 16


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_spanning_tokens_never_leaks(server: ServerProcess, stream: bool) -> None:
    base = chat(server, max_tokens=24, temperature=0, ignore_eos=True).json()
    text = base["choices"][0]["message"]["content"]
    # a stop string that starts inside one token and ends inside a later one
    start = len(text) // 3
    stop = text[start + 1:start + 9]
    assert len(stop) == 8
    cut = text.index(stop)
    body = {"messages": HELLO, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
            "stop": ["NEVER-APPEARS", stop], "stream": stream}
    if stream:
        with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, timeout=120) as r:
            chunks = [e for e in sse_events(r) if isinstance(e, dict)]
        got = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        reason = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
    else:
        out = chat(server, **body).json()
        got, reason = out["choices"][0]["message"]["content"], out["choices"][0]["finish_reason"]
    assert got == text[:cut] and reason == "stop"


def test_openai_sdk_chat_stream_and_completion(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="undefined", max_retries=0)
    model = client.models.list().data[0].id
    res = client.chat.completions.create(model=model, messages=HELLO, max_tokens=6, temperature=0)
    assert res.choices[0].message.role == "assistant" and res.usage.completion_tokens >= 1
    stream = client.chat.completions.create(model=model, messages=HELLO, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == res.choices[0].message.content and usage == res.usage
    comp = client.completions.create(model=model, prompt="Once upon a time", max_tokens=4,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 4


def test_errors_have_status_and_envelope(server: ServerProcess) -> None:
    url = server.base + "/v1/chat/completions"
    cases = [
        (httpx.post(url, content=b"{not json", headers={"Content-Type": "application/x-www-form-urlencoded"}), 400),
        (httpx.post(url, json={"messages": "hello"}), 400),
        (httpx.post(url, json={"messages": HELLO, "max_tokens": "many"}), 400),
        (httpx.post(url, json={"messages": HELLO, "model": "no-such-model"}), 404),
        (httpx.post(url, json={"messages": [{"role": "user", "content": "word " * 400}]}), 400),
        (httpx.post(url, json={"messages": HELLO, "response_format": {"type": "xml"}}), 400),
        (httpx.get(server.base + "/v1/nothing-here"), 404),
    ]
    for resp, status in cases:
        assert resp.status_code == status, resp.text
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert err["type"] == ("invalid_request_error" if status == 400 else "not_found_error")
    too_long = cases[4][0].json()["error"]["message"]
    assert "context" in too_long and "256" in too_long


def test_liberal_requests_are_accepted(server: ServerProcess) -> None:
    body = {"messages": [{"role": "system", "content": None},
                         {"role": "user", "content": [{"type": "text", "text": "Hi"}], "name": "bob"}],
            "max_tokens": None, "max_completion_tokens": 3, "user": "u", "metadata": {"a": 1},
            "store": False, "stop": ["a", "b", "c", "d", "e"], "temperature": 0}
    r = httpx.post(server.base + "/v1/chat/completions", content=json.dumps(body),
                   headers={"Content-Type": "application/x-www-form-urlencoded",
                            "Authorization": "Bearer undefined"}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 3


def test_cors_preflight(server: ServerProcess) -> None:
    r = httpx.options(server.base + "/v1/chat/completions", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os"})
    assert r.status_code == 200
    allowed = r.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "x-stainless-os" in allowed


def test_disconnect_mid_stream_aborts_in_engine(server: ServerProcess) -> None:
    before = metric(server, "moeserve_engine_requests_aborted_total")
    body = {"messages": HELLO, "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, timeout=120) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                break   # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 30
    while metric(server, "moeserve_engine_requests_aborted_total") < before + 1:
        assert time.monotonic() < deadline, "the disconnect did not abort the engine request"
        time.sleep(0.1)
    assert metric(server, "moeserve_requests_in_flight") == 0
