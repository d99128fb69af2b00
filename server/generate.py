"""One HTTP request's generation: n engine requests, detokenized, stop strings applied, merged.

Each choice runs as a task turning TokenDeltas into text Pieces; the handler consumes the merged
pieces. Cancelling the Generation (client gone, stop string, error) closes the engine streams,
which aborts their requests in the engine.
"""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from engine.client import DeltaStream, EngineClient, EngineFailure
from engine.protocol import (FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, GenerateRequest, TokenDelta,
                             TokenExperts)
from server.detokenize import IncrementalDetokenizer, StopMatcher
from server.metrics import Metrics
from server.tokenizer import TextTokenizer


@dataclass(frozen=True)
class TokenInfo:
    """One generated token with its log-probability and top alternatives, for `logprobs`."""

    token_id: int
    logprob: Optional[float]
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Piece:
    """New text of one choice; ``finish_reason`` is set on the choice's last piece."""

    index: int
    text: str
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: Optional[str] = None
    # the expert stream, for watching requests: (the token's index in the choice, what the
    # pass that produced it did); a piece is one engine delta, so one token at most
    experts: Optional[tuple[int, TokenExperts]] = None
    stop_sequence: Optional[str] = None     # on the last piece: the stop string that ended it


class _End:
    pass


class Generation:
    """Runs ``requests`` (choice index -> engine request) and merges their pieces in arrival order."""

    def __init__(self, client: EngineClient, tokenizer: TextTokenizer, metrics: Metrics,
                 requests: list[GenerateRequest], stops: list[str], arrival: float,
                 want_logprobs: bool) -> None:
        self._tok, self._metrics, self._stops = tokenizer, metrics, stops
        self.arrival, self._want_logprobs = arrival, want_logprobs
        self.first_token_at: Optional[float] = None    # perf_counter() of the first token
        self.prompt_tokens = [len(r.prompt_token_ids) for r in requests]
        self.completion_tokens = [0] * len(requests)
        self.cached_tokens = [0] * len(requests)     # prompt tokens the engine found cached
        self._queue: asyncio.Queue[Piece | BaseException | _End] = asyncio.Queue()
        self._streams: list[DeltaStream] = []
        try:
            for r in requests:   # submitted now, in order: arrival order in the engine
                self._streams.append(client.submit(r))   # type: ignore[arg-type]
        except BaseException:
            self.close()
            raise
        metrics.prompt_tokens.inc(sum(self.prompt_tokens))
        self._tasks = [asyncio.ensure_future(self._run(i, s)) for i, s in enumerate(self._streams)]

    async def pieces(self) -> AsyncIterator[Piece]:
        """Pieces of all choices until each has finished; raises the first failure."""
        remaining = len(self._tasks)
        while remaining:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, _End):
                remaining -= 1
                continue
            yield item

    def fail(self, exc: BaseException) -> None:
        """End the consumer's iteration with ``exc`` (e.g. the server is shutting down)."""
        self._queue.put_nowait(exc)

    def close(self) -> None:
        """Abort whatever still runs (idempotent)."""
        for t in getattr(self, "_tasks", []):
            t.cancel()
        for s in self._streams:
            s.close()

    async def _run(self, index: int, stream: DeltaStream) -> None:
        detok, stops = IncrementalDetokenizer(self._tok), StopMatcher(self._stops)
        last: Optional[float] = None
        try:
            async for d in stream:
                if d.finish_reason == FINISH_ERROR:
                    raise EngineFailure(d.error or "the engine failed this request")
                self.cached_tokens[index] = d.cached_tokens
                experts = ((self.completion_tokens[index], d.experts)
                           if d.experts is not None else None)
                if d.token_ids:
                    now = time.perf_counter()
                    if last is None:
                        self._metrics.ttft.observe(now - self.arrival)
                        if self.first_token_at is None:
                            self.first_token_at = now
                    else:
                        self._metrics.itl.observe(now - last)
                    last = now
                    self.completion_tokens[index] += len(d.token_ids)
                    self._metrics.generated_tokens.inc(len(d.token_ids))
                text = stops.feed("".join(detok.add(t) for t in d.token_ids))
                tokens = self._token_infos(d) if self._want_logprobs else []
                if stops.stopped:
                    stream.close()   # a stop string matched: the engine request is aborted
                    self._queue.put_nowait(Piece(index, text, tokens, FINISH_STOP, experts,
                                                 stops.matched))
                    return
                if d.finished:
                    if d.finish_reason not in (FINISH_STOP, FINISH_LENGTH):
                        raise EngineFailure(f"the engine ended the request ({d.finish_reason})")
                    text += stops.feed(detok.flush())
                    text += stops.flush()
                    reason = FINISH_STOP if stops.stopped else d.finish_reason
                    self._queue.put_nowait(Piece(index, text, tokens, reason, experts, stops.matched))
                    return
                if text or tokens or experts is not None:
                    self._queue.put_nowait(Piece(index, text, tokens, None, experts))
            raise EngineFailure("the engine stream ended without a final output")
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._queue.put_nowait(exc)
        finally:
            stream.close()
            self._queue.put_nowait(_End())

    @staticmethod
    def _token_infos(d: TokenDelta) -> list[TokenInfo]:
        out = []
        for k, tid in enumerate(d.token_ids):
            lp = d.logprobs[k] if d.logprobs is not None and k < len(d.logprobs) else None
            top = d.top_logprobs[k] if d.top_logprobs is not None and k < len(d.top_logprobs) else ()
            out.append(TokenInfo(tid, lp, tuple(top)))
        return out


def token_text(tok: TextTokenizer, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def _lp(value: Optional[float]) -> Optional[float]:
    """JSON has no NaN or -inf: -inf is OpenAI's -9999.0, NaN is null."""
    if value is None or math.isfinite(value):
        return value
    return -9999.0 if value < 0 else None


def chat_logprobs(tok: TextTokenizer, tokens: list[TokenInfo], top_n: int) -> dict[str, Any]:
    """OpenAI chat format: {"content": [{"token","logprob","bytes","top_logprobs":[...]}]}."""
    def entry(tid: int, lp: Optional[float]) -> dict[str, Any]:
        s = token_text(tok, tid)
        return {"token": s, "logprob": _lp(lp), "bytes": list(s.encode("utf-8"))}
    return {"content": [{**entry(t.token_id, t.logprob),
                         "top_logprobs": [entry(i, lp) for i, lp in t.top[:top_n]]}
                        for t in tokens]}


def completion_logprobs(tok: TextTokenizer, tokens: list[TokenInfo], top_n: int,
                        offset: int) -> dict[str, Any]:
    """Legacy format: tokens, token_logprobs, top_logprobs (dicts), text_offset."""
    texts = [token_text(tok, t.token_id) for t in tokens]
    offsets, pos = [], offset
    for s in texts:
        offsets.append(pos)
        pos += len(s)
    return {"tokens": texts, "token_logprobs": [_lp(t.logprob) for t in tokens],
            "top_logprobs": [{token_text(tok, i): _lp(lp) for i, lp in t.top[:top_n]}
                             for t in tokens],
            "text_offset": offsets}
