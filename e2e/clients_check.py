"""Third-party clients against a running moeserve, used as their users use them.

    python e2e/clients_check.py --base-url http://127.0.0.1:8000/v1
    python e2e/clients_check.py --start            # starts `moeserve serve` itself, stops it after

Run it with a Python that has the clients installed (`make clients-check` makes one:
.venv-clients, from e2e/requirements-clients.txt), never the project's venv: the OpenAI Python
SDK, LangChain's ChatOpenAI, LiteLLM, Simon Willison's `llm` CLI (an OpenAI-compatible model in
its extra-openai-models.yaml, in a private config folder) and, when `node` and the `openai` npm
package are found (--node-modules), the OpenAI Node SDK (e2e/clients_node.cjs).

Each check passes when the client gets through without an error and its answer has the shape the
client promises (text, a tool call with JSON arguments that follow the schema, a parsed object).
What a 135M model writes inside that shape is not judged: with tool_choice auto it may answer in
text instead of calling the tool, and that passes (the check records which it did).

Writes bench/results/clients_check.json (client versions, each check: pass/fail, seconds, error)
and prints a table. Exit status 1 when a check failed.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results", "clients_check.json")
LOGS = os.path.join(REPO, "bench", "results", "clients_check-logs")
MAX_TOKENS = 48          # small on purpose: this is a protocol check on a shared CPU machine
TOOL_MAX_TOKENS = 64

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "description": "the city", "maxLength": 20},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": WEATHER_SCHEMA}}
ASK_WEATHER = "What is the weather in Paris? Use the get_weather tool."
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20},
                   "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"], "additionalProperties": False}


@dataclass
class Check:
    client: str
    check: str
    ok: bool
    seconds: float
    error: Optional[str] = None
    detail: Optional[str] = None


@dataclass
class Run:
    base_url: str
    model: str
    checks: list[Check] = field(default_factory=list)

    def record(self, client: str, name: str, fn: Callable[[], Optional[str]]) -> None:
        t = time.perf_counter()
        try:
            detail = fn()
            c = Check(client, name, True, 0.0, detail=_short(detail))
        except Exception as exc:   # a failing client is data, not a crash of the check
            tb = traceback.extract_tb(exc.__traceback__)
            where = next((f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(tb)
                          if f.filename == __file__), "")
            c = Check(client, name, False, 0.0, error=_short(f"{type(exc).__name__}: {exc}"
                                                             + (f" [{where}]" if where else ""),
                                                             600))
        c.seconds = round(time.perf_counter() - t, 2)
        self.checks.append(c)
        mark = "ok  " if c.ok else "FAIL"
        print(f"  {mark} {client:10s} {name:28s} {c.seconds:6.1f}s  {c.error or c.detail or ''}",
              flush=True)


def _short(text: Optional[str], n: int = 160) -> Optional[str]:
    if text is None:
        return None
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 3] + "..."


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


def check_weather_args(arguments: Any) -> dict[str, Any]:
    """Tool arguments (JSON text or a dict) that follow WEATHER_SCHEMA."""
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    expect(isinstance(args, dict), f"arguments are not an object: {arguments!r}")
    expect(isinstance(args.get("city"), str) and args.get("unit") in ("celsius", "fahrenheit")
           and set(args) == {"city", "unit"}, f"arguments do not follow the schema: {args!r}")
    return args


def check_person(obj: Any) -> dict[str, Any]:
    d = obj if isinstance(obj, dict) else obj.model_dump()
    expect(isinstance(d.get("name"), str) and isinstance(d.get("age"), int)
           and set(d) == {"name", "age"}, f"not a person: {d!r}")
    return d


# ---------------------------------------------------------------- OpenAI Python SDK

def openai_checks(run: Run) -> None:
    import openai
    from pydantic import BaseModel, ConfigDict, Field

    client = openai.OpenAI(base_url=run.base_url, api_key="unused", max_retries=0, timeout=300)
    m = run.model
    ask = [{"role": "user", "content": "What is the capital of France?"}]

    def chat() -> str:
        r = client.chat.completions.create(model=m, messages=ask, max_tokens=MAX_TOKENS,
                                           temperature=0)
        c = r.choices[0]
        expect(isinstance(c.message.content, str) and c.message.content.strip() != "",
               "empty content")
        expect(c.finish_reason in ("stop", "length"), f"finish_reason {c.finish_reason}")
        expect(r.usage is not None and r.usage.completion_tokens > 0, "no usage")
        return c.message.content

    def stream() -> str:
        text, finish, usage = "", None, None
        with client.chat.completions.create(model=m, messages=ask, max_tokens=MAX_TOKENS,
                                            stream=True,
                                            stream_options={"include_usage": True}) as s:
            for chunk in s:
                if chunk.usage:
                    usage = chunk.usage
                for ch in chunk.choices:
                    text += ch.delta.content or ""
                    finish = ch.finish_reason or finish
        expect(text.strip() != "", "no streamed text")
        expect(finish in ("stop", "length"), f"finish_reason {finish}")
        expect(usage is not None, "no usage chunk with include_usage")
        return text

    def tool_call(parallel: Optional[bool]) -> Callable[[], str]:
        # with parallel calls allowed (the default) the 135M model often goes on calling for
        # other cities until max_tokens: finish_reason 'length', the first calls whole
        def go() -> str:
            extra = {} if parallel is None else {"parallel_tool_calls": parallel}
            r = client.chat.completions.create(
                model=m, messages=[{"role": "user", "content": ASK_WEATHER}],
                tools=[WEATHER_TOOL], tool_choice="required", max_tokens=TOOL_MAX_TOKENS,
                **extra)
            c = r.choices[0]
            calls = c.message.tool_calls or []
            expect(len(calls) >= 1 and calls[0].function.name == "get_weather", f"calls {calls}")
            args = check_weather_args(calls[0].function.arguments)
            if parallel is False:
                expect(len(calls) == 1, f"{len(calls)} calls without parallel_tool_calls")
            expect(c.finish_reason == "tool_calls" or (c.finish_reason == "length"
                                                       and len(calls) > 1),
                   f"finish_reason {c.finish_reason} with {len(calls)} call(s)")
            for call in calls[1:-1] if c.finish_reason == "length" else calls[1:]:
                check_weather_args(call.function.arguments)   # all but a cut last one
            return f"{len(calls)} call(s), finish {c.finish_reason}: get_weather({args})"
        return go

    def tool_auto() -> str:
        r = client.chat.completions.create(model=m, messages=[{"role": "user",
                                                               "content": ASK_WEATHER}],
                                           tools=[WEATHER_TOOL], max_tokens=TOOL_MAX_TOKENS)
        c = r.choices[0]
        if c.message.tool_calls:
            expect(c.finish_reason == "tool_calls", f"finish_reason {c.finish_reason}")
            json.loads(c.message.tool_calls[0].function.arguments)
            return f"called {c.message.tool_calls[0].function.name}"
        expect(isinstance(c.message.content, str), "neither content nor tool_calls")
        return "answered in text: " + c.message.content

    def tool_roundtrip() -> str:
        # the way the SDK's docs do it: the assistant message object goes back into the history
        messages: list[Any] = [{"role": "user", "content": ASK_WEATHER}]
        r = client.chat.completions.create(model=m, messages=messages, tools=[WEATHER_TOOL],
                                           tool_choice="required", max_tokens=TOOL_MAX_TOKENS)
        msg = r.choices[0].message
        expect(bool(msg.tool_calls), "no tool call to answer")
        messages.append(msg)
        for call in msg.tool_calls or []:
            messages.append({"role": "tool", "tool_call_id": call.id,
                             "content": json.dumps({"temperature": 21, "sky": "sunny"})})
        r2 = client.chat.completions.create(model=m, messages=messages, tools=[WEATHER_TOOL],
                                            max_tokens=MAX_TOKENS, temperature=0)
        c = r2.choices[0]
        expect(c.message.content is not None or bool(c.message.tool_calls),
               "empty second turn")
        return "reply: " + (c.message.content or f"tool_calls {c.message.tool_calls}")

    def stream_tool() -> str:
        calls: dict[int, dict[str, str]] = {}
        finish = None
        stream = client.chat.completions.create(
            model=m, messages=[{"role": "user", "content": ASK_WEATHER}], tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=TOOL_MAX_TOKENS, stream=True)
        for chunk in stream:
            for ch in chunk.choices:
                finish = ch.finish_reason or finish
                for tc in ch.delta.tool_calls or []:
                    slot = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                    slot["id"] += tc.id or ""
                    if tc.function:
                        slot["name"] += tc.function.name or ""
                        slot["arguments"] += tc.function.arguments or ""
        expect(finish == "tool_calls", f"finish_reason {finish}")
        expect(list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"],
               f"calls {calls}")
        return f"get_weather({check_weather_args(calls[0]['arguments'])})"

    class Person(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str = Field(max_length=20)
        age: int = Field(ge=0, le=120)

    def parse_with(fn: Callable[..., Any]) -> str:
        r = fn(model=m, max_tokens=MAX_TOKENS, response_format=Person,
               messages=[{"role": "user", "content": "Invent a person: a name and an age."}])
        c = r.choices[0]
        expect(c.finish_reason == "stop", f"finish_reason {c.finish_reason} "
                                          f"(content {c.message.content!r})")
        expect(isinstance(c.message.parsed, Person), f"parsed is {c.message.parsed!r}")
        return repr(c.message.parsed)

    class GetWeather(BaseModel):
        """Current weather in a city"""
        city: str = Field(max_length=20)
        unit: str = Field(pattern="^(celsius|fahrenheit)$")

    def parse_tool() -> str:
        # pydantic_function_tool sends "strict": true; parse() reads parsed_arguments back.
        # parallel_tool_calls=False as OpenAI's docs ask with strict tools (parse() raises on
        # finish_reason 'length', which parallel calls on this model reach)
        r = client.chat.completions.parse(
            model=m, messages=[{"role": "user", "content": ASK_WEATHER}],
            tools=[openai.pydantic_function_tool(GetWeather, name="get_weather")],
            tool_choice="required", parallel_tool_calls=False, max_tokens=TOOL_MAX_TOKENS)
        calls = r.choices[0].message.tool_calls or []
        expect(bool(calls), "no tool call")
        expect(isinstance(calls[0].function.parsed_arguments, GetWeather),
               f"parsed_arguments {calls[0].function.parsed_arguments!r}")
        return repr(calls[0].function.parsed_arguments)

    run.record("openai-py", "chat", chat)
    run.record("openai-py", "stream (include_usage)", stream)
    run.record("openai-py", "tool call (required)", tool_call(None))
    run.record("openai-py", "required, parallel off", tool_call(False))
    run.record("openai-py", "tool call (auto)", tool_auto)
    run.record("openai-py", "tool result round trip", tool_roundtrip)
    run.record("openai-py", "streamed named tool call", stream_tool)
    beta = getattr(getattr(getattr(client, "beta", None), "chat", None), "completions", None)
    if beta is not None and hasattr(beta, "parse"):
        run.record("openai-py", "beta.chat.completions.parse", lambda: parse_with(beta.parse))
    if hasattr(client.chat.completions, "parse"):
        run.record("openai-py", "chat.completions.parse",
                   lambda: parse_with(client.chat.completions.parse))
        run.record("openai-py", "parse + pydantic_function_tool", parse_tool)


# ---------------------------------------------------------------- LangChain

def langchain_checks(run: Run) -> None:
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    llm = ChatOpenAI(base_url=run.base_url, api_key="unused", model=run.model,
                     max_tokens=MAX_TOKENS, max_retries=0, timeout=300)

    @tool
    def get_weather(city: str, unit: str) -> str:
        """Current weather in a city; unit is celsius or fahrenheit."""
        return f"21 degrees {unit} in {city}"

    def invoke() -> str:
        r = llm.invoke("What is the capital of France?")
        expect(isinstance(r, AIMessage) and isinstance(r.content, str) and r.content.strip(),
               f"no content: {r!r}")
        return r.content

    def stream() -> str:
        parts = [c.content for c in llm.stream("Name three rivers in Europe.")]
        expect(len(parts) > 1 and "".join(parts).strip(), f"chunks {parts!r}")
        return f"{len(parts)} chunks: " + "".join(parts)

    def bind_tools_auto() -> str:
        r = llm.bind_tools([get_weather]).invoke(ASK_WEATHER)
        expect(isinstance(r, AIMessage), f"got {r!r}")
        if r.tool_calls:
            expect(r.tool_calls[0]["name"] == "get_weather", f"calls {r.tool_calls}")
            return f"called {r.tool_calls[0]}"
        expect(isinstance(r.content, str), f"got {r!r}")
        return "answered in text: " + r.content

    def bind_tools_choice(choice: Any, strict: Optional[bool]) -> Callable[[], str]:
        # @tool's schema allows extra properties; without strict the 135M model, forced to
        # call, can go on inventing properties until max_tokens (an invalid_tool_call)
        def go() -> str:
            kw = {} if strict is None else {"strict": strict}
            r = llm.bind_tools([get_weather], tool_choice=choice, **kw).invoke(ASK_WEATHER)
            expect(bool(r.tool_calls) and r.tool_calls[0]["name"] == "get_weather",
                   f"no get_weather call: tool_calls={r.tool_calls} "
                   f"invalid={getattr(r, 'invalid_tool_calls', None)} content={r.content!r}")
            args = r.tool_calls[0]["args"]   # @tool's schema allows extra properties
            expect(isinstance(args.get("city"), str) and isinstance(args.get("unit"), str),
                   f"args {args}")
            return f"{r.tool_calls[0]['name']}({r.tool_calls[0]['args']})"
        return go

    def tool_roundtrip() -> str:
        bound = llm.bind_tools([get_weather], tool_choice="get_weather", strict=True)
        msgs: list[Any] = [HumanMessage(ASK_WEATHER)]
        ai = bound.invoke(msgs)
        expect(bool(ai.tool_calls), "no tool call")
        msgs.append(ai)
        for tc in ai.tool_calls:
            msgs.append(ToolMessage(get_weather.invoke(tc["args"]), tool_call_id=tc["id"]))
        r = llm.bind_tools([get_weather]).invoke(msgs)
        expect(isinstance(r, AIMessage), f"got {r!r}")
        return "reply: " + (r.content if isinstance(r.content, str) else repr(r.content))

    class Person(BaseModel):
        """A person."""
        name: str = Field(description="first name", max_length=20)
        age: int = Field(description="age in years", ge=0, le=120)

    def structured(method: Optional[str]) -> Callable[[], str]:
        def go() -> str:
            kw = {} if method is None else {"method": method}
            s = llm.with_structured_output(Person, **kw)
            r = s.invoke("Invent a person: a name and an age.")
            expect(isinstance(r, Person), f"got {r!r}")
            return repr(r)
        return go

    run.record("langchain", "invoke", invoke)
    run.record("langchain", "stream", stream)
    run.record("langchain", "bind_tools", bind_tools_auto)
    run.record("langchain", "bind_tools tool_choice=name", bind_tools_choice("get_weather", True))
    run.record("langchain", "bind_tools tool_choice=any", bind_tools_choice("any", True))
    run.record("langchain", "tool result round trip", tool_roundtrip)
    run.record("langchain", "with_structured_output", structured(None))
    run.record("langchain", "structured function_calling", structured("function_calling"))
    # not method="json_mode": it enforces a JSON object, not the schema, and what the 135M model
    # puts in it is its own business (it wrapped the fields in another object: README)


# ---------------------------------------------------------------- LiteLLM

def litellm_checks(run: Run) -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")   # no fetch of the cost map
    import litellm
    from pydantic import BaseModel, Field

    litellm.telemetry = False
    kw = dict(model="openai/" + run.model, api_base=run.base_url, api_key="unused",
              max_tokens=MAX_TOKENS, timeout=300, num_retries=0)
    ask = [{"role": "user", "content": "What is the capital of France?"}]

    def completion() -> str:
        r = litellm.completion(messages=ask, temperature=0, **kw)
        text = r.choices[0].message.content
        expect(isinstance(text, str) and text.strip(), f"content {text!r}")
        expect(r.usage.completion_tokens > 0, "no usage")
        return text

    def stream() -> str:
        chunks = list(litellm.completion(messages=ask, stream=True, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        expect(text.strip() != "", "no streamed text")
        rebuilt = litellm.stream_chunk_builder(chunks, messages=ask)
        expect(rebuilt.choices[0].message.content == text, "stream_chunk_builder differs")
        return text

    def tools() -> str:
        r = litellm.completion(messages=[{"role": "user", "content": ASK_WEATHER}],
                               tools=[WEATHER_TOOL], tool_choice="required",
                               parallel_tool_calls=False,   # one call (see openai-py's check)
                               **{**kw, "max_tokens": TOOL_MAX_TOKENS})
        calls = r.choices[0].message.tool_calls or []
        expect(len(calls) == 1 and calls[0].function.name == "get_weather", f"calls {calls}")
        expect(r.choices[0].finish_reason == "tool_calls", f"finish {r.choices[0].finish_reason}")
        return f"get_weather({check_weather_args(calls[0].function.arguments)})"

    def stream_tools() -> str:
        chunks = list(litellm.completion(
            messages=[{"role": "user", "content": ASK_WEATHER}], tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True,
            **{**kw, "max_tokens": TOOL_MAX_TOKENS}))
        msg = litellm.stream_chunk_builder(chunks).choices[0].message
        expect(bool(msg.tool_calls), f"no tool call in {msg}")
        return f"get_weather({check_weather_args(msg.tool_calls[0].function.arguments)})"

    class Person(BaseModel):
        name: str = Field(max_length=20)
        age: int = Field(ge=0, le=120)

    def response_format_schema() -> str:
        r = litellm.completion(messages=[{"role": "user", "content": "Invent a person."}],
                               response_format={"type": "json_schema", "json_schema": {
                                   "name": "person", "schema": PERSON_SCHEMA, "strict": True}},
                               **kw)
        return repr(check_person(json.loads(r.choices[0].message.content)))

    def response_format_pydantic() -> str:
        r = litellm.completion(messages=[{"role": "user", "content": "Invent a person."}],
                               response_format=Person, **kw)
        return repr(Person.model_validate_json(r.choices[0].message.content))

    def json_object() -> str:
        r = litellm.completion(messages=[{"role": "user", "content":
                                          "Give a JSON object with a key 'city'."}],
                               response_format={"type": "json_object"}, **kw)
        text = r.choices[0].message.content
        if r.choices[0].finish_reason == "stop":
            expect(isinstance(json.loads(text), dict), f"not an object: {text!r}")
        return text

    run.record("litellm", "completion", completion)
    run.record("litellm", "stream", stream)
    run.record("litellm", "tools (required, parallel off)", tools)
    run.record("litellm", "streamed named tool call", stream_tools)
    run.record("litellm", "response_format json_schema", response_format_schema)
    run.record("litellm", "response_format pydantic", response_format_pydantic)
    run.record("litellm", "response_format json_object", json_object)


# ---------------------------------------------------------------- llm CLI

def llm_checks(run: Run) -> None:
    exe = shutil.which("llm", path=os.path.dirname(sys.executable)) or shutil.which("llm")
    if exe is None:
        run.record("llm", "installed", lambda: (_ for _ in ()).throw(
            RuntimeError("no `llm` executable beside this python or on PATH")))
        return
    home = tempfile.mkdtemp(prefix="moeserve-llm-")
    with open(os.path.join(home, "extra-openai-models.yaml"), "w") as f:
        f.write(f"""- model_id: moeserve
  model_name: {run.model}
  api_base: "{run.base_url}"
  supports_tools: true
  supports_schema: true
