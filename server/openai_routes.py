"""POST /v1/chat/completions and /v1/completions: each a small handler over server/responses.py."""
from __future__ import annotations

from typing import Any, Optional

from fastapi import FastAPI, Request
from starlette.responses import Response

from server.body import read_json
from server.errors import bad_request
from server.generate import Piece, chat_logprobs, completion_logprobs
from server.openapi import body_schema, error_responses
from server.responses import Job, respond
from server.schemas import ChatCompletionRequest, CompletionRequest, message_dicts, parse
from server.state import ServerState


class ChatJob(Job):
    id_prefix, object_name, chunk_object = "chatcmpl-", "chat.completion", "chat.completion.chunk"
    prompt_param = "messages"

    def logprobs_of(self, piece: Piece, offset: int) -> Optional[dict[str, Any]]:
        if not self.logprobs:
            return None
        return chat_logprobs(self.state.tokenizer, piece.tokens, self.top_logprobs)

    def delta(self, text: Optional[str]) -> dict[str, Any]:
        return {"delta": {} if text is None else {"content": text}}

    def message(self, text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text}}

    def head_chunks(self) -> list[dict[str, Any]]:
        return [self.envelope([{"index": 0, "delta": {"role": "assistant", "content": ""},
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
    state.check_model(body.model)
    rf = body.response_format
    if rf is not None and rf.get("type", "text") != "text":
        raise bad_request(f"response_format type {rf.get('type')!r} is not supported yet; "
                          "only 'text'", "response_format")
    if body.tools:
        raise bad_request("tools (function calling) are not supported yet", "tools")
    ids = await state.encode_chat(message_dicts(body.messages))
    job = ChatJob(state, body, [ids], bool(body.logprobs), body.top_logprobs or 0)
    return await respond(request, job)


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
