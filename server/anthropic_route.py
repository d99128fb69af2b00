"""POST /v1/messages (Anthropic's Messages API) and /v1/messages/count_tokens.

A Messages request becomes a chat request (server/anthropic_items.py) and runs through the chat
route's own setup: the same template, tool formats, grammars and reasoning parsers. MessagesJob
shapes what comes back: a message of content blocks instead of choices, and in a stream the events
Anthropic's SDKs read (message_start, content_block_start/delta/stop, message_delta,
message_stop), each as an SSE event named after its type. Errors take Anthropic's shape on these
routes (server/errors.py).
"""
from __future__ import annotations

from typing import Any, Optional

from fastapi import FastAPI, Request
from starlette.responses import Response

from engine.protocol import FINISH_STOP
from server.anthropic_items import (STOP_REASONS, MessagesRequest, chat_fields, check_supported,
                                    content_blocks, messages_param)
from server.body import read_json
from server.errors import APIError, JSONBody, dumps, encode
from server.generate import Generation, Piece
from server.openai_routes import ChatJob, ChatPrompt, job_for, prefilled_prompt
from server.openapi import body_schema, error_responses
from server.reasoning import REASONING
from server.responses import respond
from server.schemas import ChatCompletionRequest, chat_request, parse
from server.state import ServerState
from server.tool_setup import arguments_object


