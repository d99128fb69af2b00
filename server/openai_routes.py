"""POST /v1/chat/completions and /v1/completions: each a small handler over server/responses.py."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

from fastapi import FastAPI, Request
from starlette.responses import Response

from server.body import read_json
from server.errors import APIError, bad_request
from engine.protocol import FINISH_STOP, Constraint
from server.generate import Piece, chat_logprobs, completion_logprobs
from server import harmony
from server.harmony import HarmonySplit, template_harmony
from server.reasoning import CONTENT, REASONING, ReasoningSplit, prompt_opens_block, template_thinks
from server.reasoning import split as split_reasoning
from server.openapi import body_schema, error_responses
from server.responses import Job, respond, with_experts
from server.schemas import ChatCompletionRequest, CompletionRequest, message_dicts, parse
from server.state import ServerState
from server.structured import check, response_format_constraint
from server.tools import (ToolCall, ToolSetup, ToolStream, forcing_grammar, parse_setup,
                          prompt_messages, template_style)
from server.tools import parse as parse_tool_calls

log = logging.getLogger("moeserve.server")


class ChatJob(Job):
    id_prefix, object_name, chunk_object = "chatcmpl-", "chat.completion", "chat.completion.chunk"
    prompt_param = "messages"
    tools: Optional[ToolSetup] = None
    reasoning: Optional[bool] = None      # None: no split; else whether replies start inside <think>
    # harmony replies (gpt-oss): None, else whether the analysis channel is reasoning_content; the
    # harmony parser reads the tool calls too (with harmony_tools)
    harmony: Optional[bool] = None
    harmony_tools: Optional[ToolSetup] = None
    _streams: dict[int, ToolStream]
    _splits: dict[int, ReasoningSplit]
    _harmonies: dict[int, HarmonySplit]

    def with_tools(self, setup: ToolSetup) -> "ChatJob":
        if setup.active:
            self.tools, self._streams = setup, {}
        return self

    def with_reasoning(self, inside: Optional[bool]) -> "ChatJob":
        if inside is not None:
            self.reasoning, self._splits = inside, {}
        return self

    def with_harmony(self, reasoning: bool, setup: ToolSetup) -> "ChatJob":
        self.harmony, self.harmony_tools, self._harmonies = reasoning, setup, {}
        return self

    @property
    def _plain(self) -> bool:
        return self.tools is None and self.reasoning is None and self.harmony is None

    def chunks(self, piece: Piece, offset: int) -> list[dict[str, Any]]:
        if self._plain:
            return super().chunks(piece, offset)
        out = [self._delta_chunk(piece.index, d) for d in self._deltas(piece.index, piece.text, False)]
        lp = self.logprobs_of(piece, offset) if piece.tokens else None
        if not out and (piece.experts is not None or lp is not None):
            out.append(self._delta_chunk(piece.index, {}))    # the text is held back: an empty delta
        if out:
            out[0]["choices"][0]["logprobs"] = lp
            if piece.experts is not None:
                with_experts(out[0], piece)
        return out

    def final_chunks(self, index: int, reason: str) -> list[dict[str, Any]]:
        if self._plain:
            return super().final_chunks(index, reason)
        out = [self._delta_chunk(index, d) for d in self._deltas(index, "", True)]
        calls = (self._harmony(index).calls if self.harmony is not None else
                 self.tools is not None and self._stream(index).calls)
        return out + [self.final_chunk(index, "tool_calls" if calls and reason == FINISH_STOP
                                       else reason)]

    def _deltas(self, index: int, text: str, final: bool) -> list[dict[str, Any]]:
        """One choice's new text as deltas: reasoning_content, then content or tool calls."""
        if self.harmony is not None:
            return self._harmony(index).feed(text, final)
        parts = ([(CONTENT, text)] if self.reasoning is None else
                 self._splits.setdefault(index, ReasoningSplit(self.reasoning)).feed(text, final))
        out: list[dict[str, Any]] = []
        for field, part in parts:
            if field == CONTENT and self.tools is not None:
                out += self._stream(index).feed(part)
            else:
                out.append({field: part})
        if final and self.tools is not None:
            out += self._stream(index).finish()
        return out

    def _harmony(self, index: int) -> HarmonySplit:
        return self._harmonies.setdefault(index, HarmonySplit(self.harmony_tools, bool(self.harmony)))

    def _stream(self, index: int) -> ToolStream:
        assert self.tools is not None
        return self._streams.setdefault(index, ToolStream(self.tools))

    def _delta_chunk(self, index: int, delta: dict[str, Any]) -> dict[str, Any]:
        return self.envelope([{"index": index, "delta": delta, "logprobs": None,
                               "finish_reason": None}], chunk=True)

    def full_response(self, gen: Any, per_choice: list[list[Piece]]) -> dict[str, Any]:
        out = super().full_response(gen, per_choice)
        if self._plain:
            return out
        for choice in out["choices"]:
            thought, text, calls = self._parts(choice["message"]["content"])
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                message = {"role": "assistant", "content": text or None,
                           "tool_calls": [c.as_dict() for c in calls]}
                if choice["finish_reason"] == FINISH_STOP:
                    choice["finish_reason"] = "tool_calls"
            if thought is not None:
                message[REASONING] = thought
            choice["message"] = message
        return out

    def _parts(self, text: str) -> tuple[Optional[str], str, list[ToolCall]]:
        """(reasoning or None, content, tool calls) of a whole reply."""
        if self.harmony is not None:
            return harmony.parse(text, self.harmony_tools, self.harmony)
        thought, text = (None, text) if self.reasoning is None else split_reasoning(text, self.reasoning)
        if self.tools is None:
            return thought, text, []
        content, calls = parse_tool_calls(text, self.tools)
        return thought, content, calls

    def logprobs_of(self, piece: Piece, offset: int) -> Optional[dict[str, Any]]:
        if not self.logprobs:
            return None
        return chat_logprobs(self.state.tokenizer, piece.tokens, self.top_logprobs)

    def delta(self, text: Optional[str]) -> dict[str, Any]:
        return {"delta": {} if text is None else {"content": text}}

    def message(self, text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text}}

    def head_chunks(self, index: int) -> list[dict[str, Any]]:
        return [self.envelope([{"index": index, "delta": {"role": "assistant", "content": ""},
                                "logprobs": None, "finish_reason": None}], chunk=True)]


