"""The OpenAI SDKs as their users call them: Python (in this process) and Node (e2e/clients_node.cjs)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any, Callable, Optional

from client_kit import (ASK_WEATHER, MAX_TOKENS, REPO, TOOL_MAX_TOKENS, WEATHER_TOOL, Check, Run,
                        check_weather_args, expect, short)


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

    # the Responses API (/v1/responses), as OpenAI's docs call it first
    flat_tool = {"type": "function", **WEATHER_TOOL["function"]}

    def responses_create() -> str:
        r = client.responses.create(model=m, input=ask[0]["content"], max_output_tokens=MAX_TOKENS,
                                    temperature=0)
        expect(r.status in ("completed", "incomplete") and r.output_text.strip() != "",
               f"status {r.status}, text {r.output_text!r}")
        expect(r.usage is not None and r.usage.output_tokens > 0, "no usage")
        return r.output_text

    def responses_stream() -> str:
        with client.responses.stream(model=m, input=ask[0]["content"],
                                     max_output_tokens=MAX_TOKENS) as s:
            events = list(s)
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        expect(text.strip() != "", "no streamed text")
        expect(events[-1].type in ("response.completed", "response.incomplete"),
               f"last event {events[-1].type}")
        return text

    def responses_tools() -> str:
        r = client.responses.create(model=m, input=ASK_WEATHER, tools=[flat_tool],
                                    tool_choice="required", parallel_tool_calls=False,
                                    max_output_tokens=TOOL_MAX_TOKENS)
        calls = [o for o in r.output if o.type == "function_call"]
        expect(bool(calls), "no function_call item")
        check_weather_args(calls[0].arguments)
        follow = client.responses.create(
            model=m, previous_response_id=r.id, tools=[flat_tool], max_output_tokens=MAX_TOKENS,
            input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                    "output": json.dumps({"temperature": 21, "sky": "sunny"})}])
        expect(follow.output_text.strip() != "", "no answer after the function output")
        return f"{calls[0].arguments} -> {follow.output_text}"

    def responses_parse() -> str:
        r = client.responses.parse(model=m, input="Invent a person: a name and an age.",
                                   text_format=Person, max_output_tokens=MAX_TOKENS)
        expect(isinstance(r.output_parsed, Person), f"output_parsed {r.output_parsed!r}")
        return repr(r.output_parsed)

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
    if hasattr(client, "responses"):
        run.record("openai-py", "responses.create", responses_create)
        run.record("openai-py", "responses.stream", responses_stream)
        run.record("openai-py", "responses tool call + previous_response_id", responses_tools)
        run.record("openai-py", "responses.parse (text_format)", responses_parse)


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
        c = Check("openai-node", d["check"], d["ok"], d["seconds"], short(d.get("error"), 600),
                  short(d.get("detail")))
        run.checks.append(c)
        print(f"  {'ok  ' if c.ok else 'FAIL'} {c.client:10s} {c.check:28s} {c.seconds:6.1f}s  "
              f"{c.error or c.detail or ''}", flush=True)
    err = p.stderr.read() if p.stderr else ""
    if p.wait() != 0 and not any(c.client == "openai-node" for c in run.checks):
        run.checks.append(Check("openai-node", "script", False, 0.0, short(err, 600)))
    with open(os.path.join(node_modules, "openai", "package.json")) as f:
        return json.load(f)["version"]
