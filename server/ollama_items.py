"""Ollama's API in terms of chat completions: the /api/chat and /api/generate bodies, their
options as sampling fields, messages (tool calls with object arguments, tool results named by
tool_name) as the chat history the template reads, format and think, and the model's listing.

What Ollama does that one loaded model cannot (pulling, creating, copying, deleting models,
embeddings) is a 501 in server/ollama_route.py; images are a 400.
"""
from __future__ import annotations

import datetime
import hashlib
import math
import os
import re
from typing import Any, Optional, Union


from server.errors import APIError, bad_request, dumps, renamed
from server.reasoning import REASONING
from server.schemas import SEED_MAX, _Liberal
from server.structured import closed

# the Ollama release whose API these routes follow (clients gate tools and thinking on it)
OLLAMA_VERSION = "0.12.0"
THINK_LEVELS = ("low", "medium", "high")
# Ollama's options that have a sampling field here; the others (num_ctx, num_thread, mirostat,
# typical_p, ...) set things this server fixes at start, and are ignored
OPTIONS = {"num_predict": "max_tokens", "temperature": "temperature", "top_p": "top_p",
           "top_k": "top_k", "min_p": "min_p", "seed": "seed", "stop": "stop",
           "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
           "frequency_penalty": "frequency_penalty"}
# chat fields -> Ollama's: messages keep their index (the conversion is one to one)
_PARAMS = (*((chat, f"options.{ours}") for ours, chat in OPTIONS.items()),
           ("response_format", "format"), ("chat_template_kwargs", "think"),
           ("reasoning_effort", "think"))
_GENERATE_PARAMS = (*_PARAMS, ("messages", "prompt"))


class _OllamaRequest(_Liberal):
    model: Optional[str] = None
    format: Union[str, dict[str, Any], None] = None
    options: Any = None
    stream: Optional[bool] = True          # Ollama streams unless told not to
    think: Union[bool, str, None] = None
    keep_alive: Union[int, float, str, None] = None


class OllamaChatRequest(_OllamaRequest):
    messages: Optional[list[Any]] = None
    tools: Optional[list[Any]] = None


class OllamaShowRequest(_Liberal):
    model: Optional[str] = None
    name: Optional[str] = None      # the older clients' name for it


class OllamaGenerateRequest(_OllamaRequest):
    prompt: Optional[str] = None
    system: Optional[str] = None
    raw: Optional[bool] = False
    suffix: Optional[str] = None
    template: Optional[str] = None
    context: Optional[list[int]] = None
    images: Optional[list[Any]] = None


def same_model(requested: str, served: str) -> bool:
    """Whether ``requested`` names the model served as ``served``: Ollama's names without a tag mean
    ':latest' (a model pulled as name:latest is asked for as name, and the other way round)."""
    return requested == served or tag_name(requested) == tag_name(served)


def check_model(requested: Optional[str], served: str) -> None:
    """Ollama names carry a tag: the served name, with or without ':latest', is this model."""
    if not requested:
        raise APIError(400, "model is required", param="model")
    if not same_model(requested, served):
        raise APIError(404, f"model '{requested}' not found; this server serves "
                            f"'{tag_name(served)}'", param="model")


_DURATION = re.compile(r"\s*(-?[0-9]*\.?[0-9]+)\s*(ns|us|µs|ms|s|m|h)?\s*")


def unloads(keep_alive: Any) -> bool:
    """Whether keep_alive asks to unload now: zero, as a number or a duration ("0", "0m")."""
    if isinstance(keep_alive, (int, float)) and not isinstance(keep_alive, bool):
        return keep_alive == 0
    m = _DURATION.fullmatch(keep_alive) if isinstance(keep_alive, str) else None
    return m is not None and float(m.group(1)) == 0


def tag_name(served: str) -> str:
    return served if ":" in served else served + ":latest"


def ollama_param(exc: APIError, generate: bool = False) -> APIError:
    """An error of the chat request an Ollama request became, naming Ollama's field (tools
    keep the chat shape, which Ollama's have)."""
    return renamed(exc, _GENERATE_PARAMS if generate else _PARAMS, flatten_tools=False)


# Ollama takes any number for these and keeps it in range (or, for top_p 0, turns it off); the
# chat fields' ranges would refuse them
_RANGES = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "min_p": (0.0, 1.0),
           "repeat_penalty": (0.01, 10.0), "presence_penalty": (-2.0, 2.0),
           "frequency_penalty": (-2.0, 2.0)}
_INT_MAX = {"num_predict": 2**31, "top_k": 1_000_000, "seed": SEED_MAX}
_INTEGERS = tuple(_INT_MAX)


