"""Anthropic's Messages API in terms of chat messages: the request body, its content blocks as the
chat history the template reads (a final assistant turn as the reply's prefill), its tools, tool
choice, thinking and output format in chat-completions form, and a reply as content blocks.

Only what a local model can do is accepted: text, tool use and tool results, thinking, JSON
output formats. Anything else (images, documents, server tools such as web search, MCP servers,
containers) is a 400 that names the field. Accepted with no effect, as the README says:
cache_control (the prefix cache needs no marks), thinking.budget_tokens, metadata, service_tier.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import Field

from server.errors import APIError, bad_request, dumps, renamed
from server.reasoning import REASONING
from server.schemas import SEED_MAX, SEED_MIN, _Liberal
from server.tool_setup import arguments_object

# Anthropic's stop reasons for the chat route's finish reasons
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}
_PARAMS = (("reasoning_effort", "output_config.effort"),
           ("response_format.json_schema.schema", "output_config.format.schema"),
           ("response_format", "output_config.format"), ("stop", "stop_sequences"),
           ("chat_template_kwargs", "thinking"), ("messages", "messages"))


class MessagesRequest(_Liberal):
    model: Optional[str] = None
    # shapes checked by the functions below, so that a 400 names the Messages field
    messages: list[Any] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)     # required on create, not on count
    system: Any = None
    stop_sequences: Optional[list[str]] = Field(default=None, max_length=16)
    stream: Optional[bool] = False
    temperature: Optional[float] = Field(default=None, ge=0.0, le=1.0)    # Anthropic's range
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=0, le=1_000_000)
    # not in Anthropic's API; accepted as in chat completions
    min_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    seed: Optional[int] = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    ignore_eos: Optional[bool] = None
    tools: Optional[list[Any]] = None
    tool_choice: Any = None
    thinking: Any = None
    output_config: Any = None
    output_format: Any = None     # the structured-outputs beta's name for output_config.format


# chat completions' names that would look accepted here but are not the Messages API's
OPENAI_FIELDS = {"stop": "stop_sequences", "response_format": "output_config.format",
                 "max_completion_tokens": "max_tokens", "reasoning_effort": "output_config.effort",
                 "n": None, "logit_bias": None, "logprobs": None, "top_logprobs": None,
                 "frequency_penalty": None, "presence_penalty": None, "stream_options": None}


def check_supported(body: MessagesRequest) -> None:
    """400s for what moeserve cannot do, and for chat completions' fields, naming the field."""
    for name in ("mcp_servers", "container"):
        if getattr(body, name, None):
            raise bad_request(f"'{name}' is not supported by this server", name)
    for name, ours in OPENAI_FIELDS.items():
        if name in (body.model_extra or {}):
            raise bad_request(f"'{name}' is a chat completions field, not the Messages API's"
                              + (f"; send {ours}" if ours else ""), name)


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    """A message's content as blocks (a string is one text block)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise bad_request(f"{where}.content must be a string or a list of content blocks",
                          f"{where}.content")
    return content


def _text(block: dict[str, Any], key: str, param: str) -> str:
    value = block.get(key)
    if not isinstance(value, str):
        raise bad_request(f"{param}.{key} must be a string", f"{param}.{key}")
    return value


def _unsupported(kind: Any, param: str, allowed: str) -> Exception:
    return bad_request(f"content blocks of type {kind!r} are not supported here ({allowed})",
                       f"{param}.type")


def system_text(system: Any) -> Optional[str]:
    """The system prompt: a string, or its text blocks joined by newlines."""
    if system is None or isinstance(system, str):
        return system or None
    if not isinstance(system, list):
        raise bad_request("system must be a string or a list of text blocks", "system")
    texts = []
    for j, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise bad_request(f"system.{j} must be a text block", f"system.{j}")
        texts.append(_text(block, "text", f"system.{j}"))
    return "\n".join(texts) or None


def _tool_result(block: dict[str, Any], param: str) -> dict[str, Any]:
    call_id = _text(block, "tool_use_id", param)
    content = block.get("content")
    if content is None or isinstance(content, str):
        text = content or ""
    elif isinstance(content, list):
        parts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict):
                raise bad_request("a tool result's content blocks must be objects",
                                  f"{param}.content.{k}")
            if part.get("type") != "text":
                raise _unsupported(part.get("type"), f"{param}.content.{k}", "a tool result holds text")
            parts.append(_text(part, "text", f"{param}.content.{k}"))
        text = "\n".join(parts)
    else:
        raise bad_request(f"{param}.content must be a string or a list of text blocks",
                          f"{param}.content")
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def _user(blocks: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """A user turn: its tool results as tool messages (they answer the turn before), then its
    text as one user message."""
    tools, texts = [], []
    for j, block in enumerate(blocks):
        param, kind = f"{where}.content.{j}", block.get("type")
        if kind == "text":
            texts.append(_text(block, "text", param))
        elif kind == "tool_result":
            tools.append(_tool_result(block, param))
        else:
            raise _unsupported(kind, param, "a user turn holds text and tool_result blocks")
    return tools + ([{"role": "user", "content": "\n".join(texts)}] if texts else [])


def _assistant(blocks: list[dict[str, Any]], where: str) -> dict[str, Any]:
    """An assistant turn: its thinking as reasoning_content, its text, its tool uses as calls."""
    thought, texts, calls = [], [], []
    for j, block in enumerate(blocks):
        param, kind = f"{where}.content.{j}", block.get("type")
        if kind == "text":
            texts.append(_text(block, "text", param))
        elif kind == "thinking":
            thought.append(_text(block, "thinking", param))
        elif kind == "redacted_thinking":
            continue      # encrypted by Anthropic: nothing a local model can read
        elif kind == "tool_use":
            args = block.get("input", {})
            if not isinstance(args, dict):
                raise bad_request(f"{param}.input must be an object", f"{param}.input")
            calls.append({"id": _text(block, "id", param), "type": "function",
                          "function": {"name": _text(block, "name", param), "arguments": dumps(args)}})
        else:
            raise _unsupported(kind, param, "an assistant turn holds text, thinking and tool_use "
                                            "blocks")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        message["tool_calls"] = calls
    if thought:
        message[REASONING] = "\n".join(thought)
    return message


def chat_messages(body: MessagesRequest) -> tuple[list[dict[str, Any]], str]:
    """(the chat history, the reply's prefill): a final assistant turn is the start of the reply,
    which the model continues (Anthropic's prefill); consecutive turns of one role are merged
    into one, as Anthropic merges them."""
    system = system_text(body.system)
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for i, m in enumerate(body.messages):
        where = f"messages.{i}"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            raise bad_request(f"{where}.role must be 'user' or 'assistant'", f"{where}.role")
        blocks = _blocks(m.get("content"), where)
        out += _user(blocks, where) if role == "user" else [_assistant(blocks, where)]
    out = _merged(out)
    if not out or out[-1]["role"] != "assistant":
        return out, ""
    if out[-1].get("tool_calls") or out[-1].get(REASONING):
        raise bad_request("a final assistant turn (a prefill) may hold text only",
                          f"messages.{len(body.messages) - 1}.content")
    return out[:-1], out[-1]["content"]


def _merged(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        prev = out[-1] if out else None
        if prev is None or prev["role"] != m["role"] or m["role"] not in ("user", "assistant") \
                or (m["role"] == "assistant" and prev.get("tool_calls")):
            out.append(dict(m))
            continue
        # an assistant turn's text blocks join as written; user turns are paragraphs
        sep = "" if m["role"] == "assistant" else "\n\n"
        prev["content"] = sep.join(t for t in (prev["content"], m["content"]) if t)
        if m.get("tool_calls"):
            prev["tool_calls"] = m["tool_calls"]
        if m.get(REASONING):
            prev[REASONING] = "\n".join(t for t in (prev.get(REASONING), m[REASONING]) if t)
    return out


def chat_tools(tools: Optional[list[Any]]) -> Optional[list[dict[str, Any]]]:
    """Custom tools as chat functions; Anthropic's server and client tools are refused."""
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise bad_request(f"tools.{i} must be an object", f"tools.{i}")
        kind = tool.get("type", "custom")
        if kind != "custom":
            raise bad_request(f"only custom tools (a name and an input_schema) are supported, got "
                              f"type {kind!r}", f"tools.{i}.type")
        fn: dict[str, Any] = {"name": _text(tool, "name", f"tools.{i}"),
                              "parameters": tool.get("input_schema")}
        if not isinstance(fn["parameters"], dict):
            raise bad_request(f"tools.{i}.input_schema must be a JSON schema object",
                              f"tools.{i}.input_schema")
        if tool.get("description") is not None:
            fn["description"] = _text(tool, "description", f"tools.{i}")
        if tool.get("strict") is not None:
            fn["strict"] = bool(tool["strict"])
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(choice: Any) -> tuple[Any, Optional[bool]]:
    """(the chat tool_choice, parallel_tool_calls) of Anthropic's tool_choice."""
    if choice is None:
        return None, None
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise bad_request("tool_choice.type must be one of auto, any, tool, none", "tool_choice.type")
    parallel = False if choice.get("disable_parallel_tool_use") else None
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str):
            raise bad_request("tool_choice.name must name a tool", "tool_choice.name")
        return {"type": "function", "function": {"name": name}}, parallel
    return {"auto": "auto", "any": "required", "none": "none"}[kind], parallel


def _config(body: MessagesRequest) -> dict[str, Any]:
    config = body.output_config
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise bad_request("output_config must be an object", "output_config")
    return config


def chat_response_format(body: MessagesRequest) -> Optional[dict[str, Any]]:
    """output_config.format (or the beta's output_format) as a json_schema response_format."""
    fmt, param = _config(body).get("format"), "output_config.format"
    if fmt is None:
        fmt, param = body.output_format, "output_format"
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(
            fmt.get("schema"), dict):
        raise bad_request(f"{param} must be {{\"type\": \"json_schema\", \"schema\": {{...}}}}", param)
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"],
                                                   "strict": True}}


