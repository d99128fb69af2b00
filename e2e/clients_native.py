"""The clients of the other APIs moeserve serves, as their users call them: Anthropic's Python SDK
on /v1/messages, Ollama's Python client on /api/, and LangChain's ChatAnthropic and ChatOllama."""
from __future__ import annotations

import json
from typing import Any

from client_kit import (ASK_WEATHER, MAX_TOKENS, PERSON_SCHEMA, TOOL_MAX_TOKENS, WEATHER_TOOL, Run,
                        check_person, check_weather_args, expect)

TOOL = {"name": "get_weather", "description": WEATHER_TOOL["function"]["description"],
        "input_schema": WEATHER_TOOL["function"]["parameters"]}


def server_root(run: Run) -> str:
    """The server's address without /v1 (Anthropic's SDK adds it; Ollama's paths are /api/)."""
    return run.base_url.removesuffix("/v1")


# ---------------------------------------------------------------- Anthropic Python SDK

def anthropic_checks(run: Run) -> None:
    """Anthropic's SDK on /v1/messages, as Claude Code's and agents' requests come."""
    import anthropic

    # its base URL has no /v1: the SDK adds it
    client = anthropic.Anthropic(base_url=server_root(run), api_key="unused", max_retries=0,
                                 timeout=300)
    m = run.model
    ask = [{"role": "user", "content": "What is the capital of France?"}]

    def text_of(msg: Any) -> str:
        return "".join(b.text for b in msg.content if b.type == "text")

    def create() -> str:
        r = client.messages.create(model=m, max_tokens=MAX_TOKENS, messages=ask,
                                   system="Answer in one sentence.")
        expect(r.stop_reason in ("end_turn", "max_tokens") and text_of(r).strip() != "",
               f"stop_reason {r.stop_reason}, content {r.content!r}")
        expect(r.usage.output_tokens > 0, "no usage")
        return text_of(r)

    def stream() -> str:
        with client.messages.stream(model=m, max_tokens=MAX_TOKENS, messages=ask) as s:
            text = "".join(s.text_stream)
            final = s.get_final_message()
        expect(text.strip() != "" and text == text_of(final), f"streamed {text!r}, final {final!r}")
        return text

    def tool_round_trip() -> str:
        weather = [{"role": "user", "content": ASK_WEATHER}]
        r = client.messages.create(model=m, max_tokens=TOOL_MAX_TOKENS, messages=weather,
                                   tools=[TOOL], tool_choice={"type": "any",
                                                              "disable_parallel_tool_use": True})
        uses = [b for b in r.content if b.type == "tool_use"]
        expect(r.stop_reason == "tool_use" and bool(uses), f"{r.stop_reason}: {r.content!r}")
        check_weather_args(uses[0].input)
        follow = [*weather, {"role": "assistant", "content": r.content},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                                "content": json.dumps({"temperature": 21})}]}]
        counted = client.messages.count_tokens(model=m, messages=follow, tools=[TOOL])
        answer = client.messages.create(model=m, max_tokens=MAX_TOKENS, messages=follow, tools=[TOOL])
        got = answer.usage.input_tokens + (answer.usage.cache_read_input_tokens or 0)
        expect(got == counted.input_tokens, f"count_tokens {counted.input_tokens}, used {got}")
        expect(text_of(answer).strip() != "" or any(b.type == "tool_use" for b in answer.content),
               f"empty answer {answer.content!r}")
        return f"{uses[0].input} -> {text_of(answer)}"

    def structured() -> str:
        r = client.messages.create(model=m, max_tokens=MAX_TOKENS, messages=[
            {"role": "user", "content": "Invent a person: a name and an age."}],
            output_config={"format": {"type": "json_schema", "schema": PERSON_SCHEMA}})
        person = json.loads(text_of(r))
        expect(isinstance(person, dict) and set(person) >= set(PERSON_SCHEMA["required"]),
               f"{person!r}")
        return json.dumps(person)

    run.record("anthropic-py", "messages.create", create)
    run.record("anthropic-py", "messages.stream", stream)
    run.record("anthropic-py", "tool_use + tool_result + count", tool_round_trip)
    run.record("anthropic-py", "output_config json_schema", structured)


# ---------------------------------------------------------------- Ollama Python client

