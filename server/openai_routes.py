"""POST /v1/chat/completions and /v1/completions: JSON or SSE."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Optional, TypeVar

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from engine.client import EngineFailure, EngineNotReady, RequestRejected
from engine.protocol import GenerateRequest, SamplingParams
from server.app import ServerState, read_json
from server.errors import APIError, bad_request
from server.generate import Generation, Piece, chat_logprobs, completion_logprobs
from server.schemas import (ChatCompletionRequest, CompletionRequest, _SamplingFields,
                            message_dicts, parse)
from server.tokenizer import TemplateError

T = TypeVar("T")
FINGERPRINT = "moeserve-0.1"


class ClientGone(Exception):
    """The client disconnected before the response started."""


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, aw: Awaitable[T]) -> T:
    """Await ``aw`` unless the client disconnects first (then ClientGone)."""
    task = asyncio.ensure_future(aw)
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientGone()


def _sampling(body: _SamplingFields, room: int, index: int, logprobs: bool,
              top_logprobs: int) -> SamplingParams:
    bias = tuple((int(k), float(v)) for k, v in (body.logit_bias or {}).items())
    try:
        return SamplingParams(
            max_tokens=min(body.max_new_tokens or room, room),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(body.top_k or 0, 0), min_p=body.min_p or 0.0,
            seed=None if body.seed is None else body.seed + index,   # n>1: distinct, reproducible
            repetition_penalty=body.repetition_penalty or 1.0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=bias, ignore_eos=bool(body.ignore_eos), logprobs=logprobs,
            top_logprobs=top_logprobs)
    except ValueError as exc:
        raise bad_request(str(exc)) from None


class _Job:
    """Everything one HTTP generation request needs after parsing."""

    def __init__(self, state: ServerState, kind: str, body: _SamplingFields,
                 prompts: list[list[int]], logprobs: bool, top_logprobs: int) -> None:
        self.state, self.kind, self.body = state, kind, body
        self.n = body.n or 1
        self.logprobs, self.top_logprobs = logprobs, top_logprobs
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        client = state.client
        if not client.ready:
            raise APIError(503, "the engine is starting; retry shortly", retry_after=5)
        ctx = client.model_info.context_length
        param = "messages" if kind == "chat" else "prompt"
        self.requests: list[GenerateRequest] = []
        for p, ids in enumerate(prompts):
            if not ids:
                raise bad_request("the prompt is empty", param)
            if len(ids) >= ctx:
                raise bad_request(f"the prompt has {len(ids)} tokens but the model's context holds "
                                  f"{ctx} tokens (prompt and reply together)", param)
            for j in range(self.n):
                params = _sampling(body, ctx - len(ids), j, logprobs, top_logprobs)
                self.requests.append(GenerateRequest(f"{self.id}-{p * self.n + j}", tuple(ids), params))
        if client.queue_depth + len(self.requests) > state.cfg.max_queue:
            raise APIError(429, f"the server is busy: {client.queue_depth} requests are waiting "
                                f"(limit {state.cfg.max_queue}); retry shortly", retry_after=1)

    def start(self, arrival: float) -> Generation:
        try:
            return Generation(self.state.client, self.state.tokenizer, self.state.metrics,
                              self.requests, self.body.stops, arrival, self.logprobs)
        except EngineNotReady:
            raise APIError(503, "the engine is restarting; retry shortly", retry_after=5) from None
        except RequestRejected as exc:
            raise bad_request(str(exc)) from None

    # ---- response pieces ----
    def _logprobs(self, piece: Piece, offset: int) -> Optional[dict[str, Any]]:
        if not self.logprobs:
            return None
        if self.kind == "chat":
            return chat_logprobs(self.state.tokenizer, piece.tokens, self.top_logprobs)
        return completion_logprobs(self.state.tokenizer, piece.tokens, self.top_logprobs, offset)

    def envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.state.model_name, "system_fingerprint": FINGERPRINT, "choices": choices}

    def usage(self, gen: Generation) -> dict[str, int]:
        p, c = sum(gen.prompt_tokens), sum(gen.completion_tokens)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def chunk(self, piece: Piece, offset: int) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": piece.index, "logprobs": self._logprobs(piece, offset),
                                  "finish_reason": None}
        if self.kind == "chat":
            choice["delta"] = {"content": piece.text}
        else:
            choice["text"] = piece.text
        out = self.envelope([choice])
        out["object"] = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return out

    def final_chunk(self, index: int, reason: str) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": reason}
        if self.kind == "chat":
            choice["delta"] = {}
        else:
            choice["text"] = ""
        out = self.envelope([choice])
        out["object"] = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return out


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


async def _collect(gen: Generation, n_choices: int) -> list[list[Piece]]:
    pieces: list[list[Piece]] = [[] for _ in range(n_choices)]
    async for piece in gen.pieces():
        pieces[piece.index].append(piece)
    return pieces


async def _respond(request: Request, job: _Job) -> Response:
    gen = job.start(time.perf_counter())
    total = len(job.requests)
    try:
        if not job.body.stream:
            try:
                per_choice = await _unless_disconnected(request, _collect(gen, total))
            except EngineFailure as exc:
                raise APIError(500, f"the engine failed: {exc}") from None
            except RequestRejected as exc:
                raise bad_request(str(exc)) from None
            return JSONResponse(_full_response(job, gen, per_choice))
        it = gen.pieces().__aiter__()
        try:   # errors before the first token are plain HTTP errors, not SSE
            first = await _unless_disconnected(request, it.__anext__())
        except EngineFailure as exc:
            raise APIError(500, f"the engine failed: {exc}") from None
        except RequestRejected as exc:
            raise bad_request(str(exc)) from None
    except ClientGone:
        gen.close()
        return Response(status_code=499)
    except BaseException:
        gen.close()
        raise
    return StreamingResponse(_stream(job, gen, first, it), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stream(job: _Job, gen: Generation, first: Piece,
                  rest: AsyncIterator[Piece]) -> AsyncIterator[bytes]:
    offsets = [0] * len(job.requests)
    try:
        if job.kind == "chat":
            for i in range(len(job.requests)):
                head = job.envelope([{"index": i, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}])
                head["object"] = "chat.completion.chunk"
                yield _sse(head)
        piece: Optional[Piece] = first
        while piece is not None:
            if piece.text or piece.tokens:
                yield _sse(job.chunk(piece, offsets[piece.index]))
                offsets[piece.index] += len(piece.text)
            if piece.finish_reason:
                yield _sse(job.final_chunk(piece.index, piece.finish_reason))
            piece = await rest.__anext__()
    except StopAsyncIteration:
        if job.body.include_usage:
            out = job.envelope([])
            out["object"] = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
            out["usage"] = job.usage(gen)
            yield _sse(out)
        yield b"data: [DONE]\n\n"
    except (EngineFailure, RequestRejected) as exc:
        yield APIError(500, f"the engine failed: {exc}").sse_event()
    finally:
        gen.close()   # client gone (cancelled) or done: abort whatever still runs


def _full_response(job: _Job, gen: Generation, per_choice: list[list[Piece]]) -> dict[str, Any]:
    choices = []
    for i, pieces in enumerate(per_choice):
        text = "".join(p.text for p in pieces)
        reason = next((p.finish_reason for p in pieces if p.finish_reason), "stop")
        merged = Piece(i, text, [t for p in pieces for t in p.tokens], reason)
        c: dict[str, Any] = {"index": i, "logprobs": job._logprobs(merged, 0), "finish_reason": reason}
        if job.kind == "chat":
            c["message"] = {"role": "assistant", "content": text}
        else:
            c["text"] = text
        choices.append(c)
    out = job.envelope(choices)
    out["usage"] = job.usage(gen)
    return out


def add_openai_routes(app: FastAPI, state: ServerState) -> None:
    tok = state.tokenizer

    async def chat(request: Request) -> Response:
        body = parse(ChatCompletionRequest, await read_json(request, state.cfg.max_request_bytes))
        state.check_model(body.model)
        rf = body.response_format
        if rf is not None and rf.get("type", "text") != "text":
            raise bad_request(f"response_format type {rf.get('type')!r} is not supported yet; "
                              "only 'text'", "response_format")
        if body.tools:
            raise bad_request("tools (function calling) are not supported yet", "tools")
        try:
            ids = tok.encode_chat(message_dicts(body.messages))
        except TemplateError as exc:
            raise bad_request(str(exc), "messages") from None
        top = body.top_logprobs or 0
        return await _respond(request, _Job(state, "chat", body, [ids], bool(body.logprobs), top))

    async def completions(request: Request) -> Response:
        body = parse(CompletionRequest, await read_json(request, state.cfg.max_request_bytes))
        state.check_model(body.model)
        if body.echo:
            raise bad_request("echo is not supported", "echo")
        if body.suffix:
            raise bad_request("suffix is not supported", "suffix")
        p = body.prompt
        if isinstance(p, str):
            prompts = [tok.encode(p)]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]   # type: ignore[arg-type]
        elif p and all(isinstance(x, list) for x in p):
            prompts = [list(x) for x in p]   # type: ignore[union-attr]
        else:
            prompts = [tok.encode(x) for x in p]   # type: ignore[arg-type]
        if not prompts:
            raise bad_request("the prompt list is empty", "prompt")
        lp = body.logprobs
        return await _respond(request, _Job(state, "completion", body, prompts, lp is not None,
                                            lp or 0))

    for prefix in ("/v1", ""):
        app.add_api_route(prefix + "/chat/completions", chat, methods=["POST"])
        app.add_api_route(prefix + "/completions", completions, methods=["POST"])