def reasoning_effort(body: MessagesRequest) -> Optional[str]:
    """output_config.effort in chat completions' values ('xhigh' and 'max' as 'high')."""
    effort = _config(body).get("effort")
    if effort is not None and (not isinstance(effort, str) or effort not in EFFORTS):
        raise bad_request(f"output_config.effort must be one of {', '.join(EFFORTS)}",
                          "output_config.effort")
    return EFFORTS.get(effort) if effort is not None else None


def template_kwargs(thinking: Any) -> Optional[dict[str, Any]]:
    """thinking as the chat template's enable_thinking (Qwen3's and GLM-4.5's templates read it;
    others ignore it); without it the template's default holds."""
    if thinking is None:
        return None
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind not in ("enabled", "adaptive", "between_tools", "disabled"):
        raise bad_request("thinking.type must be one of enabled, adaptive, between_tools, disabled",
                          "thinking.type")
    return {"enable_thinking": kind != "disabled"}


def chat_fields(body: MessagesRequest) -> tuple[dict[str, Any], str]:
    """(the chat-completions fields, the reply's prefill) of a Messages request."""
    messages, prefill = chat_messages(body)
    choice, parallel = chat_tool_choice(body.tool_choice)
    chat = {"model": body.model, "messages": messages, "stream": body.stream,
            "max_tokens": body.max_tokens, "temperature": body.temperature, "top_p": body.top_p,
            "top_k": body.top_k, "min_p": body.min_p, "seed": body.seed,
            "ignore_eos": body.ignore_eos, "stop": body.stop_sequences,
            "tools": chat_tools(body.tools), "tool_choice": choice, "parallel_tool_calls": parallel,
            "response_format": chat_response_format(body), "reasoning_effort": reasoning_effort(body),
            "chat_template_kwargs": template_kwargs(body.thinking)}
    return chat, prefill


def content_blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat reply's message as content blocks: thinking, text, then tool uses."""
    blocks: list[dict[str, Any]] = []
    if message.get(REASONING):
        blocks.append({"type": "thinking", "thinking": message[REASONING], "signature": ""})
    if (message.get("content") or "").strip():    # whitespace around calls is no block
        blocks.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        blocks.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                       "input": arguments_object(call["function"]["arguments"])})
    return blocks


def messages_param(exc: APIError) -> APIError:
    """An error of the chat request a Messages request became, naming the Messages field."""
    return renamed(exc, _PARAMS, {"parameters": "input_schema"})
