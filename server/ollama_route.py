"""Ollama's API (/api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version), for the
apps and libraries written against Ollama.

/api/chat and /api/generate become chat requests (server/ollama_items.py) and run through the chat
route's own setup: the same template, tool formats, grammars and reasoning parsers. OllamaJob
shapes what comes back: Ollama's objects, streamed (its default) as newline-delimited JSON, the
last one with done: true, the done_reason and the token counts and durations. Errors are
{"error": "..."} on these routes (server/errors.py).
"""
from __future__ import annotations

import functools
import time
from typing import Any, Optional

from fastapi import FastAPI, Request
from starlette.responses import Response

from engine.protocol import FINISH_LENGTH
from server.body import read_json
from server.errors import APIError, JSONBody, encode
from server.generate import Generation, Piece
from server.ollama_items import (OLLAMA_VERSION, OllamaChatRequest, OllamaGenerateRequest,
                                 OllamaShowRequest,
                                 chat_messages, check_model, model_files, now_iso, ollama_param,
                                 response_format, sampling, tag_name, thinking, unloads)
from server.openai_routes import (ChatJob, ChatPrompt, PrefillRefused, chat_prompt, harmony_replies,
                                  job_for, prefilled_prompt, split_prefill, splits_reasoning)
from server.openapi import body_schema, error_responses
from server.reasoning import REASONING
from server.responses import respond
from server.schemas import ChatCompletionRequest, chat_request, parse
from server.state import ServerState
from server.structured import response_format_constraint
from server.tool_setup import arguments_object


class OllamaJob(ChatJob):
    """/api/chat's reply: {"message": {...}}; /api/generate's (``field`` "response") flat."""

    stream_media_type = "application/x-ndjson"
    field = "message"

    def for_request(self, model: str) -> "OllamaJob":
        self.model = model       # as the request named it, as Ollama echoes it
        self._calls: list[dict[str, Any]] = []     # the stream's calls, sent when complete
        self._reason: Optional[str] = None
        return self

    def _object(self, content: str = "", thought: Optional[str] = None,
                calls: Optional[list[dict[str, Any]]] = None, done: bool = False) -> dict[str, Any]:
        if self.field == "message":
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thought:
                message["thinking"] = thought
            if calls:
                message["tool_calls"] = calls
            body: dict[str, Any] = {"message": message}
        else:
            body = {"response": content, **({"thinking": thought} if thought else {})}
        return {"model": self.model, "created_at": now_iso(), **body, "done": done}

    def _finished(self, out: dict[str, Any], reason: Optional[str], gen: Generation) -> dict[str, Any]:
        """The last object: why it ended, Ollama's counts and durations (nanoseconds)."""
        now = time.perf_counter()
        first = gen.first_token_at or now
        prompt, completion = self.token_counts(gen)
        out.update(done_reason="length" if reason == FINISH_LENGTH else "stop",
                   total_duration=_ns(now - gen.arrival), load_duration=0,
                   # as Ollama counts it: the prompt tokens computed, not those the cache held
                   prompt_eval_count=prompt - sum(gen.cached_tokens),
                   prompt_eval_duration=_ns(first - gen.arrival), eval_count=completion,
                   eval_duration=_ns(now - first))
        return out

    def full_response(self, gen: Any, per_choice: list[list[Piece]]) -> dict[str, Any]:
        choice = super().full_response(gen, per_choice)["choices"][0]
        m = choice["message"]
        calls = [_call(c["function"]) for c in m.get("tool_calls") or []]
        return self._finished(self._object(m.get("content") or "", m.get(REASONING), calls, True),
                              choice["finish_reason"], gen)

    # ---- the stream: chat chunks become Ollama's objects, one per line ----
    def encode_event(self, obj: Any) -> bytes:
        return encode(obj) + b"\n"

    def head_chunks(self, index: int) -> list[dict[str, Any]]:
        return []

    def chunks(self, piece: Piece, offset: int) -> list[dict[str, Any]]:
        return [o for c in super().chunks(piece, offset) for o in self._from_chunk(c)]

    def final_chunks(self, index: int, reason: str) -> list[dict[str, Any]]:
        self._reason = reason
        out = [o for c in super().final_chunks(index, reason) for o in self._from_chunk(c)]
        return out + self._flush()

    def tail_events(self, gen: Generation) -> list[bytes]:
        return [self.encode_event(self._finished(self._object(done=True), self._reason, gen))]

    def error_event(self, err: APIError) -> bytes:
        return self.encode_event(err.ollama_body())

    def _from_chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for choice in chunk.get("choices", []):
            delta = choice.get("delta") or {}
            for call in delta.get("tool_calls") or []:
                fn = call.get("function") or {}
                if call.get("id"):     # a new call: the one before it is complete
                    out += self._flush()
                    self._calls.append({"name": fn.get("name", ""), "arguments": ""})
                if self._calls:
                    self._calls[-1]["arguments"] += fn.get("arguments") or ""
            if delta.get(REASONING) or delta.get("content"):
                out += self._flush()
                out.append(self._object(delta.get("content") or "", delta.get(REASONING)))
        return out

    def _flush(self) -> list[dict[str, Any]]:
        calls, self._calls = self._calls, []
        return [self._object(calls=[_call(c) for c in calls])] if calls else []