class CompletionJob(Job):
    id_prefix, object_name, chunk_object = "cmpl-", "text_completion", "text_completion"
    prompt_param = "prompt"

    def logprobs_of(self, piece: Piece, offset: int) -> Optional[dict[str, Any]]:
        if not self.logprobs:
            return None
        return completion_logprobs(self.state.tokenizer, piece.tokens, self.top_logprobs, offset)

    def delta(self, text: Optional[str]) -> dict[str, Any]:
        return {"text": text or ""}

    def message(self, text: str) -> dict[str, Any]:
        return {"text": text}


async def chat(state: ServerState, request: Request) -> Response:
    body = parse(ChatCompletionRequest, await read_json(request, state.cfg.max_request_bytes))
    if not body.continue_final_message:     # (add_generation_prompt alone is ignored)
        return await respond(request, await chat_job(state, body))
    if body.add_generation_prompt:
        raise bad_request("continue_final_message continues the final message: it cannot be "
                          "combined with add_generation_prompt true", "add_generation_prompt")
    split = split_prefill(body)
    if split is None:
        raise bad_request("continue_final_message needs a final assistant message of text after "
                          "the conversation", "messages")
    body, prefill = split
    prompt = await prefilled_prompt(state, body, prefill, "chat_template_kwargs")
    return await respond(request, job_for(state, body, prompt))


def split_prefill(body: ChatCompletionRequest) -> Optional[tuple[ChatCompletionRequest, str]]:
    """(the request without its final message, that message's text) when it ends in an
    assistant message of text (no calls or reasoning) after the conversation; else None."""
    *history, last = body.messages
    final = message_dicts(body.messages)[-1]    # (a 400 names the message's own index)
    if last.role != "assistant" or final.get("tool_calls") or final.get(REASONING) or not history:
        return None
    return body.model_copy(update={"messages": history}), final["content"]


@dataclasses.dataclass(frozen=True)
class ChatPrompt:
    """A chat request's prompt and how its reply is read."""

    ids: list[int]
    setup: ToolSetup
    constraint: Optional[Constraint]
    harmony: bool           # replies are read as harmony (gpt-oss)
    thinks: bool            # --reasoning-parser is not none


