"""Tool calling's prompt: the messages and template variables a chat request's tools and history
become, in the output style the model writes (server/tool_setup.py's styles)."""
from __future__ import annotations

import json
from typing import Any

from server.tool_blocks import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP
from server.tool_formats import FORMATS
from server.tool_setup import ToolSetup

OPEN, CLOSE = "<tool_call>", "</tool_call>"
TAGGED = ("hermes", *FORMATS)        # the styles whose calls sit between OPEN and CLOSE
DEEPSEEK = ("deepseek_v3", "deepseek_v31")

SYSTEM_PROMPT = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n"
    "</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    "{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")
JSON_SYSTEM_PROMPT = (
    "You may call a function to assist with the user query. The functions:\n{tools}\n\n"
    "To call one, reply with only a JSON object: "
    "{{\"name\": <function-name>, \"arguments\": <args-json-object>}}")
# MiniMax-M2's own tool listing (its chat template's), for a template that takes no tools
MINIMAX_PROMPT = (
    "# Tools\nYou may call one or more tools to assist with the user query.\nHere are the tools "
    "available in JSONSchema format:\n\n<tools>\n{tools}\n</tools>\n\nWhen making tool calls, use XML "
    "format to invoke tools and pass parameters:\n\n<minimax:tool_call>\n<invoke name=\"tool-name-1\">\n"
    "<parameter name=\"param-key-1\">param-value-1</parameter>\n<parameter name=\"param-key-2\">"
    "param-value-2</parameter>\n...\n</invoke>\n</minimax:tool_call>")
# DeepSeek's tool listing, in the form its model cards give (their chat templates list no tools)
DEEPSEEK_FORMS = {
    "deepseek_v31": (f"{CALLS_BEGIN}{CALL_BEGIN}tool_call_name{SEP}tool_call_arguments{CALL_END}"
                     f"{{{{additional_tool_calls}}}}{CALLS_END}",
                     "For multiple tool calls, chain them directly without separators or spaces"),
    "deepseek_v3": (f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}tool_call_name\n```json\ntool_call_arguments"
                    f"\n```{CALL_END}{{{{additional_tool_calls}}}}{CALLS_END}",
                    "For multiple tool calls, write them one after another, each on a line of its own")}


def _deepseek_prompt(setup: ToolSetup) -> str:
    form, several = DEEPSEEK_FORMS[setup.style]
    listing = "".join(f"\n### {f['name']}\nDescription: {f.get('description') or ''}\n\nParameters: "
                      f"{json.dumps(f['parameters'], ensure_ascii=False)}\n" for f in setup.tools)
    return (f"## Tools\nYou have access to the following tools:\n{listing}\nIMPORTANT: ALWAYS adhere "
            f"to this exact format for tool use:\n{form}\n\nWhere:\n\n- `tool_call_name` must be an "
            "exact match to one of the available tools\n- `tool_call_arguments` must be valid JSON "
            f"that strictly follows the tool's Parameters Schema\n- {several}\n")


def _object(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return arguments


def _render_call(name: str, arguments: Any, setup: ToolSetup) -> str:
    """A past call as text in the output style (for a template that renders no tool calls)."""
    arguments = _object(arguments)
    if setup.style == "minimax_m2":          # as its template writes them: strings raw, else JSON
        pairs = "".join(f'<parameter name="{k}">{v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}'
                        "</parameter>\n" for k, v in (arguments.items() if isinstance(arguments, dict) else ()))
        return f'<minimax:tool_call>\n<invoke name="{name}">\n{pairs}</invoke>\n</minimax:tool_call>'
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{OPEN}\n{body}\n{CLOSE}" if setup.style in TAGGED else body


def _with_system(out: list[dict[str, Any]], text: str) -> None:
    if out and out[0].get("role") == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{text}"}
    else:
        out.insert(0, {"role": "system", "content": text})


def prompt_messages(messages: list[dict[str, Any]], setup: ToolSetup,
                    template_takes_tools: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages (and extra template variables) for the chat template.

    A template that takes ``tools`` gets them and the history as is (arguments as objects, as
    transformers templates expect). DeepSeek's templates take no tools but render past calls
    and tool results themselves: they get the history as is (arguments as JSON text, which they
    concatenate), the tools listed in the system message in DeepSeek's form. Otherwise the tools
    go into the system message and the history is rewritten in the output style: assistant
    tool_calls as text, tool results as a user turn in <tool_response> tags (the Hermes
    convention).
    """
    if template_takes_tools:
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [_object_arguments(c) for c in m["tool_calls"]]
            out.append(m)
        return out, ({"tools": [{"type": "function", "function": f} for f in setup.tools]}
                     if setup.active else {})
    if setup.style in DEEPSEEK:
        out = [_deepseek_message(m) for m in messages]
        if setup.active:
            _with_system(out, _deepseek_prompt(setup))
        return out, {}
    out = []
    for m in messages:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            calls = [_render_call(c.get("function", {}).get("name", ""),
                                  c.get("function", {}).get("arguments", {}), setup)
                     for c in m["tool_calls"] if isinstance(c, dict)]
            text = "\n".join(([m["content"]] if m.get("content") else []) + calls)
            out.append({"role": "assistant", "content": text})
        elif role == "tool":
            text = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("_tool_turn"):
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "_tool_turn": True})
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content")})
    for m in out:
        m.pop("_tool_turn", None)
    if setup.active:
        if setup.style == "minimax_m2":
            tpl = MINIMAX_PROMPT
            listing = "\n".join(f"<tool>{json.dumps(f, ensure_ascii=False)}</tool>" for f in setup.tools)
        else:
            listing = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False)
                                for f in setup.tools)
            tpl = SYSTEM_PROMPT if setup.style in TAGGED else JSON_SYSTEM_PROMPT
        _with_system(out, tpl.format(tools=listing))
    return out, {}


def _deepseek_message(m: dict[str, Any]) -> dict[str, Any]:
    """A message as DeepSeek's templates read it: a tool-call turn's calls with ``type`` and their
    arguments as JSON text, and a null content when it has none (their test for a turn of calls)."""
    if m.get("role") != "assistant" or not m.get("tool_calls"):
        return m
    calls = []
    for c in m["tool_calls"]:
        if isinstance(c, dict) and isinstance(c.get("function"), dict):
            args = c["function"].get("arguments")
            text = args if isinstance(args, str) else json.dumps({} if args is None else args, ensure_ascii=False)
            c = {**c, "type": c.get("type") or "function", "function": {**c["function"], "arguments": text}}
        calls.append(c)
    return {**m, "tool_calls": calls, "content": m.get("content") or None}


def _object_arguments(call: Any) -> Any:
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        args = call["function"].get("arguments")
        if isinstance(args, str):
            try:
                return {**call, "function": {**call["function"], "arguments": json.loads(args)}}
            except json.JSONDecodeError:
                pass
    return call
