"""Shared machinery of the generation routes: a Job (one HTTP request's engine requests), the
engine-error -> HTTP mapping, and the JSON / SSE response loops. The chat and completions handlers
in server/openai_routes.py are small subclasses of Job that shape their choices."""
from __future__ import annotations

import abc
import asyncio
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Optional, TypeVar

from starlette.requests import Request
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.responses import Response, StreamingResponse

from engine.client import EngineFailure, EngineNotReady, RequestRejected
from engine.protocol import FINISH_STOP, Constraint, GenerateRequest
from server.access_log import record_usage
from server.errors import APIError, JSONBody, bad_request, encode
from server.expert_stream import token_json, wants_experts
from server.generate import Generation, Piece
from server.params import logit_bias, sampling_params
from server.schemas import _SamplingFields
from server.state import ServerState

T = TypeVar("T")
FINGERPRINT = "moeserve-0.1"
# sse-starlette cancels open streams this long after shutdown begins at the earliest: with
# --shutdown-grace 0 our error event (state.begin_shutdown, scheduled at once) still gets out,
# and it stays under uvicorn's graceful-shutdown timeout (at least 1 s, server/main.py)
SSE_MIN_GRACE_S = 0.5


class ClientGone(Exception):
    """The client disconnected before the response started."""


class ShuttingDown(Exception):
    """The server is shutting down: open generations end with an error."""


def engine_error(exc: BaseException) -> APIError:
    """The one mapping of engine-side failures to HTTP errors."""
    if isinstance(exc, RequestRejected):
        return bad_request(str(exc))
    if isinstance(exc, EngineNotReady):
        return APIError(503, "the engine is restarting; retry shortly", retry_after=5,
                        code="engine_loading")
    if isinstance(exc, ShuttingDown):
        return APIError(503, "the server is shutting down", code="shutting_down")
    return APIError(500, f"the engine failed: {exc}", code="engine_error")


ENGINE_ERRORS = (EngineFailure, EngineNotReady, RequestRejected, ShuttingDown)


