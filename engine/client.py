"""EngineClient: how the async server talks to the engine, in this process or in a child process.

The server is written once against ``EngineClient``. ``InProcessEngineClient`` runs the engine loop
on a thread (tests, benchmarks); ``ProcessEngineClient`` runs it in a spawned child process so the
HTTP process never imports torch, and starts a fresh engine when the child dies.
"""
from __future__ import annotations

import abc
import asyncio
import importlib
import itertools
import logging
import queue
import threading
from typing import Any, AsyncIterator, Callable, Optional

from engine.client_loop import (EngineLike, Rejected, Shutdown, StatsQuery, StatsReply,
                                StatsSnapshot, StepOutput, run_loop)
from engine.protocol import AbortRequest, EngineStats, GenerateRequest, ModelInfo, TokenDelta

log = logging.getLogger("moeserve.engine.client")


class EngineNotReady(RuntimeError):
    """The engine is starting (or restarting); retry later (HTTP 503)."""


class RequestRejected(ValueError):
    """The engine refused the request (empty/over-long prompt, bad token id, duplicate id)."""


class EngineFailure(RuntimeError):
    """The engine died or failed while serving the request (HTTP 500)."""


class EngineStartError(RuntimeError):
    """The engine could not be built; the message carries the child's traceback."""


class LazyFactory:
    """A picklable factory naming its target as 'module:function', imported only where it runs.

    ``LazyFactory("moeserve.wiring:build_engine", ecfg, ccfg)`` keeps torch out of the HTTP process:
    a functools.partial would need the function (and thus torch) imported in the parent.
    """

    def __init__(self, target: str, *args: Any, **kwargs: Any) -> None:
        if ":" not in target:
            raise ValueError(f"LazyFactory target {target!r}: expected 'module:function'")
        self.target, self.args, self.kwargs = target, args, kwargs

    def __call__(self) -> EngineLike:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)(*self.args, **self.kwargs)


class DeltaStream:
    """Async iterator over one request's TokenDeltas; ends after the finished delta.

    Closing it early (client went away) aborts the request in the engine.
    """

    def __init__(self, client: "_LoopClient", request_id: str) -> None:
        self._client, self.request_id = client, request_id
        self._queue: asyncio.Queue[TokenDelta | BaseException] = asyncio.Queue()
        self.done = False

    def __aiter__(self) -> "DeltaStream":
        return self

    async def __anext__(self) -> TokenDelta:
        if self.done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.done = True
            raise item
        if item.finished:
            self.done = True
        return item

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """Stop listening; if the request still runs, abort it (its final delta is dropped)."""
        if not self.done:
            self.done = True
            self._client._detach(self.request_id)


