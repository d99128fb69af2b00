"""OpenAI's Responses API in terms of chat messages: the request body, its input items as the
chat history the template reads, its tools and formats in chat-completions form, a reply's
message as output items, and the bounded store behind ``previous_response_id``.

Only what a local model can do is accepted: function tools, text input, JSON output formats.
Anything else (built-in tools, images, files, background mode, the Conversations API) is a 400
that names the field, never silently dropped.
"""
from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from pydantic import Field

from server.errors import bad_request
from server.schemas import SEED_MAX, SEED_MIN, _Liberal

METADATA_MAX = 16         # OpenAI's limit: 16 pairs, keys up to 64 characters, values up to 512
TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesRequest(_Liberal):
    model: Optional[str] = None
    input: Union[str, list[dict[str, Any]]] = Field(min_length=1)
    instructions: Optional[str] = None
    previous_response_id: Optional[str] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    max_output_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    # not in OpenAI's Responses API; accepted as in chat completions (vLLM takes them too)
    top_k: Optional[int] = Field(default=None, ge=-1, le=1_000_000)
    min_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    seed: Optional[int] = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    ignore_eos: Optional[bool] = None
    logit_bias: Optional[dict[str, float]] = None
    stream: Optional[bool] = False
    store: Optional[bool] = True
    text: Optional[dict[str, Any]] = None
    reasoning: Optional[dict[str, Any]] = None
    metadata: Optional[dict[str, str]] = None
    user: Optional[str] = None
    truncation: Optional[Literal["disabled", "auto"]] = None
    background: Optional[bool] = None
    include: Optional[list[str]] = None


def check_supported(body: ResponsesRequest) -> None:
    """400s for what moeserve cannot do, naming the field."""
    if body.background:
        raise bad_request("background responses are not supported; send the request and wait, "
                          "or stream it", "background")
    for name in ("conversation", "prompt"):
        if getattr(body, name, None) is not None:
            raise bad_request(f"'{name}' is not supported: send the input itself, or "
                              f"previous_response_id", name)
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


def input_messages(items: Union[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Input items as chat messages: a message each; consecutive function calls as one assistant
    message with tool calls; a function call's output as a tool message; a reasoning item as
    the reasoning_content of the assistant message after it."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    thought: Optional[str] = None
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise bad_request(f"{where}.role must be user, assistant, system or developer",
                                  f"input.{i}.role")
            msg = {"role": "system" if role == "developer" else role,
                   "content": _text(item.get("content"), i)}
            if role == "assistant" and thought is not None:
                msg["reasoning_content"], thought = thought, None
            out.append(msg)
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            thought = "\n".join(p.get("text", "") for p in parts if isinstance(p, dict))
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                raise bad_request(f"{where}: a function_call needs call_id, name and arguments "
                                  "(strings)", f"input.{i}")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                msg = {"role": "assistant", "content": None, "tool_calls": [call]}
                if thought is not None:
                    msg["reasoning_content"], thought = thought, None
                out.append(msg)
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str) or output is None:
                raise bad_request(f"{where}: a function_call_output needs call_id and output",
                                  f"input.{i}")
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": output if isinstance(output, str) else _text(output, i)})
        else:
            raise bad_request(f"{where}: items of type {kind!r} are not supported (message, "
                              "function_call, function_call_output and reasoning are)", f"input.{i}")
    return out


def chat_tools(tools: Optional[list[dict[str, Any]]]) -> Optional[list[dict[str, Any]]]:
    """Responses' flat function tools in chat-completions form."""
    if tools is None:
        return None
    out = []
    for i, t in enumerate(tools):
        if t.get("type") != "function":
            raise bad_request(f"tools[{i}]: tools of type {t.get('type')!r} are not supported; "
                              "only function tools are", f"tools.{i}.type")
        out.append({"type": "function", "function": {
            k: t[k] for k in ("name", "description", "parameters", "strict") if k in t}})
    return out


def chat_tool_choice(choice: Union[str, dict[str, Any], None]) -> Any:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise bad_request("tool_choice must be 'auto', 'none', 'required' or "
                      "{'type': 'function', 'name': ...}", "tool_choice")


def chat_response_format(text: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """text.format in chat-completions form (response_format)."""
    fmt = (text or {}).get("format")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {
            k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
    raise bad_request("text.format.type must be text, json_object or json_schema", "text.format.type")


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


def history_message(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The assistant message that output ``items`` are, for the next turn's history (as the
    chat route reads a reply sent back)."""
    text = "".join(p["text"] for i in items if i["type"] == "message" for p in i["content"])
    calls = [{"id": i["call_id"], "type": "function",
              "function": {"name": i["name"], "arguments": i["arguments"]}}
             for i in items if i["type"] == "function_call"]
    msg: dict[str, Any] = {"role": "assistant", "content": (text or None) if calls else text}
    if calls:
        msg["tool_calls"] = calls
    thought = "".join(p["text"] for i in items if i["type"] == "reasoning" for p in i["content"])
    if thought:
        msg["reasoning_content"] = thought
    return msg


@dataclass(frozen=True)
class Stored:
    response: dict[str, Any]
    history: list[dict[str, Any]]       # the chat messages up to and including this reply


class ResponseStore:
    """The last ``capacity`` stored responses, in memory (lost at restart, as documented)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, entry: Stored) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._items[entry.response["id"]] = entry
            self._items.move_to_end(entry.response["id"])
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, response_id: str) -> Optional[Stored]:
        with self._lock:
            return self._items.get(response_id)

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._items.pop(response_id, None) is not None