class Job(abc.ABC):
    """Everything one HTTP generation request needs after parsing."""

    id_prefix: str
    object_name: str
    chunk_object: str
    prompt_param: str
    # a stream's media type: SSE (None), or e.g. Ollama's newline-delimited JSON
    stream_media_type: Optional[str] = None

    def __init__(self, state: ServerState, body: _SamplingFields, prompts: list[list[int]],
                 logprobs: bool, top_logprobs: int, constraint: Optional[Constraint] = None) -> None:
        self.state, self.body = state, body
        self.n = body.n or 1
        self.logprobs, self.top_logprobs = logprobs, top_logprobs
        self.id = self.id_prefix + uuid.uuid4().hex
        self.created = int(time.time())
        ctx = state.context
        info = state.client.model_info
        total = len(prompts) * self.n
        if total > state.cfg.max_queue:   # 429 would make SDKs retry forever
            raise bad_request(f"this request asks for {total} generations ({len(prompts)} "
                              f"prompt(s) x n={self.n}); the server queues at most "
                              f"{state.cfg.max_queue} (--max-queue)", "n")
        bias = logit_bias(body, info.vocab_size)
        watch = wants_experts(body.moeserve)
        self.requests: list[GenerateRequest] = []
        for p, ids in enumerate(prompts):
            if not ids:
                raise bad_request("the prompt is empty", self.prompt_param)
            if len(ids) >= ctx:
                raise bad_request(f"the prompt has {len(ids)} tokens but the model's context holds "
                                  f"{ctx} tokens (prompt and reply together)", self.prompt_param)
            for j in range(self.n):
                params = sampling_params(body, ctx - len(ids), j, logprobs, top_logprobs, bias,
                                         state.defaults, state.cfg.default_max_tokens, constraint)
                self.requests.append(GenerateRequest(f"{self.id}-{p * self.n + j}", tuple(ids),
                                                     params, watch_experts=watch))
        client = state.client
        if client.queue_depth + len(self.requests) > state.cfg.max_queue:
            raise APIError(429, f"the server is busy: {client.queue_depth} requests are waiting "
                                f"(limit {state.cfg.max_queue}); retry shortly", retry_after=1)

    # ---- shaped by each route ----
    @abc.abstractmethod
    def logprobs_of(self, piece: Piece, offset: int) -> Optional[dict[str, Any]]: ...

    @abc.abstractmethod
    def delta(self, text: Optional[str]) -> dict[str, Any]:
        """The per-chunk content fields of a choice (None: the final, empty one)."""

    @abc.abstractmethod
    def message(self, text: str) -> dict[str, Any]:
        """The content fields of a non-streamed choice."""

    def head_chunks(self, index: int) -> list[dict[str, Any]]:
        """Chunks sent before choice ``index``'s first token (chat: the assistant role)."""
        return []

    def encode_event(self, obj: Any) -> bytes:
        """One SSE event of the stream."""
        return sse(obj)

    def tail_events(self, gen: Generation) -> list[bytes]:
        """What ends a stream that finished: the usage chunk when asked for, then [DONE]."""
        out = []
        if self.body.include_usage:
            chunk = self.envelope([], chunk=True)
            chunk["usage"] = self.usage(gen)
            out.append(sse(chunk))
        return out + [b"data: [DONE]\n\n"]

    def error_event(self, err: APIError) -> bytes:
        """How a stream that fails after it began ends."""
        return err.sse_event()

    def token_counts(self, gen: Generation) -> tuple[int, int]:
        """(prompt, completion) tokens, for the access log."""
        return sum(gen.prompt_tokens), sum(gen.completion_tokens)

    # ---- shared ----
    def start(self, arrival: float) -> Generation:
        try:
            gen = Generation(self.state.client, self.state.tokenizer, self.state.metrics,
                             self.requests, self.body.stops, arrival, self.logprobs)
        except ENGINE_ERRORS as exc:
            raise engine_error(exc) from None
        self.state.live.add(gen)
        return gen

    def finish(self, gen: Generation) -> None:
        gen.close()
        self.state.live.discard(gen)

    def envelope(self, choices: list[dict[str, Any]], chunk: bool = False) -> dict[str, Any]:
        return {"id": self.id, "object": self.chunk_object if chunk else self.object_name,
                "created": self.created, "model": self.state.model_name,
                "system_fingerprint": FINGERPRINT, "choices": choices}

    def usage(self, gen: Generation) -> dict[str, Any]:
        p, c = self.token_counts(gen)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": sum(gen.cached_tokens)}}

    def chunk(self, piece: Piece, offset: int) -> dict[str, Any]:
        out = self.envelope([{"index": piece.index, **self.delta(piece.text),
                              "logprobs": self.logprobs_of(piece, offset),
                              "finish_reason": None}], chunk=True)
        return with_experts(out, piece)

    def final_chunk(self, index: int, reason: str) -> dict[str, Any]:
        return self.envelope([{"index": index, **self.delta(None), "logprobs": None,
                               "finish_reason": reason}], chunk=True)

    def chunks(self, piece: Piece, offset: int) -> list[dict[str, Any]]:
        """The SSE chunks for one piece (chat with tools may hold text back, or split it)."""
        return [self.chunk(piece, offset)] if piece.text or piece.tokens or piece.experts is not None else []

    def final_chunks(self, index: int, reason: str) -> list[dict[str, Any]]:
        return [self.final_chunk(index, reason)]

    def full_response(self, gen: Generation, per_choice: list[list[Piece]]) -> dict[str, Any]:
        choices = []
        for i, pieces in enumerate(per_choice):
            text = "".join(p.text for p in pieces)
            reason = next((p.finish_reason for p in pieces if p.finish_reason), FINISH_STOP)
            merged = Piece(i, text, [t for p in pieces for t in p.tokens], reason)
            choices.append({"index": i, **self.message(text),
                            "logprobs": self.logprobs_of(merged, 0), "finish_reason": reason})
            entries = [token_json(p.experts[1], p.experts[0]) for p in pieces if p.experts]
            if entries:   # not streamed: every token's entry at once
                choices[-1]["moeserve"] = {"tokens": entries}
        out = self.envelope(choices)
        out["usage"] = self.usage(gen)
        return out