class MessagesJob(ChatJob):
    id_prefix, object_name = "msg_", "message"
    _gen: Generation

    def for_request(self) -> "MessagesJob":
        self._blocks = 0                     # content blocks started in the stream
        self._open: Optional[str] = None     # the open block's type
        self._args = ""                      # the open tool_use block's arguments
        self._space = ""                     # whitespace that may yet start a text block
        self._reason: Optional[str] = None
        self._stop_sequence: Optional[str] = None
        return self

    def start(self, arrival: float) -> Generation:
        self._gen = super().start(arrival)
        return self._gen

    # ---- the message ----
    def stop_reason(self, reason: Optional[str], stop_sequence: Optional[str]) -> Optional[str]:
        """Anthropic's stop reason: a stop string that matched is stop_sequence."""
        if reason == FINISH_STOP and stop_sequence is not None:
            return "stop_sequence"
        return STOP_REASONS.get(reason or "", reason)

    def usage_of(self, gen: Generation) -> dict[str, Any]:
        """Anthropic's input_tokens leave out the tokens read from the cache."""
        prompt, completion = self.token_counts(gen)
        cached = sum(gen.cached_tokens)
        return {"input_tokens": prompt - cached, "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": cached, "output_tokens": completion}

    def message_object(self, content: list[dict[str, Any]], reason: Optional[str],
                       stop_sequence: Optional[str], gen: Generation) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant",
                "model": self.state.model_name, "content": content,
                "stop_reason": self.stop_reason(reason, stop_sequence),
                "stop_sequence": stop_sequence if reason == FINISH_STOP else None,
                "usage": self.usage_of(gen)}

    def full_response(self, gen: Any, per_choice: list[list[Piece]]) -> dict[str, Any]:
        choice = super().full_response(gen, per_choice)["choices"][0]
        stop = next((p.stop_sequence for p in per_choice[0] if p.stop_sequence), None)
        return self.message_object(content_blocks(choice["message"]), choice["finish_reason"],
                                   stop, gen)

    # ---- the stream: chat chunks become Anthropic's events ----
    def encode_event(self, obj: Any) -> bytes:
        return b"event: " + obj["type"].encode() + b"\ndata: " + encode(obj) + b"\n\n"

    def head_chunks(self, index: int) -> list[dict[str, Any]]:
        start = self.message_object([], None, None, self._gen)
        start["usage"]["output_tokens"] = 0
        return [{"type": "message_start", "message": start}]

    def chunks(self, piece: Piece, offset: int) -> list[dict[str, Any]]:
        if piece.stop_sequence is not None:
            self._stop_sequence = piece.stop_sequence
        return [e for c in super().chunks(piece, offset) for e in self._from_chunk(c)]

    def final_chunks(self, index: int, reason: str) -> list[dict[str, Any]]:
        chunks = super().final_chunks(index, reason)
        self._reason = chunks[-1]["choices"][0]["finish_reason"]    # "tool_calls" after calls
        return [e for c in chunks for e in self._from_chunk(c)] + self._close()

    def tail_events(self, gen: Generation) -> list[bytes]:
        usage = self.usage_of(gen)
        delta = {"type": "message_delta",
                 "delta": {"stop_reason": self.stop_reason(self._reason, self._stop_sequence),
                           "stop_sequence": self._stop_sequence if self._reason == FINISH_STOP
                           else None},
                 "usage": usage}
        return [self.encode_event(delta), self.encode_event({"type": "message_stop"})]

    def error_event(self, err: APIError) -> bytes:
        return self.encode_event(err.anthropic_body())

    def _from_chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for choice in chunk.get("choices", []):
            delta = choice.get("delta") or {}
            if delta.get(REASONING):
                events += self._delta("thinking", {"type": "thinking_delta",
                                                   "thinking": delta[REASONING]})
            if delta.get("content"):
                events += self._delta("text", {"type": "text_delta", "text": delta["content"]})
            for call in delta.get("tool_calls") or []:
                fn = call.get("function") or {}
                if call.get("id"):     # a new call: its id and name come first, then its input
                    events += self._begin({"type": "tool_use", "id": call["id"],
                                           "name": fn.get("name", ""), "input": {}})
                if self._open == "tool_use":    # sent whole at the block's end, as an object
                    self._args += fn.get("arguments") or ""
        return events

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "index": self._blocks - 1, **fields}

    def _begin(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close()
        self._blocks += 1
        self._open = block["type"]
        return events + [self._event("content_block_start", content_block=block)]

    def _delta(self, kind: str, delta: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if kind == "text" and self._open != kind:
            # whitespace between blocks (before a call) is no text block, as in the whole reply
            text = self._space + delta["text"]
            if not text.strip():
                self._space = text
                return []
            self._space, delta = "", {**delta, "text": text}
        if self._open != kind:
            events += self._begin({"type": "thinking", "thinking": "", "signature": ""}
                                  if kind == "thinking" else {"type": "text", "text": ""})
        return events + [self._event("content_block_delta", delta=delta)]

    def _close(self) -> list[dict[str, Any]]:
        self._space = ""
        if self._open is None:
            return []
        events = []
        if self._open == "tool_use":
            args, self._args = arguments_object(self._args), ""
            if args:
                events.append(self._event("content_block_delta", delta={
                    "type": "input_json_delta", "partial_json": dumps(args)}))
        self._open = None
        return events + [self._event("content_block_stop")]


async def _chat_body(state: ServerState, request: Request) -> tuple[MessagesRequest, ChatCompletionRequest, str]:
    body = parse(MessagesRequest, await read_json(request, state.cfg.max_request_bytes))
    check_supported(body)
    chat, prefill = chat_fields(body)
    if not chat["messages"]:
        raise APIError(400, "the messages hold no turn to answer", param="messages")
    try:
        return body, chat_request(chat), prefill
    except APIError as exc:
        raise messages_param(exc) from None


async def _prompt(state: ServerState, chat: ChatCompletionRequest, prefill: str) -> ChatPrompt:
    try:
        return await prefilled_prompt(state, chat, prefill, "thinking")
    except APIError as exc:
        raise messages_param(exc) from None


async def create(state: ServerState, request: Request) -> Response:
    body, chat, prefill = await _chat_body(state, request)
    if body.max_tokens is None:
        raise APIError(400, "max_tokens: Field required", param="max_tokens")
    job = job_for(state, chat, await _prompt(state, chat, prefill), MessagesJob)
    assert isinstance(job, MessagesJob)
    return await respond(request, job.for_request())


async def count_tokens(state: ServerState, request: Request) -> Response:
    _, chat, prefill = await _chat_body(state, request)
    return JSONBody({"input_tokens": len((await _prompt(state, chat, prefill)).ids)})


def add_messages_routes(app: FastAPI, state: ServerState) -> None:
    async def create_route(request: Request) -> Response:
        return await create(state, request)

    async def count_route(request: Request) -> Response:
        return await count_tokens(state, request)

    for prefix in ("/v1", ""):
        shown = prefix == "/v1"
        app.add_api_route(prefix + "/messages", create_route, methods=["POST"],
                          include_in_schema=shown, summary="Create a message (Anthropic's API)",
                          openapi_extra={**body_schema(MessagesRequest), "responses": error_responses(envelope="AnthropicErrorResponse")})
        app.add_api_route(prefix + "/messages/count_tokens", count_route, methods=["POST"],
                          include_in_schema=shown, summary="Count a message's input tokens",
                          openapi_extra={**body_schema(MessagesRequest), "responses": error_responses(envelope="AnthropicErrorResponse")})