class EngineClient(abc.ABC):
    """The server's view of the engine."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the engine and wait until it is ready (raises EngineStartError)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop the engine, failing any request still in flight."""

    @abc.abstractmethod
    def submit(self, req: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Queue ``req`` now (arrival order); iterate for its deltas. Raises EngineNotReady;
        the iterator raises RequestRejected or EngineFailure."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Abort a request; unknown ids are ignored."""

    @abc.abstractmethod
    async def stats(self) -> EngineStats:
        """The engine's counters (raises EngineNotReady when there is no engine)."""

    @property
    @abc.abstractmethod
    def ready(self) -> bool:
        """True while an engine is up and accepting requests."""

    @property
    def snapshot(self) -> Optional[EngineStats]:
        """The engine's latest published counters (no round trip; None before the first)."""
        return None

    @property
    def failure(self) -> Optional[str]:
        """Why the engine is gone for good (no restart will be tried), else None."""
        return None

    async def wait_failed(self) -> str:
        """Return ``failure`` once the engine is gone for good (never, by default)."""
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    @property
    @abc.abstractmethod
    def model_info(self) -> ModelInfo:
        """The loaded model (raises EngineNotReady before the first start)."""

    @property
    @abc.abstractmethod
    def queue_depth(self) -> int:
        """Submitted requests that have not produced their first output yet."""

    @property
    @abc.abstractmethod
    def in_flight(self) -> int:
        """Submitted requests that have not finished yet."""


class _LoopClient(EngineClient):
    """Shared client side of the engine loop: routing outputs to streams, stats round trips."""

    def __init__(self) -> None:
        self._streams: dict[str, DeltaStream] = {}
        self._detached: set[str] = set()   # aborted by us; waiting for the engine's final delta
        self._no_output_yet: set[str] = set()
        self._stats_waiters: dict[int, asyncio.Future[EngineStats]] = {}
        self._tokens = itertools.count()
        self._info: Optional[ModelInfo] = None
        self._ready = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._snapshot: Optional[EngineStats] = None
        self._failure: Optional[str] = None
        self._failed: Optional[asyncio.Future[str]] = None

    @property
    def snapshot(self) -> Optional[EngineStats]:
        return self._snapshot

    @property
    def failure(self) -> Optional[str]:
        return self._failure

    async def wait_failed(self) -> str:
        if self._failed is None:
            self._failed = asyncio.get_running_loop().create_future()
            if self._failure is not None:
                self._failed.set_result(self._failure)
        return await asyncio.shield(self._failed)

    def _set_failed(self, why: str) -> None:
        """The engine is gone and will not come back: /health says so and the server exits."""
        self._failure = why
        if self._failed is not None and not self._failed.done():
            self._failed.set_result(why)

    @abc.abstractmethod
    def _send(self, msg: Any) -> None:
        """Put one message in the engine loop's inbox (never blocks)."""

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def model_info(self) -> ModelInfo:
        if self._info is None:
            raise EngineNotReady("the engine has not started yet")
        return self._info

    @property
    def queue_depth(self) -> int:
        return len(self._no_output_yet)

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    def submit(self, req: GenerateRequest) -> DeltaStream:
        if not self._ready:
            raise EngineNotReady("the engine is not ready")
        if req.request_id in self._streams or req.request_id in self._detached:
            raise RequestRejected(f"duplicate request_id {req.request_id!r}")
        stream = DeltaStream(self, req.request_id)
        self._streams[req.request_id] = stream
        self._no_output_yet.add(req.request_id)
        self._send(req)
        return stream

    async def abort(self, request_id: str) -> None:
        if self._ready:
            self._send(AbortRequest(request_id))

    def _detach(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self._no_output_yet.discard(request_id)
            self._detached.add(request_id)
            if self._ready:
                self._send(AbortRequest(request_id))

    async def stats(self) -> EngineStats:
        if not self._ready or self._loop is None:
            raise EngineNotReady("the engine is not ready")
        token = next(self._tokens)
        fut: asyncio.Future[EngineStats] = self._loop.create_future()
        self._stats_waiters[token] = fut
        self._send(StatsQuery(token))
        return await fut

    # ---- called on the event loop with the engine loop's messages ----
    def _on_message(self, msg: Any) -> None:
        if isinstance(msg, StepOutput):
            for delta in msg.deltas:
                self._route(delta.request_id, delta, delta.finished)
        elif isinstance(msg, StatsSnapshot):
            self._snapshot = msg.stats
        elif isinstance(msg, Rejected):
            self._route(msg.request_id, RequestRejected(msg.message), True)
        elif isinstance(msg, StatsReply):
            fut = self._stats_waiters.pop(msg.token, None)
            if fut is not None and not fut.done():
                fut.set_result(msg.stats)
        else:
            log.error("engine client: unexpected message %r", type(msg).__name__)

    def _route(self, request_id: str, item: TokenDelta | BaseException, final: bool) -> None:
        self._no_output_yet.discard(request_id)
        stream = self._streams.get(request_id)
        if stream is not None:
            stream._queue.put_nowait(item)
            if final:
                del self._streams[request_id]
        elif final:
            self._detached.discard(request_id)

    def _fail_all(self, why: str) -> None:
        """The engine is gone: every in-flight request and stats query fails."""
        for stream in self._streams.values():
            stream._queue.put_nowait(EngineFailure(why))
        self._streams.clear()
        self._detached.clear()
        self._no_output_yet.clear()
        for fut in self._stats_waiters.values():
            if not fut.done():
                fut.set_exception(EngineNotReady(why))
        self._stats_waiters.clear()


class InProcessEngineClient(_LoopClient):
    """The engine loop on a thread of this process (tests and benchmarks)."""

    def __init__(self, factory: Callable[[], EngineLike]) -> None:
        super().__init__()
        self._factory = factory
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._thread: Optional[threading.Thread] = None

    def _send(self, msg: Any) -> None:
        self._inbox.put(msg)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        started: asyncio.Future[ModelInfo] = self._loop.create_future()
        loop = self._loop

        def body() -> None:
            try:
                engine = self._factory()
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                loop.call_soon_threadsafe(_set_exc, started, EngineStartError(repr(exc)))
                return
            loop.call_soon_threadsafe(_set_result, started, engine.model_info)
            try:
                run_loop(engine, self._inbox, lambda m: loop.call_soon_threadsafe(self._on_message, m))
            except BaseException:
                log.exception("engine loop failed")
                loop.call_soon_threadsafe(self._on_dead, "the engine failed")

        self._thread = threading.Thread(target=body, name="engine-loop", daemon=True)
        self._thread.start()
        self._info = await started
        self._ready = True

    def _on_dead(self, why: str) -> None:
        self._ready = False
        self._fail_all(why)
        self._set_failed(why)   # an in-process engine is not restarted

    async def close(self) -> None:
        if self._thread is None:
            return
        self._ready = False
        self._inbox.put(Shutdown())
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self._fail_all("the engine was shut down")
        self._thread = None


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exc(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


from engine.client_process import ProcessEngineClient  # noqa: E402 - re-export

__all__ = ["EngineClient", "InProcessEngineClient", "ProcessEngineClient", "LazyFactory",
           "DeltaStream", "EngineNotReady", "RequestRejected", "EngineFailure", "EngineStartError"]