def ollama_checks(run: Run) -> None:
    """Ollama's client on /api/, as the apps built on it call it."""
    import ollama

    client = ollama.Client(host=server_root(run), timeout=300)
    (listed,) = client.list().models
    name = str(listed.model)
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    opts = {"num_predict": MAX_TOKENS}

    def models() -> str:
        shown = client.show(name)
        ctx = [v for k, v in (shown.modelinfo or {}).items() if k.endswith(".context_length")]
        expect(bool(ctx) and "tools" in (shown.capabilities or []), f"show: {shown!r}")
        expect(any(m.model == name for m in client.ps().models), "not in ps")
        return f"{name}, context {ctx[0]}, capabilities {shown.capabilities}"

    def chat() -> str:
        r = client.chat(model=name, messages=ask, options=opts)
        expect(r.done and r.message.content.strip() != "" and r.eval_count, f"got {r!r}")
        return r.message.content

    def stream() -> str:
        parts = list(client.chat(model=name, messages=ask, options=opts, stream=True))
        text = "".join(p.message.content for p in parts)
        expect(parts[-1].done and text.strip() != "" and len(parts) > 2, f"{len(parts)} parts")
        return f"{len(parts)} parts: {text}"

    weather = [{"role": "user", "content": ASK_WEATHER}]

    def tools() -> str:
        # Ollama has no tool_choice: the model may answer in text; a call must follow the schema
        r = client.chat(model=name, messages=weather, tools=[WEATHER_TOOL],
                        options={"num_predict": TOOL_MAX_TOKENS})
        if not r.message.tool_calls:
            return "answered in text: " + r.message.content
        check_weather_args(dict(r.message.tool_calls[0].function.arguments))
        return f"called {r.message.tool_calls[0].function}"

    def tool_result() -> str:
        # the history an app sends after running a call, in the client's own types
        call = ollama.Message.ToolCall(function=ollama.Message.ToolCall.Function(
            name="get_weather", arguments={"city": "Paris", "unit": "celsius"}))
        follow = client.chat(model=name, tools=[WEATHER_TOOL], options=opts, messages=[
            *weather, ollama.Message(role="assistant", content="", tool_calls=[call]),
            {"role": "tool", "tool_name": "get_weather", "content": json.dumps({"temperature": 21})}])
        expect(follow.done and follow.message.content.strip() != "", f"got {follow!r}")
        return follow.message.content

    def structured() -> str:
        r = client.chat(model=name, format=PERSON_SCHEMA, options=opts,
                        messages=[{"role": "user", "content": "Invent a person: a name and an age."}])
        return json.dumps(check_person(json.loads(r.message.content)))

    def generate() -> str:
        r = client.generate(model=name, prompt="Name a color.", options=opts)
        expect(r.done and r.response.strip() != "", f"got {r!r}")
        return r.response

    run.record("ollama-py", "list, show, ps", models)
    run.record("ollama-py", "chat", chat)
    run.record("ollama-py", "chat stream", stream)
    run.record("ollama-py", "tools (the model's choice)", tools)
    run.record("ollama-py", "tool result by tool_name", tool_result)
    run.record("ollama-py", "format (JSON schema)", structured)
    run.record("ollama-py", "generate", generate)


# ---------------------------------------------------------------- LangChain on those APIs

def langchain_native_checks(run: Run) -> None:
    """LangChain's ChatAnthropic (langchain-anthropic) and ChatOllama (langchain-ollama)."""
    import ollama
    from langchain_anthropic import ChatAnthropic
    from langchain_core.messages import AIMessage
    from langchain_core.tools import tool
    from langchain_ollama import ChatOllama
    from pydantic import BaseModel, Field

    (listed,) = ollama.Client(host=server_root(run)).list().models

    @tool
    def get_weather(city: str, unit: str) -> str:
        """Current weather in a city; unit is celsius or fahrenheit."""
        return f"21 degrees {unit} in {city}"

    class Person(BaseModel):
        name: str = Field(max_length=20)
        age: int = Field(ge=0, le=120)

    models = {"anthropic": ChatAnthropic(base_url=server_root(run), api_key="unused",
                                         model=run.model, max_tokens=MAX_TOKENS, max_retries=0,
                                         timeout=300),
              "ollama": ChatOllama(base_url=server_root(run), model=str(listed.model),
                                   num_predict=MAX_TOKENS)}

    def invoke(llm: Any) -> Any:
        def go() -> str:
            r = llm.invoke("What is the capital of France?")
            expect(isinstance(r, AIMessage) and r.text.strip() != "", f"got {r!r}")
            return r.text
        return go

    def stream(llm: Any) -> Any:
        def go() -> str:
            parts = [c.text for c in llm.stream("Name three rivers in Europe.")]
            expect(len(parts) > 2 and "".join(parts).strip() != "", f"chunks {parts!r}")
            return f"{len(parts)} chunks: " + "".join(parts)
        return go

    def tools(llm: Any, **kw: Any) -> Any:
        def go() -> str:
            r = llm.bind_tools([get_weather], **kw).invoke(ASK_WEATHER)
            if not r.tool_calls:
                expect("tool_choice" not in kw, f"no call when forced: {r!r}")
                return "answered in text: " + r.text
            expect(r.tool_calls[0]["name"] == "get_weather", f"calls {r.tool_calls}")
            return f"{r.tool_calls[0]['name']}({r.tool_calls[0]['args']})"
        return go

    def structured(llm: Any, **kw: Any) -> Any:
        def go() -> str:
            p = llm.with_structured_output(Person, **kw).invoke("Invent a person: a name and an age.")
            return repr(check_person(p))
        return go

    for key, llm in models.items():
        client = f"lc-{key}"
        run.record(client, "invoke", invoke(llm))
        run.record(client, "stream", stream(llm))
    run.record("lc-anthropic", "bind_tools (tool_choice any)",
               tools(models["anthropic"], tool_choice="any"))
    # json_schema: Claude's structured outputs (output_config.format), closed by the grammar; the
    # default tool-call method's open schema lets the 135M model invent properties to max_tokens
    run.record("lc-anthropic", "with_structured_output (json_schema)",
               structured(models["anthropic"], method="json_schema"))
    run.record("lc-ollama", "bind_tools", tools(models["ollama"]))
    run.record("lc-ollama", "with_structured_output (json_schema)",
               structured(models["ollama"], method="json_schema"))