class ClosingStream(StreamingResponse):
    """A plain streamed body whose generator is always closed when the response ends (a client
    gone while a send waits would otherwise leave it, and the engine requests, to the GC)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()   # type: ignore[attr-defined]


def with_experts(chunk: dict[str, Any], piece: Piece) -> dict[str, Any]:
    """The expert stream's entry of the piece's token, on its chunk."""
    if piece.experts is not None:
        chunk["moeserve"] = token_json(piece.experts[1], piece.experts[0])
    return chunk


def sse(obj: Any) -> bytes:
    return b"data: " + encode(obj) + b"\n\n"


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


async def _collect(gen: Generation, n_choices: int) -> list[list[Piece]]:
    pieces: list[list[Piece]] = [[] for _ in range(n_choices)]
    async for piece in gen.pieces():
        pieces[piece.index].append(piece)
    return pieces


async def respond(request: Request, job: Job) -> Response:
    gen = job.start(time.perf_counter())
    try:
        if not job.body.stream:
            try:
                per_choice = await _unless_disconnected(request, _collect(gen, len(job.requests)))
            except ENGINE_ERRORS as exc:
                raise engine_error(exc) from None
            job.finish(gen)
            out = job.full_response(gen, per_choice)
            record_usage(request.scope, *job.token_counts(gen))
            return JSONBody(out)
        it = gen.pieces().__aiter__()
        try:   # errors before the first token are plain HTTP errors, not SSE
            first = await _unless_disconnected(request, it.__anext__())
        except ENGINE_ERRORS as exc:
            raise engine_error(exc) from None
    except ClientGone:
        job.finish(gen)
        return Response(status_code=499)
    except BaseException:
        job.finish(gen)
        raise
    cfg = job.state.cfg
    if job.stream_media_type is not None:
        return ClosingStream(_stream(job, gen, first, it, request), media_type=job.stream_media_type)
    # sse-starlette: keep-alive comments while a long prompt is read, disconnect detection (the
    # generator is cancelled, which aborts the engine requests); at shutdown the stream gets the
    # grace period, within which state.begin_shutdown ends it with an error event
    return EventSourceResponse(_stream(job, gen, first, it, request), ping=cfg.sse_ping_s,
                               sep="\n", headers={"Cache-Control": "no-cache"},
                               ping_message_factory=lambda: ServerSentEvent(comment="ping"),
                               shutdown_grace_period=max(cfg.shutdown_grace_s, SSE_MIN_GRACE_S))


async def _stream(job: Job, gen: Generation, first: Piece, rest: AsyncIterator[Piece],
                  request: Request) -> AsyncIterator[bytes]:
    offsets = [0] * len(job.requests)
    try:
        for i in range(len(job.requests)):
            for head in job.head_chunks(i):
                yield job.encode_event(head)
        piece: Optional[Piece] = first
        while piece is not None:
            for c in job.chunks(piece, offsets[piece.index]):
                yield job.encode_event(c)
            offsets[piece.index] += len(piece.text)
            if piece.finish_reason:
                for c in job.final_chunks(piece.index, piece.finish_reason):
                    yield job.encode_event(c)
            piece = await rest.__anext__()
    except StopAsyncIteration:
        for event in job.tail_events(gen):
            yield event
    except ENGINE_ERRORS as exc:
        yield job.error_event(engine_error(exc))
    finally:
        record_usage(request.scope, *job.token_counts(gen))
        job.finish(gen)   # client gone (cancelled) or done: abort whatever still runs