class OllamaGenerateJob(OllamaJob):
    field = "response"


def _call(fn: dict[str, Any]) -> dict[str, Any]:
    """A chat call as Ollama's: its arguments an object."""
    return {"function": {"name": fn["name"], "arguments": arguments_object(fn["arguments"])}}


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


def _loaded(state: ServerState, body: Any, field: str) -> Response:
    """Ollama's answer to a request without input, which clients send to load a model (or, with
    keep_alive 0, to unload it): this server's one model stays loaded; while it loads, a 503."""
    state.require_ready()
    out: dict[str, Any] = ({"message": {"role": "assistant", "content": ""}} if field == "message"
                           else {"response": ""})
    reason = "unload" if unloads(body.keep_alive) else "load"
    return JSONBody({"model": body.model, "created_at": now_iso(), **out, "done_reason": reason,
                     "done": True})


def _chat_fields(state: ServerState, body: Any) -> dict[str, Any]:
    return {"model": None, "stream": body.stream is not False,   # null streams, as in Ollama
            **sampling(body.options, state.context),
            "response_format": response_format(body.format), **thinking(body.think)}


async def chat(state: ServerState, request: Request) -> Response:
    body = parse(OllamaChatRequest, await read_json(request, state.cfg.max_request_bytes))
    check_model(body.model, state.model_name)
    if not body.messages:
        return _loaded(state, body, "message")
    messages = chat_messages(body.messages)     # its 400s name Ollama's own indices
    try:
        req = chat_request({**_chat_fields(state, body), "messages": messages, "tools": body.tools})
        job = job_for(state, req, await _prompt(state, req), OllamaJob)
    except APIError as exc:
        raise ollama_param(exc) from None
    assert isinstance(job, OllamaJob)
    return await respond(request, job.for_request(body.model or ""))


async def _prompt(state: ServerState, req: ChatCompletionRequest) -> ChatPrompt:
    """A final assistant message of text after the conversation is continued, as Ollama's
    templates leave it open; where no prefill can start the reply (a format, harmony, a template
    that opens thinking), it is a finished turn, as it was before this server continued it."""
    split = split_prefill(req)
    if split is None:
        return await chat_prompt(state, req)
    try:
        return await prefilled_prompt(state, *split, "think")
    except PrefillRefused:
        return await chat_prompt(state, req)


async def generate(state: ServerState, request: Request) -> Response:
    body = parse(OllamaGenerateRequest, await read_json(request, state.cfg.max_request_bytes))
    check_model(body.model, state.model_name)
    for name in ("suffix", "template", "context", "images"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported on this server; use /api/chat for a "
                                f"conversation", param=name)
    if body.raw and body.system:
        raise APIError(400, "raw mode does not take a system prompt: the prompt is sent as "
                            "written", param="system")
    if not body.prompt:
        return _loaded(state, body, "response")
    messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
        {"role": "user", "content": body.prompt}]
    try:
        req = chat_request({**_chat_fields(state, body), "messages": messages})
        if body.raw:   # the prompt as written, no template (the messages above only carry it)
            ids = await state.encode(body.prompt)
            job: ChatJob = OllamaGenerateJob(state, req, [ids], False, 0,
                                             response_format_constraint(req.response_format))
        else:
            job = job_for(state, req, await chat_prompt(state, req), OllamaGenerateJob)
    except APIError as exc:
        raise ollama_param(exc, generate=True) from None
    assert isinstance(job, OllamaGenerateJob)
    return await respond(request, job.for_request(body.model or ""))


