"""The engine loop shared by the in-process and the child-process EngineClient.

One thread owns the Engine: drain the inbox (new requests, aborts, stats queries) -> one step ->
emit the outputs. When there is no work it blocks on the inbox instead of spinning. This module
imports no torch: the Engine arrives through a factory that runs inside the loop's thread/process.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

from engine.protocol import AbortRequest, EngineStats, GenerateRequest, ModelInfo, TokenDelta

log = logging.getLogger("moeserve.engine.loop")


class EngineLike(Protocol):
    """The part of engine.engine.Engine that the loop drives (kept structural: no torch import)."""

    model_info: ModelInfo

    def add_request(self, req: GenerateRequest) -> None: ...
    def abort(self, request_id: str) -> None: ...
    def has_work(self) -> bool: ...
    def step(self) -> list[TokenDelta]: ...
    def stats(self) -> EngineStats: ...
    def close(self) -> None: ...


# ---- messages, client -> loop -------------------------------------------------------------------
@dataclass(frozen=True)
class StatsQuery:
    token: int


@dataclass(frozen=True)
class Shutdown:
    pass


# ---- messages, loop -> client -------------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    model_info: ModelInfo


@dataclass(frozen=True)
class StartFailed:
    message: str


@dataclass(frozen=True)
class Rejected:
    """add_request refused the request (ValueError): a client error, answered 400."""

    request_id: str
    message: str


@dataclass(frozen=True)
class StepOutput:
    deltas: tuple[TokenDelta, ...]


@dataclass(frozen=True)
class StatsReply:
    token: int
    stats: EngineStats


@dataclass(frozen=True)
class StatsSnapshot:
    """The engine's counters, published by the loop as it steps (so /metrics never waits on it)."""

    stats: EngineStats


Inbound = GenerateRequest | AbortRequest | StatsQuery | Shutdown
Outbound = Ready | StartFailed | Rejected | StepOutput | StatsReply | StatsSnapshot

SNAPSHOT_EVERY_S = 0.25   # stats are a dict of cache counters: cheap, but not worth every step
PARENT_CHECK_S = 0.25


class Inbox(Protocol):
    """queue.Queue and multiprocessing.Queue both fit."""

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any: ...
    def get_nowait(self) -> Any: ...


def _drain(inbox: Inbox, block: bool) -> list[Any]:
    msgs: list[Any] = []
    if block:
        msgs.append(inbox.get())
    while True:
        try:
            msgs.append(inbox.get_nowait())
        except queue.Empty:
            return msgs


def run_loop(engine: EngineLike, inbox: Inbox, emit: Callable[[Outbound], None]) -> None:
    """Serve ``engine`` until a Shutdown message arrives; then close it.

    An exception from engine.step() propagates: the engine's state is unknown afterwards, so the
    owner treats it like a crash (the process client restarts a fresh engine).
    """
    last_snapshot = 0.0
    try:
        emit(StatsSnapshot(engine.stats()))
        while True:
            for msg in _drain(inbox, block=not engine.has_work()):
                if isinstance(msg, GenerateRequest):
                    try:
                        engine.add_request(msg)
                    except ValueError as exc:
                        emit(Rejected(msg.request_id, str(exc)))
                elif isinstance(msg, AbortRequest):
                    engine.abort(msg.request_id)
                elif isinstance(msg, StatsQuery):
                    emit(StatsReply(msg.token, engine.stats()))
                elif isinstance(msg, Shutdown):
                    return
                else:
                    log.error("engine loop: ignoring unknown message %r", type(msg).__name__)
            if engine.has_work():
                deltas = engine.step()
                if deltas:
                    emit(StepOutput(tuple(deltas)))
                now = time.monotonic()
                if now - last_snapshot >= SNAPSHOT_EVERY_S or not engine.has_work():
                    last_snapshot = now
                    emit(StatsSnapshot(engine.stats()))
    finally:
        engine.close()


def _exit_with_parent(parent_pid: int) -> None:
    """Exit as soon as the server process is gone (kill -9, OOM killer): the orphaned engine
    would otherwise keep its gigabytes, and a restarted server would start a second one."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_S)   # getppid() changes when we are re-parented
        log.error("the server process (pid %d) is gone; the engine exits", parent_pid)
        os._exit(70)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def child_main(factory: Callable[[], EngineLike], inbox: Inbox, out: Any, log_level: str,
               parent_pid: Optional[int] = None) -> None:
    """Entry point of the engine process (spawn): build the engine, report, serve."""
    if parent_pid is not None:
        _exit_with_parent(parent_pid)
    # Ctrl-C in a terminal reaches the whole process group: the server alone handles it and
    # shuts the engine down with a Shutdown message (no half-finished step, no traceback)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s [engine] %(name)s: %(message)s")
    try:
        engine = factory()
    except BaseException:  # noqa: BLE001 - any failure to build is reported, then the child exits
        out.send(StartFailed(traceback.format_exc()))
        return
    out.send(Ready(engine.model_info))
    run_loop(engine, inbox, out.send)