def sampling(options: Any, context: int) -> dict[str, Any]:
    """Ollama's options as chat-completions sampling fields, read as Ollama reads them: integers
    given as floats are truncated, values out of range are clamped, num_predict -1 and -2 run
    until the context is full, a negative seed is no seed, top_k 0 or less is no top-k."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise bad_request("options must be an object", "options")
    out: dict[str, Any] = {}
    for name, value in options.items():
        field = OPTIONS.get(name)
        if field is None or value is None:
            continue
        param = f"options.{name}"
        if name in _INTEGERS or name in _RANGES:
            if not isinstance(value, (int, float)) or isinstance(value, bool) \
                    or not math.isfinite(value):
                raise bad_request(f"{param} must be a finite number", param)
        if name in _INTEGERS:
            value = min(int(value), _INT_MAX[name])
            if value < 0 and name == "seed":
                continue
            if name == "num_predict" and value <= 0:
                value = context       # the room left after the prompt caps it
        if name in _RANGES:
            low, high = _RANGES[name]
            if name == "top_p" and value <= 0:
                continue
            value = min(max(float(value), low), high)
        out[field] = max(value, 0) if name == "top_k" else value
    return out


def response_format(fmt: Union[str, dict[str, Any], None]) -> Optional[dict[str, Any]]:
    """format: "json" or a JSON schema."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        # closed objects (a small model would invent properties), keywords the grammar cannot
        # enforce ignored, as Ollama's converter ignores them
        return {"type": "json_schema", "json_schema": {"name": "output", "schema": closed(fmt),
                                                       "strict": False}}
    raise bad_request('format must be "json" or a JSON schema object', "format")


def thinking(think: Union[bool, str, None]) -> dict[str, Any]:
    """think as the chat template's enable_thinking (Qwen3's and GLM-4.5's templates read it)
    and, for a level, reasoning_effort (gpt-oss's)."""
    if think is None:
        return {}
    if isinstance(think, bool):
        return {"chat_template_kwargs": {"enable_thinking": think}}
    if think not in THINK_LEVELS:
        raise bad_request(f"think must be true, false or one of {', '.join(THINK_LEVELS)}", "think")
    return {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": think}


def chat_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Ollama's messages as chat messages: an assistant turn's tool calls get ids (Ollama's have
    none), and a tool result answers the earliest unanswered call of its tool_name (else the
    earliest unanswered call)."""
    out: list[dict[str, Any]] = []
    open_calls: list[tuple[str, str]] = []      # (id, name) of calls not yet answered
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object", where)
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant", "tool"):
            raise bad_request(f"{where}.role must be system, user, assistant or tool", f"{where}.role")
        if content is not None and not isinstance(content, str):
            raise bad_request(f"{where}.content must be a string", f"{where}.content")
        if m.get("images"):
            raise bad_request("images are not supported: this server's models read text",
                              f"{where}.images")
        turn: dict[str, Any] = {"role": role, "content": content or ""}
        if role == "assistant":
            if m.get("thinking"):
                turn[REASONING] = str(m["thinking"])
            calls = _calls(m.get("tool_calls"), f"{where}.tool_calls", len(out))
            if calls:
                turn["tool_calls"] = calls
                open_calls = [(c["id"], c["function"]["name"]) for c in calls]
        elif role == "tool":
            name = m.get("tool_name") or m.get("name")
            match = next((c for c in open_calls if c[1] == name), open_calls[0] if open_calls else None)
            if match is not None:
                open_calls.remove(match)
                turn["tool_call_id"] = match[0]
        out.append(turn)
    return out


def _calls(calls: Any, where: str, turn: int) -> list[dict[str, Any]]:
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise bad_request(f"{where} must be a list", where)
    out = []
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request(f"{where}.{k}.function must name a function", f"{where}.{k}.function")
        args = fn.get("arguments", {})
        if isinstance(args, str):   # some clients send the JSON text, as OpenAI's API has it
            text = args
        elif isinstance(args, dict):
            text = dumps(args)
        else:
            raise bad_request(f"{where}.{k}.function.arguments must be an object",
                              f"{where}.{k}.function.arguments")
        out.append({"id": call.get("id") or f"call_{turn}_{k}", "type": "function",
                    "function": {"name": fn["name"], "arguments": text}})
    return out


def now_iso() -> str:
    """Ollama's created_at: UTC, RFC 3339 with microseconds."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def model_files(path: str) -> tuple[int, str, str]:
    """(bytes of the model's weights, a digest that names this build, its modification time)."""
    size, stamp = 0, 0.0
    h = hashlib.sha256()
    for root, _, files in os.walk(path):
        for name in sorted(files):
            full = os.path.join(root, name)
            st = os.stat(full)
            if name.endswith(".safetensors"):
                size += st.st_size
            stamp = max(stamp, st.st_mtime)
            h.update(f"{os.path.relpath(full, path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    when = datetime.datetime.fromtimestamp(stamp or 0, datetime.timezone.utc)
    return size, h.hexdigest(), when.isoformat().replace("+00:00", "Z")
