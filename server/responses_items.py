"""OpenAI's Responses API in terms of chat messages: the request body, its input items as the
chat history the template reads, its tools and formats in chat-completions form, a reply's
message as output items, and the bounded store behind ``previous_response_id``.

Only what a local model can do is accepted: function tools, text input, JSON output formats.
Anything else (built-in tools, images, files, background mode, the Conversations API, logprobs)
is a 400 that names the field. Two options are accepted with no effect, as the README says:
reasoning.summary (no summaries are written) and truncation "auto" (nothing is truncated).
"""
from __future__ import annotations

import uuid
from typing import Any, Literal, Optional, Union

from pydantic import Field

from server.errors import APIError, bad_request, renamed
from server.schemas import SEED_MAX, SEED_MIN, _Liberal

METADATA_MAX = 16         # OpenAI's limit: 16 pairs, keys up to 64 characters, values up to 512
TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesRequest(_Liberal):
    model: Optional[str] = None
    # shapes checked by the functions below, so that a 400 names the Responses field
    input: Union[str, list[Any]] = Field(min_length=1)
    instructions: Optional[str] = None
    previous_response_id: Optional[str] = None
    tools: Optional[list[Any]] = None
    tool_choice: Any = None
    parallel_tool_calls: Optional[bool] = None
    max_output_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    # not in OpenAI's Responses API; accepted as in chat completions (vLLM takes them too)
    top_k: Optional[int] = Field(default=None, ge=-1, le=1_000_000)
    min_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    seed: Optional[int] = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    ignore_eos: Optional[bool] = None
    logit_bias: Optional[dict[str, float]] = None
    stream: Optional[bool] = False
    store: Optional[bool] = True
    text: Any = None
    reasoning: Any = None
    metadata: Optional[dict[str, str]] = None
    user: Optional[str] = None
    truncation: Optional[Literal["disabled", "auto"]] = None
    background: Optional[bool] = None
    include: Optional[list[str]] = None

    @property
    def effort(self) -> Optional[str]:
        """reasoning.effort, in the values chat completions take ('xhigh' and 'max' as 'high')."""
        effort = self.reasoning.get("effort") if isinstance(self.reasoning, dict) else None
        if effort is not None and effort not in EFFORTS:
            raise bad_request(f"reasoning.effort must be one of {', '.join(EFFORTS)}",
                              "reasoning.effort")
        return "high" if effort in ("xhigh", "max") else effort


EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


def check_supported(body: ResponsesRequest) -> None:
    """400s for what moeserve cannot do, naming the field."""
    if body.background:
        raise bad_request("background responses are not supported; send the request and wait, "
                          "or stream it", "background")
    for name in ("conversation", "prompt"):
        if getattr(body, name, None) is not None:
            raise bad_request(f"'{name}' is not supported: send the input itself, or "
                              f"previous_response_id", name)
    if body.top_logprobs or "message.output_text.logprobs" in (body.include or []):
        raise bad_request("logprobs are not served on /v1/responses; /v1/chat/completions has "
                          "them", "top_logprobs" if body.top_logprobs else "include")
    if body.reasoning is not None and not isinstance(body.reasoning, dict):
        raise bad_request("reasoning must be an object", "reasoning")
    if body.metadata is not None and (len(body.metadata) > METADATA_MAX or any(
            len(k) > 64 or not isinstance(v, str) or len(v) > 512 for k, v in body.metadata.items())):
        raise bad_request(f"metadata takes at most {METADATA_MAX} pairs, keys of at most 64 and "
                          "string values of at most 512 characters", "metadata")


def _text(content: Any, i: int) -> str:
    """Input item ``i``'s content as text: a string, or its text parts joined."""
    where = f"input[{i}]"
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of parts", f"input.{i}.content")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise bad_request(f"{where}.content[{j}]: only text parts are supported, got type "
                              f"{kind!r}", f"input.{i}.content.{j}")
        texts.append(part["text"])
    return "\n".join(texts)


def _parts_text(parts: Any, param: str) -> str:
    """The text of a reasoning item's summary or content parts."""
    if not isinstance(parts, list) or not all(
            isinstance(p, dict) and isinstance(p.get("text"), str) for p in parts):
        raise bad_request(f"{param} must be a list of parts with text", param)
    return "\n".join(p["text"] for p in parts)


