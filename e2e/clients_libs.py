"""LangChain's ChatOpenAI, LiteLLM and the `llm` CLI against moeserve, as their users call them."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Callable, Optional

from client_kit import (ASK_WEATHER, MAX_TOKENS, PERSON_SCHEMA, TOOL_MAX_TOKENS, WEATHER_TOOL, Run,
                        check_person, check_weather_args, expect)


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
