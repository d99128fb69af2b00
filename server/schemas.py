"""Request bodies, parsed liberally: unknown fields are ignored, the usual client variations accepted.

Responses are plain dicts built in server/responses.py (the wire format is fixed by the contract).
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from server.errors import APIError, bad_request
from server.expert_stream import MoeserveOptions
from server.tokenizer import RESERVED_VARIABLES


LOGIT_BIAS_MAX_ENTRIES = 1024   # documented in the README; each entry is applied every step
SEED_MIN, SEED_MAX = -2**63, 2**64 - 1
_TOKEN_ID = re.compile(r"-?[0-9]{1,12}")
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
TEMPLATE_KWARGS_MAX = 32


class _Liberal(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Liberal):
    type: str
    text: Optional[str] = None


class ChatMessage(_Liberal):
    role: str
    content: Union[str, list[TextPart], None] = None


class StreamOptions(_Liberal):
    include_usage: Optional[bool] = False


class _SamplingFields(_Liberal):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=-1, le=1_000_000)
    min_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    seed: Optional[int] = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    n: Optional[int] = Field(default=None, ge=1, le=64)
    stop: Union[str, list[str], None] = None
    presence_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    # beyond [0.01, 10] a penalty only overflows the logits (1e-300 made them +inf)
    repetition_penalty: Optional[float] = Field(default=None, ge=0.01, le=10.0)
    logit_bias: Optional[dict[str, float]] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: Optional[bool] = False
    moeserve: Optional[MoeserveOptions] = None      # our extension (server/expert_stream.py)

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        if v is not None and len(v) > LOGIT_BIAS_MAX_ENTRIES:
            raise ValueError(f"logit_bias has {len(v)} entries; at most {LOGIT_BIAS_MAX_ENTRIES}")
        for key, bias in (v or {}).items():
            if not _TOKEN_ID.fullmatch(key):   # ASCII digits only: "²".isdigit() is True
                raise ValueError(f"logit_bias keys must be token ids, got {key[:40]!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must lie in [-100, 100], got {bias}")
        return v

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def max_new_tokens(self) -> Optional[int]:
        # max_completion_tokens is the newer name; when both come, the smaller limit wins
        given = [v for v in (self.max_tokens, self.max_completion_tokens) if v is not None]
        return min(given) if given else None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None
    # extra chat template variables, as vLLM and llama.cpp's server take them (e.g. Qwen3's and
    # GLM-4.5's enable_thinking)
    chat_template_kwargs: Optional[dict[str, Any]] = None
    # OpenAI's reasoning effort (its values; the SDK sends "minimal" and "none" too); reaches the
    # chat template as the variable reasoning_effort (gpt-oss's template reads it) unless
    # chat_template_kwargs sets that variable itself
    reasoning_effort: Optional[Literal["none", "minimal", "low", "medium", "high"]] = None
    # vLLM's: the final assistant message is the start of the reply, which the model continues
    # (with add_generation_prompt false; the route refuses true)
    continue_final_message: Optional[bool] = False
    add_generation_prompt: Optional[bool] = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        if v is not None and len(v) > TEMPLATE_KWARGS_MAX:
            raise ValueError(f"chat_template_kwargs has {len(v)} entries; at most {TEMPLATE_KWARGS_MAX}")
        for key in v or {}:
            if not _VARIABLE.fullmatch(key):
                raise ValueError(f"chat_template_kwargs keys must be template variable names, got {key[:40]!r}")
            if key in RESERVED_VARIABLES:
                raise ValueError(f"chat_template_kwargs may not set {key!r} (the server sets it)")
        return v


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[Annotated[int, Field(ge=0, lt=2**31)]],
                  list[list[Annotated[int, Field(ge=0, lt=2**31)]]]]
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    echo: Optional[bool] = False
    suffix: Optional[str] = None


def parse(model: type[BaseModel], body: Any) -> Any:
    """Validate a decoded JSON body; a failure is a 400 naming the field."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise APIError(400, f"invalid '{loc}': {err['msg']}", param=loc or None) from None


def chat_request(fields: dict[str, Any]) -> ChatCompletionRequest:
    """The chat request another API's request becomes (Responses, Messages, Ollama): its fields,
    those it left unset (None) dropped, validated as a chat request's."""
    return parse(ChatCompletionRequest, {k: v for k, v in fields.items() if v is not None})


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages for the chat template: content flattened to a string (text parts joined)."""
    out = []
    for i, m in enumerate(messages):
        d = {k: v for k, v in m.model_dump().items() if v is not None or k == "content"}
        if isinstance(m.content, list):
            for part in m.content:
                if part.type != "text" or part.text is None:
                    raise bad_request(f"messages[{i}].content: only text parts are supported, got "
                                      f"type {part.type!r}", f"messages.{i}.content")
            d["content"] = "\n".join(p.text or "" for p in m.content)
        elif m.content is None:
            d["content"] = ""
        out.append(d)
    return out


ResponseKind = Literal["chat", "completion"]