async def chat_prompt(state: ServerState, body: ChatCompletionRequest, prefill: str = "") -> ChatPrompt:
    """The prompt of a chat request, with its grammar and tool setup; ``prefill``: the start of
    the reply, written after the generation prompt (the Messages API's final assistant turn)."""
    state.check_model(body.model)
    constraint = response_format_constraint(body.response_format)
    uses_harmony = harmony_replies(state)
    setup = parse_setup(body.tools, body.tool_choice, body.parallel_tool_calls,
                        "harmony" if uses_harmony else tool_style(state), state.tokenizer.single_tags)
    thinks = state.cfg.reasoning_parser != "none"     # (harmony: the analysis channel is reasoning)
    if setup.forced:
        if constraint is not None:
            raise bad_request("response_format json cannot be combined with tool_choice "
                              "'required' or a named function", "response_format")
        constraint = check(harmony.forcing_grammar(setup) if uses_harmony else forcing_grammar(setup),
                           "tools")
    elif constraint is not None and uses_harmony:
        # the JSON as the final channel's message, after the reasoning, in the model's own format
        constraint = check(harmony.response_format_grammar(constraint.lark, thinks), "response_format")
    history = message_dicts(body.messages)
    if uses_harmony:
        history = harmony.template_messages(history)
    kwargs = dict(body.chat_template_kwargs or {})
    if kwargs.get("reasoning_effort") is None:   # a null there sets nothing
        kwargs.pop("reasoning_effort", None)
    if body.reasoning_effort is not None:   # gpt-oss's template reads it; chat_template_kwargs wins
        kwargs.setdefault("reasoning_effort", body.reasoning_effort)

    def template_input(tools: ToolSetup) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        messages, extra = prompt_messages(history, tools, state.tokenizer.template_takes_tools)
        if uses_harmony and "tools" in extra:   # gpt-oss's template needs each one's description
            extra["tools"] = harmony.template_tools(extra["tools"])
        return messages, {**kwargs, **extra}

    ids = await state.encode_chat(*template_input(setup), prefill)
    if setup.active and not setup.forced and len(ids) >= state.context:
        # tool_choice auto with a tool listing the context cannot hold (Open WebUI sends its 36
        # built-in tools, ~7,000 tokens, with every chat): a 400 would fail every message of such
        # a front end, so the request is served as with tool_choice none, saying so in the log
        without = dataclasses.replace(setup, choice="none")
        plain = await state.encode_chat(*template_input(without), prefill)
        if len(plain) < state.context:
            log.warning("a prompt with its %d tools is %d tokens, more than the context of %d: "
                        "served without the tools (as tool_choice 'none'; %d tokens)",
                        len(setup.tools), len(ids), state.context, len(plain))
            setup, ids = without, plain
    elif setup.forced and len(ids) >= state.context:
        raise bad_request(f"the prompt with its {len(setup.tools)} tools is {len(ids)} tokens, but "
                          f"the model's context holds {state.context} tokens; tool_choice "
                          f"{setup.choice!r} needs the tools in the prompt", "tools")
    return ChatPrompt(ids, setup, constraint, uses_harmony, thinks)