def input_messages(items: Union[str, list[Any]]) -> list[dict[str, Any]]:
    """Input items as chat messages: a message each; function calls join the assistant message
    before them (one assistant turn: its text, then its calls); a function call's output is a
    tool message; reasoning items are the reasoning_content of the assistant turn they open.
    Output items sent back as input give the message history_message stores for them."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    thoughts: list[str] = []          # reasoning waiting for its assistant turn

    def assistant(open_new: bool) -> dict[str, Any]:
        if open_new or not out or out[-1]["role"] != "assistant":
            out.append({"role": "assistant", "content": ""})
        msg = out[-1]
        if thoughts:
            prior = msg.get("reasoning_content")
            msg["reasoning_content"] = "\n".join(([prior] if prior else []) + thoughts)
            thoughts.clear()
        return msg

    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise bad_request(f"input[{i}] must be an object (an input item)", f"input.{i}")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise bad_request(f"input[{i}].role must be user, assistant, system or developer",
                                  f"input.{i}.role")
            text = _text(item.get("content"), i)
            if role == "assistant":
                # a new assistant turn unless it continues reasoning or a turn of calls
                msg = assistant(open_new=not thoughts and not (
                    out and out[-1]["role"] == "assistant" and not out[-1]["content"]))
                msg["content"] = (msg["content"] or "") + text
            else:
                out.append({"role": "system" if role == "developer" else role, "content": text})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            field = "content" if item.get("content") else "summary"
            thoughts.append(_parts_text(parts, f"input.{i}.{field}"))
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                raise bad_request(f"input[{i}]: a function_call needs call_id, name and arguments "
                                  "(strings)", f"input.{i}")
            msg = assistant(open_new=False)
            msg.setdefault("tool_calls", []).append(
                {"id": item["call_id"], "type": "function",
                 "function": {"name": item["name"], "arguments": item["arguments"]}})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str) or output is None:
                raise bad_request(f"input[{i}]: a function_call_output needs call_id and output",
                                  f"input.{i}")
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": output if isinstance(output, str) else _text(output, i)})
        else:
            raise bad_request(f"input[{i}]: items of type {kind!r} are not supported (message, "
                              "function_call, function_call_output and reasoning are)", f"input.{i}")
    if thoughts:                      # reasoning that no text or call followed (a cut reply)
        assistant(open_new=True)
    for msg in out:
        if msg.get("tool_calls") and not msg["content"]:
            msg["content"] = None     # as the chat route reads a turn of calls
    return out


def chat_tools(tools: Optional[list[Any]]) -> Optional[list[dict[str, Any]]]:
    """Responses' flat function tools in chat-completions form."""
    if tools is None:
        return None
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise bad_request(f"tools[{i}] must be an object", f"tools.{i}")
        if t.get("type") != "function":
            raise bad_request(f"tools[{i}]: tools of type {t.get('type')!r} are not supported; "
                              "only function tools are", f"tools.{i}.type")
        out.append({"type": "function", "function": {
            k: t[k] for k in ("name", "description", "parameters", "strict") if k in t}})
    return out


def chat_tool_choice(choice: Any) -> Any:
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise bad_request("tool_choice must be 'auto', 'none', 'required' or "
                      "{'type': 'function', 'name': ...}", "tool_choice")


def chat_response_format(text: Any) -> Optional[dict[str, Any]]:
    """text.format in chat-completions form (response_format)."""
    if text is not None and not isinstance(text, dict):
        raise bad_request("text must be an object", "text")
    fmt = (text or {}).get("format")
    if fmt is not None and not isinstance(fmt, dict):
        raise bad_request("text.format must be an object", "text.format")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {
            k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
    raise bad_request("text.format.type must be text, json_object or json_schema", "text.format.type")


_PARAMS = (("reasoning_effort", "reasoning.effort"), ("response_format.json_schema", "text.format"),
           ("response_format", "text.format"), ("max_tokens", "max_output_tokens"),
           ("messages", "input"))


def responses_param(exc: APIError) -> APIError:
    """An error of the chat request a Responses request became, naming the Responses field."""
    return renamed(exc, _PARAMS)


def with_instructions(instructions: Optional[str], history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``instructions`` and the system/developer messages the history starts with, as one system
    message first: several would be dropped by gpt-oss's template and refused by others."""
    lead = [m["content"] for m in history[:next((i for i, m in enumerate(history)
                                                 if m["role"] != "system"), len(history))]]
    texts = [t for t in [instructions or "", *lead] if t]
    rest = history[len(lead):]
    return ([{"role": "system", "content": "\n\n".join(texts)}] if texts else []) + rest


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


def output_items(message: dict[str, Any], done: bool = True) -> list[dict[str, Any]]:
    """A chat reply's message as output items: reasoning, then the text, then function calls."""
    items: list[dict[str, Any]] = []
    status = "completed" if done else "incomplete"
    if message.get("reasoning_content"):
        items.append(reasoning_item(message["reasoning_content"]))
    if message.get("content"):
        items.append(message_item(message["content"], status))
    for c in message.get("tool_calls") or []:
        items.append(call_item(c["id"], c["function"]["name"], c["function"]["arguments"], status))
    return items


def reasoning_item(text: str, item_id: Optional[str] = None) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id or new_id("rs_"), "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def message_item(text: str, status: str, item_id: Optional[str] = None) -> dict[str, Any]:
    return {"type": "message", "id": item_id or new_id("msg_"), "status": status,
            "role": "assistant", "content": [output_text(text)]}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(call_id: str, name: str, arguments: str, status: str,
              item_id: Optional[str] = None) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id or new_id("fc_"), "call_id": call_id,
            "name": name, "arguments": arguments, "status": status}


def history_message(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What output ``items`` add to the conversation's history: the messages they give when a
    client sends them back as input, so a stored conversation and a resent one render alike."""
    return input_messages([{**i, "role": "assistant"} if i["type"] == "message" else i
                           for i in items])
