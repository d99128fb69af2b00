"""gpt-oss's harmony format through the server: a real `moeserve serve` on a tiny model whose
tokenizer has harmony's tags and whose chat template writes harmony (forced calls and
response_format follow harmony grammars, reasoning_effort reaches the template, bare replies stay
content); test_harmony_scripted.py has the HTTP app answering scripted replies."""
from __future__ import annotations

import json
from typing import Any, Iterator

import httpx
import jsonschema
import pytest

from server.tokenizer import TextTokenizer
from tests.server.conftest import ServerProcess
from tests.server.test_tools import ASK, SCHEMAS, TOOLS


@pytest.fixture(scope="module")
def server(harmony_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(harmony_dir, str(tmp_path_factory.mktemp("harmony-log") / "server.log"),
                       extra=("--context-length", "1024")) as srv:
        yield srv


def post(srv: ServerProcess, **body: Any) -> httpx.Response:
    return httpx.post(srv.base + "/v1/chat/completions", json={"messages": ASK, **body}, timeout=120)


def events(srv: ServerProcess, **body: Any) -> list[dict[str, Any]]:
    with httpx.stream("POST", srv.base + "/v1/chat/completions", timeout=120,
                      json={"messages": ASK, "stream": True, **body}) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_forced_calls_write_harmony_with_reasoning_first(server: ServerProcess, harmony_dir: str) -> None:
    tok = TextTokenizer(harmony_dir)
    end, analysis = tok.encode("<|end|>", add_special_tokens=False), tok.encode("analysis", add_special_tokens=False)
    assert len(end) == len(analysis) == 1
    # biased so that the random model picks the analysis channel and closes it at once
    bias = {str(end[0]): 100, str(analysis[0]): 100}
    r = post(server, tools=TOOLS, tool_choice="required", seed=1, max_tokens=150, logprobs=True, logit_bias=bias)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    written = "".join(t["token"] for t in choice["logprobs"]["content"])       # the model's own text
    assert written.startswith("<|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>"
                              "commentary to=functions.get_") and written.endswith("<|call|>"), written
    assert choice["finish_reason"] == "tool_calls"
    msg = choice["message"]
    assert msg["content"] is None and msg["reasoning_content"] == ""
    (call,) = msg["tool_calls"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
    # streamed and named: the call in OpenAI's deltas, each token's logprobs on its chunk
    chunks = events(server, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
                    seed=2, max_tokens=150, logprobs=True, logit_bias=bias,
                    stream_options={"include_usage": True})
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    parts = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert parts[0]["function"]["name"] == "get_time" and parts[0]["id"].startswith("call_")
    args = json.loads("".join(p["function"]["arguments"] for p in parts))
    jsonschema.validate(args, SCHEMAS["get_time"])
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    tokens = [t for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
              for t in c["choices"][0]["logprobs"]["content"]]
    assert len(tokens) == chunks[-1]["usage"]["completion_tokens"] and tokens[-1]["token"] == "<|call|>"
    assert not any(d.get("content") for d in deltas)


@pytest.mark.parametrize("stream", [False, True])
def test_a_reply_without_harmony_headers_is_content(server: ServerProcess, stream: bool) -> None:
    body = dict(tools=TOOLS, max_tokens=16, temperature=0, ignore_eos=True)
    full = post(server, **body).json()["choices"][0]
    assert full["finish_reason"] == "length" and full["message"]["content"]
    assert "reasoning_content" not in full["message"] and "tool_calls" not in full["message"]
    if stream:
        deltas = [c["choices"][0]["delta"] for c in events(server, **body) if c["choices"]]
        assert "".join(d.get("content") or "" for d in deltas) == full["message"]["content"]


def test_reasoning_effort_reaches_the_template(server: ServerProcess, harmony_dir: str) -> None:
    tok = TextTokenizer(harmony_dir)

    def prompt_tokens(**extra: Any) -> int:
        r = post(server, max_tokens=1, **extra)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]
    plain = len(tok.encode_chat(ASK))
    assert prompt_tokens() == plain
    assert prompt_tokens(reasoning_effort="high") == len(tok.encode_chat(ASK, {"reasoning_effort": "high"})) > plain
    # chat_template_kwargs sets the variable itself: it wins
    own = {"reasoning_effort": "as high as it goes, thoroughly"}
    assert prompt_tokens(reasoning_effort="low", chat_template_kwargs=own) == len(tok.encode_chat(ASK, own))
    # OpenAI's other values (the SDK's "minimal", "none") pass through as well
    for effort in ("none", "minimal"):
        assert prompt_tokens(reasoning_effort=effort) == len(tok.encode_chat(ASK, {"reasoning_effort": effort}))
    # a null in chat_template_kwargs sets nothing: the field's value stands, else the template's default
    high = len(tok.encode_chat(ASK, {"reasoning_effort": "high"}))
    assert prompt_tokens(reasoning_effort="high", chat_template_kwargs={"reasoning_effort": None}) == high
    assert prompt_tokens(chat_template_kwargs={"reasoning_effort": None}) == plain
    bad = post(server, reasoning_effort="extreme")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "reasoning_effort"
    assert "'none', 'minimal', 'low', 'medium' or 'high'" in bad.json()["error"]["message"]


def test_response_format_writes_harmony_with_reasoning_first(server: ServerProcess, harmony_dir: str) -> None:
    """The JSON comes as the final channel's message after the model's reasoning (its trained
    format, as llama.cpp's gpt-oss grammar has it); it is the content alone."""
    tok = TextTokenizer(harmony_dir)
    end, analysis = tok.encode("<|end|>", add_special_tokens=False), tok.encode("analysis", add_special_tokens=False)
    bias = {str(end[0]): 100, str(analysis[0]): 100}     # think, and stop thinking at once
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "zone": {"enum": ["UTC", "CET"]}},
              "required": ["ok", "zone"]}
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    r = post(server, response_format=rf, seed=3, max_tokens=60, logprobs=True, logit_bias=bias)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    written = "".join(t["token"] for t in choice["logprobs"]["content"])
    thought, sep, rest = written.removeprefix("<|channel|>analysis<|message|>").partition("<|end|>")
    assert written.startswith("<|channel|>analysis<|message|>") and sep, written
    assert rest.startswith("<|start|>assistant<|channel|>final"), written
    assert choice["finish_reason"] == "stop"
    msg = choice["message"]
    assert msg["reasoning_content"] == thought and "tool_calls" not in msg
    jsonschema.validate(json.loads(msg["content"]), schema)
    assert written.split("<|message|>")[-1].startswith(msg["content"])
    chunks = events(server, response_format=rf, seed=3, max_tokens=60, logit_bias=bias)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == msg["content"]