def _details(state: ServerState) -> dict[str, Any]:
    kind = state.client.model_info.model_type if state.client.ready else ""
    return {"parent_model": "", "format": "safetensors", "family": kind,
            "families": [kind] if kind else [], "parameter_size": "", "quantization_level": ""}


@functools.lru_cache(maxsize=4)
def _files(path: str) -> tuple[int, str, str]:
    return model_files(path)


def _model_files(state: ServerState) -> tuple[int, str, str]:
    """(bytes, digest, modified_at) of the loaded model's folder, read once."""
    return _files(state.client.model_info.path) if state.client.ready else (0, "", now_iso())


def _entry(state: ServerState) -> dict[str, Any]:
    """The model as /api/tags and /api/ps list it."""
    size, digest, modified = _model_files(state)
    name = tag_name(state.model_name)
    return {"name": name, "model": name, "modified_at": modified, "size": size, "digest": digest,
            "details": _details(state)}


def show(state: ServerState) -> dict[str, Any]:
    info = state.client.model_info if state.client.ready else None
    caps = ["completion", "tools"]
    if state.cfg.reasoning_parser != "none" and (harmony_replies(state) or splits_reasoning(state)):
        caps.append("thinking")    # replies are split into thinking and content
    arch = info.model_type if info else ""
    model_info: dict[str, Any] = {"general.architecture": arch}
    if info is not None:
        model_info.update({f"{arch}.context_length": info.context_length,
                           f"{arch}.expert_count": info.num_experts,
                           f"{arch}.expert_used_count": info.top_k,
                           f"{arch}.block_count": info.num_moe_layers})
    return {"modelfile": "", "parameters": "", "template": state.tokenizer.template_source,
            "details": _details(state), "model_info": model_info, "capabilities": caps,
            "modified_at": _model_files(state)[2]}


UNSUPPORTED = ("pull", "push", "create", "copy", "delete", "embed", "embeddings")


def add_ollama_routes(app: FastAPI, state: ServerState) -> None:
    async def chat_route(request: Request) -> Response:
        return await chat(state, request)

    async def generate_route(request: Request) -> Response:
        return await generate(state, request)

    async def tags_route() -> Response:
        return JSONBody({"models": [_entry(state)]})

    async def ps_route() -> Response:
        if not state.client.ready:
            return JSONBody({"models": []})
        return JSONBody({"models": [{**_entry(state), "expires_at": "2318-01-01T00:00:00Z",
                                     "size_vram": 0, "context_length": state.context}]})

    async def show_route(request: Request) -> Response:
        body = parse(OllamaShowRequest, await read_json(request, state.cfg.max_request_bytes))
        check_model(body.model or body.name, state.model_name)
        return JSONBody(show(state))

    async def version_route() -> Response:
        return JSONBody({"version": OLLAMA_VERSION})

    async def unsupported(request: Request) -> Response:
        raise APIError(501, f"{request.url.path} is not supported: this server serves the one "
                            f"model it was started with (moeserve serve --model)")

    errors = error_responses(envelope="OllamaErrorResponse", stream_type=OllamaJob.stream_media_type)
    app.add_api_route("/api/chat", chat_route, methods=["POST"], summary="Chat (Ollama's API)",
                      openapi_extra={**body_schema(OllamaChatRequest), "responses": errors})
    app.add_api_route("/api/generate", generate_route, methods=["POST"],
                      summary="Generate (Ollama's API)",
                      openapi_extra={**body_schema(OllamaGenerateRequest), "responses": errors})
    app.add_api_route("/api/tags", tags_route, methods=["GET"], summary="List models (Ollama's API)")
    app.add_api_route("/api/ps", ps_route, methods=["GET"], summary="Running models (Ollama's API)")
    app.add_api_route("/api/show", show_route, methods=["POST"], summary="Show a model (Ollama's API)",
                      openapi_extra={**body_schema(OllamaShowRequest), "responses": error_responses(
                          "400", "401", "403", "404", "413", envelope="OllamaErrorResponse")})
    app.add_api_route("/api/version", version_route, methods=["GET"],
                      summary="The Ollama API version served")
    for name in UNSUPPORTED:
        app.add_api_route(f"/api/{name}", unsupported, methods=["POST", "DELETE"],
                          include_in_schema=False)

