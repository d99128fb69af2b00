"""gpt-oss's harmony format through the server: a real `moeserve serve` on a tiny model whose
tokenizer has harmony's tags and whose chat template writes harmony (forced calls follow the
harmony grammar, reasoning_effort reaches the template, bare replies stay content), and the HTTP
app answering with scripted harmony replies (reasoning, preamble, calls; streamed and not; each
--reasoning-parser / --tool-parser choice)."""
from __future__ import annotations

import asyncio
import json
import shutil
from typing import Any, AsyncIterator, Iterator

import httpx
import jsonschema
import pytest

from configs import ServerConfig
from engine.client import EngineClient
from engine.protocol import (FINISH_LENGTH, FINISH_STOP, EngineStats, GenerateRequest, ModelInfo,
                             TokenDelta)
from server.app import create_app
from server.tokenizer import HARMONY_TAGS, TextTokenizer
from tests.server.conftest import ServerProcess
from tests.server.harmony_model import make_harmony_model
from tests.server.test_tools import ASK, SCHEMAS, TOOLS


@pytest.fixture(scope="module")
def harmony_dir(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_harmony_model(str(tmp_path_factory.mktemp("harmony") / "model"), tiny_model_dir)


@pytest.fixture(scope="module")
def server(harmony_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(harmony_dir, str(tmp_path_factory.mktemp("harmony-log") / "server.log"),
                        extra=("--context-length", "1024"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


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
    bad = post(server, reasoning_effort="extreme")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "reasoning_effort"
    assert "'low', 'medium' or 'high'" in bad.json()["error"]["message"]


# --- scripted replies through the HTTP app ------------------------------------------------------

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


def scripted(model_dir: str, reply: str, body: dict[str, Any], stream: bool,
             **cfg: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the JSON response, or for a stream the chunks) of the app answering ``reply``."""
    tok = TextTokenizer(model_dir)
    info = ModelInfo("tiny", model_dir, "mixtral", 1024, tok.vocab_size + 1, ())
    app = create_app(ServerConfig(**cfg), ScriptedClient(info, tok.encode(reply, add_special_tokens=False)),
                     tok, "tiny")

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as http:
            return await http.post("/v1/chat/completions", json={"messages": ASK, "stream": stream, **body})
    r = asyncio.run(go())
    assert r.status_code == 200, r.text
    if not stream:
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


@pytest.fixture(scope="module")
def scripted_dir(harmony_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("harmony-tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{harmony_dir}/{name}", path / name)
    return str(path)


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