# --- scripted replies through the HTTP app ------------------------------------------------------


def test_responses_api_calls_and_takes_the_output_back(server: ServerProcess, harmony_dir: str) -> None:
    """gpt-oss through /v1/responses: a forced call is a function_call item; its output sent back
    with previous_response_id renders through the harmony template and is answered."""
    tok = TextTokenizer(harmony_dir)
    bias = {str(tok.encode(t, add_special_tokens=False)[0]): 100 for t in ("<|end|>", "analysis")}
    tools = [{"type": "function", "name": t["function"]["name"], **{
        k: v for k, v in t["function"].items() if k != "name"}} for t in TOOLS]
    r = httpx.post(server.base + "/v1/responses", timeout=120, json={
        "input": ASK[0]["content"], "tools": tools, "tool_choice": "required", "seed": 1,
        "max_output_tokens": 150, "logit_bias": bias})
    assert r.status_code == 200, r.text
    out = r.json()
    calls = [i for i in out["output"] if i["type"] == "function_call"]
    assert out["status"] == "completed" and len(calls) == 1
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMAS[calls[0]["name"]])
    follow = httpx.post(server.base + "/v1/responses", timeout=120, json={
        "previous_response_id": out["id"], "max_output_tokens": 8, "tools": tools,
        "input": [{"type": "function_call_output", "call_id": calls[0]["call_id"], "output": "21 C"}]})
    assert follow.status_code == 200, follow.text
    assert follow.json()["usage"]["input_tokens"] > out["usage"]["input_tokens"]