""")
    env = {**os.environ, "LLM_USER_PATH": home}

    def llm(*args: str, stdin: Optional[str] = None) -> str:
        p = subprocess.run([exe, *args], input=stdin, capture_output=True, text=True, env=env,
                           timeout=600)
        expect(p.returncode == 0, f"`llm {' '.join(args)}` exited {p.returncode}: "
                                  f"{(p.stderr or p.stdout).strip()[-400:]}")
        return p.stdout

    def models() -> str:
        out = llm("models", "list")
        expect("moeserve" in out, f"moeserve not listed: {out[-300:]}")
        return "listed"

    def prompt() -> str:
        out = llm("-m", "moeserve", "-o", "max_tokens", str(MAX_TOKENS),
                  "What is the capital of France?")
        expect(out.strip() != "", "no output")
        return out

    def prompt_defaults() -> str:
        # as a user types it: no options at all (the server's defaults bound the reply)
        out = llm("-m", "moeserve", "Say hello.")
        expect(out.strip() != "", "no output")
        return out

    def chat() -> str:
        out = llm("chat", "-m", "moeserve", "-o", "max_tokens", str(MAX_TOKENS),
                  stdin="Hello, who are you?\nWhat is 2+2?\nquit\n")
        expect(out.count("> ") >= 2, f"fewer than two turns: {out[-300:]!r}")
        logs = json.loads(llm("logs", "-n", "2", "--json"))
        expect(len(logs) == 2 and all(e.get("response") for e in logs) and
               logs[0]["conversation_id"] == logs[1]["conversation_id"],
               f"chat turns not logged as one conversation: {logs!r}"[:300])
        return "two turns: " + " | ".join(e["response"] for e in logs)

    def schema() -> str:
        out = llm("-m", "moeserve", "-o", "max_tokens", str(MAX_TOKENS), "--schema",
                  "name, age int", "Invent a person.")
        d = json.loads(out)
        expect(isinstance(d.get("name"), str) and isinstance(d.get("age"), int), f"got {d!r}")
        return out

    def tool() -> str:
        # a Python function as a tool (llm >= 0.26): llm runs it and sends the result back
        fn = "def get_weather(city: str) -> str:\n    'Current weather in a city'\n" \
             "    return f'21 degrees in {city}'\n"
        out = llm("-m", "moeserve", "-o", "max_tokens", str(TOOL_MAX_TOKENS), "--functions", fn,
                  "--td", ASK_WEATHER)
        # llm has no tool_choice: the model may answer in text; the log says what was sent
        first = json.loads(llm("logs", "-n", "2", "--json"))
        sent = any(t.get("name") == "get_weather" for e in first for t in e.get("tools") or [])
        expect(sent, "the tool was not sent")
        called = any(e.get("tool_calls") for e in first)
        return ("called get_weather: " if called else "tool sent, answered in text: ") + out

    run.record("llm", "models list", models)
    run.record("llm", "prompt", prompt)
    run.record("llm", "prompt, no options", prompt_defaults)
    run.record("llm", "chat (stdin)", chat)
    run.record("llm", "--schema", schema)
    run.record("llm", "--functions (tool)", tool)
    shutil.rmtree(home, ignore_errors=True)


# ---------------------------------------------------------------- OpenAI Node SDK

def node_checks(run: Run, node_modules: Optional[str]) -> Optional[str]:
    node = shutil.which("node")
    script = os.path.join(REPO, "e2e", "clients_node.cjs")
    if node is None or not node_modules or not os.path.isdir(os.path.join(node_modules, "openai")):
        run.record("openai-node", "installed", lambda: (_ for _ in ()).throw(RuntimeError(
            f"node={node} node_modules={node_modules}: need node and the openai npm package")))
        return None
    env = {**os.environ, "NODE_PATH": node_modules}
    p = subprocess.Popen([node, script, run.base_url, run.model], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    assert p.stdout is not None
    for line in p.stdout:   # one JSON object per check, as each ends
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        c = Check("openai-node", d["check"], d["ok"], d["seconds"], _short(d.get("error"), 600),
                  _short(d.get("detail")))
        run.checks.append(c)
        print(f"  {'ok  ' if c.ok else 'FAIL'} {c.client:10s} {c.check:28s} {c.seconds:6.1f}s  "
              f"{c.error or c.detail or ''}", flush=True)
    err = p.stderr.read() if p.stderr else ""
    if p.wait() != 0 and not any(c.client == "openai-node" for c in run.checks):
        run.checks.append(Check("openai-node", "script", False, 0.0, _short(err, 600)))
    with open(os.path.join(node_modules, "openai", "package.json")) as f:
        return json.load(f)["version"]


# ---------------------------------------------------------------- the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def started_server(python: str, port: int, extra: list[str]) -> Iterator[str]:
    """`moeserve serve` (the built-in default model unless --model comes in extra), niced."""
    os.makedirs(LOGS, exist_ok=True)
    log_path = os.path.join(LOGS, "server.log")
    log = open(log_path, "w")
    cmd = ["nice", "-n", "10", python, "-m", "moeserve.cli", "serve", "--port", str(port), *extra]
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 1800   # a first start builds the default model
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}; see {log_path}")
            try:
                if get_json(base + "/health").get("status") == "ok":
                    break
            except OSError:
                pass
            if time.monotonic() > end:
                raise RuntimeError(f"the server was not ready in time; see {log_path}")
            time.sleep(1)
        print(f"server ready on {base} (log: {os.path.relpath(log_path, REPO)})", flush=True)
        yield base + "/v1"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("openai", "langchain-openai", "langchain-core", "litellm", "llm", "pydantic"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    node = shutil.which("node")
    if node:
        out["node"] = subprocess.run([node, "--version"], capture_output=True,
                                     text=True).stdout.strip()
    return out


SUITES = {"openai": openai_checks, "langchain": langchain_checks, "litellm": litellm_checks,
          "llm": llm_checks}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                       help="a running moeserve's /v1 URL (default %(default)s)")
    where.add_argument("--start", action="store_true",
                       help="start `moeserve serve` on a free port, stop it afterwards")
    ap.add_argument("--server-python", default=os.path.join(REPO, ".venv", "bin", "python"),
                    help="python with moeserve installed, for --start (default %(default)s)")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra flag for `moeserve serve` with --start (repeatable)")
    ap.add_argument("--node-modules", default=os.environ.get("MOESERVE_CLIENTS_NODE_MODULES"),
                    help="node_modules folder holding the openai npm package")
    ap.add_argument("--only", action="append", choices=[*SUITES, "node"],
                    help="run only these clients (repeatable)")
    ap.add_argument("--out", default=RESULTS, help="JSON results (default %(default)s)")
    args = ap.parse_args(argv)

    with contextlib.ExitStack() as stack:
        base = (stack.enter_context(started_server(args.server_python, free_port(),
                                                   args.server_arg))
                if args.start else args.base_url.rstrip("/"))
        model = get_json(base + "/models")["data"][0]["id"]
        run = Run(base, model)
        vers = versions()
        print(f"moeserve at {base}, model {model}; clients: "
              + ", ".join(f"{k} {v}" for k, v in vers.items()), flush=True)
        t0 = time.perf_counter()
        for name, suite in SUITES.items():
            if args.only and name not in args.only:
                continue
            try:
                suite(run)
            except Exception as exc:   # an import error: the whole client fails, the rest runs
                run.checks.append(Check(name, "import", False, 0.0,
                                        _short(f"{type(exc).__name__}: {exc}", 600)))
                print(f"  FAIL {name}: {exc}", flush=True)
        if not args.only or "node" in args.only:
            vers["openai (npm)"] = node_checks(run, args.node_modules) or "not installed"
        total = time.perf_counter() - t0

    failed = [c for c in run.checks if not c.ok]
    report = {"base_url": run.base_url if not args.start else "started by --start",
              "model": run.model, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "seconds": round(total, 1), "versions": vers,
              "passed": len(run.checks) - len(failed), "failed": len(failed),
              "checks": [asdict(c) for c in run.checks]}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print()
    print(table(run.checks, vers))
    print(f"\n{report['passed']}/{len(run.checks)} passed in {total:.0f}s; wrote "
          f"{os.path.relpath(args.out, REPO)}")
    return 1 if failed else 0


def table(checks: list[Check], vers: dict[str, str]) -> str:
    ver_of = {"openai-py": vers.get("openai"), "langchain": vers.get("langchain-openai"),
              "litellm": vers.get("litellm"), "llm": vers.get("llm"),
              "openai-node": vers.get("openai (npm)")}
    rows = [("client", "check", "result", "s", "error")]
    for c in checks:
        rows.append((f"{c.client} {ver_of.get(c.client) or ''}".strip(), c.check,
                     "pass" if c.ok else "FAIL", f"{c.seconds:.1f}", _short(c.error, 90) or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
        if k == 0:
            lines.append("  ".join("-" * w for w in widths) + "  -----")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