class PrefillRefused(APIError):
    """A 400: the reply cannot start with the prefill (its grammar, harmony, an open thinking
    block)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(400, message, param=param)


async def prefilled_prompt(state: ServerState, body: ChatCompletionRequest, prefill: str,
                           thinking_param: str) -> ChatPrompt:
    """The prompt with the start of the reply (a final assistant turn, which the Messages and
    Ollama APIs continue); a prefill only where the reply is free text it can start."""
    prompt = await chat_prompt(state, body, prefill)
    if not prefill:
        return prompt
    if prompt.harmony:
        raise PrefillRefused("a final assistant turn (a prefill) is not supported with harmony "
                             "models (gpt-oss)", "messages")
    if prompt.constraint is not None:   # the grammar would start after the prefill
        raise PrefillRefused("a final assistant turn (a prefill) cannot be combined with a JSON "
                             "output format or a forced tool call", "messages")
    # only a template that thinks can open a block: the prompt without the prefill is read then
    if splits_reasoning(state) and reasoning_start(state, (await chat_prompt(state, body)).ids, None):
        raise PrefillRefused("this model's chat template opens a thinking block for the reply: a "
                             "final assistant turn (a prefill) would be read as thinking; turn "
                             "thinking off or send no prefill", thinking_param)
    return prompt


async def chat_job(state: ServerState, body: ChatCompletionRequest,
                   job_class: type[ChatJob] = ChatJob) -> ChatJob:
    """The job of a chat request (the Responses API builds its own subclass from the same setup)."""
    return job_for(state, body, await chat_prompt(state, body), job_class)


def job_for(state: ServerState, body: ChatCompletionRequest, p: ChatPrompt,
            job_class: type[ChatJob] = ChatJob) -> ChatJob:
    """The job that generates the reply to prompt ``p`` of ``body``."""
    job = job_class(state, body, [p.ids], bool(body.logprobs), body.top_logprobs or 0, p.constraint)
    if p.harmony:
        return job.with_harmony(p.thinks, p.setup)
    return job.with_tools(p.setup).with_reasoning(reasoning_start(state, p.ids, p.constraint))


def harmony_replies(state: ServerState) -> bool:
    """Whether replies are read as harmony (gpt-oss): its one parser reads reasoning and tool
    calls together, so either --reasoning-parser or --tool-parser naming it (or 'auto' with a chat
    template that writes <|channel|>) applies it to both."""
    reasoning, tools = state.cfg.reasoning_parser, state.cfg.tool_parser
    if "harmony" in (reasoning, tools):
        return True
    return "auto" in (reasoning, tools) and template_harmony(state.tokenizer.template_source)


def reasoning_start(state: ServerState, prompt: list[int], constraint: Any) -> Optional[bool]:
    """None when replies are not split into reasoning and content (--reasoning-parser none, or
    auto with a template of a model that does not think; a grammar-constrained reply is all
    content); else whether the prompt left a <think> block open for the reply."""
    if constraint is not None or not splits_reasoning(state):
        return None
    return prompt_opens_block(state.tokenizer.decode(prompt[-8:], skip_special_tokens=False))


def splits_reasoning(state: ServerState) -> bool:
    """Whether free replies are split into reasoning and content (--reasoning-parser not none,
    and with auto a template of a model that thinks)."""
    mode = state.cfg.reasoning_parser
    return mode != "none" and (mode != "auto" or template_thinks(state.tokenizer.template_source))


def tool_style(state: ServerState) -> str:
    """--tool-parser; 'auto' is the style whose tags the chat template writes (DeepSeek's,
    MiniMax-M2's, GLM-4.5's, Qwen3-Coder's), else the Hermes style, which the built-in system
    prompt and the Hermes/Qwen templates use (its parser also reads a bare JSON call)."""
    style = state.cfg.tool_parser
    return template_style(state.tokenizer.template_source) if style == "auto" else style


async def completions(state: ServerState, request: Request) -> Response:
    body = parse(CompletionRequest, await read_json(request, state.cfg.max_request_bytes))
    state.check_model(body.model)
    if body.echo:
        raise bad_request("echo is not supported", "echo")
    if body.suffix:
        raise bad_request("suffix is not supported", "suffix")
    p = body.prompt
    if isinstance(p, str):
        prompts = [await state.encode(p)]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]   # type: ignore[arg-type]
    elif p and all(isinstance(x, list) for x in p):
        prompts = [list(x) for x in p]   # type: ignore[union-attr]
    else:
        prompts = [await state.encode(x) for x in p]   # type: ignore[arg-type]
    if not prompts:
        raise bad_request("the prompt list is empty", "prompt")
    vocab = state.client.model_info.vocab_size if state.client.ready else None
    for ids in prompts:
        bad = next((t for t in ids if vocab is not None and t >= vocab), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary (0..{vocab - 1})",
                              "prompt")
    lp = body.logprobs
    return await respond(request, CompletionJob(state, body, prompts, lp is not None, lp or 0))


def add_openai_routes(app: FastAPI, state: ServerState) -> None:
    async def chat_route(request: Request) -> Response:
        return await chat(state, request)

    async def completions_route(request: Request) -> Response:
        return await completions(state, request)

    for prefix in ("/v1", ""):
        app.add_api_route(prefix + "/chat/completions", chat_route, methods=["POST"],
                          include_in_schema=prefix == "/v1", summary="Create a chat completion",
                          openapi_extra={**body_schema(ChatCompletionRequest),
                                         "responses": error_responses()})
        app.add_api_route(prefix + "/completions", completions_route, methods=["POST"],
                          include_in_schema=prefix == "/v1", summary="Create a completion",
                          openapi_extra={**body_schema(CompletionRequest),
                                         "responses": error_responses()})
