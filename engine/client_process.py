"""ProcessEngineClient: the engine loop in a spawned child process, restarted when it dies.

Transport: a multiprocessing Queue into the child (put never blocks the event loop: a feeder
thread writes) and a one-way Pipe out of it, read by a thread that waits on the pipe and the
process sentinel together, so a dead child is noticed at once without polling.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import multiprocessing.connection as mpc
import threading
from typing import Any, Callable, Optional

from engine.client import (EngineStartError, _LoopClient, _set_exc, _set_result)
from engine.client_loop import EngineLike, Ready, Shutdown, StartFailed, child_main

log = logging.getLogger("moeserve.engine.client")

MAX_RESTARTS_WITHOUT_READY = 3   # a child that keeps dying while starting is not retried forever


class ProcessEngineClient(_LoopClient):
    """Runs ``factory()`` (picklable; see LazyFactory) and its engine loop in a child process."""

    def __init__(self, factory: Callable[[], EngineLike], *, start_timeout: float = 1800.0,
                 log_level: str = "info") -> None:
        super().__init__()
        self._factory, self._start_timeout, self._log_level = factory, start_timeout, log_level
        self._ctx = mp.get_context("spawn")
        self._proc: Optional[mp.process.BaseProcess] = None
        self._inbox: Any = None
        self._gen = 0                 # incarnation; messages from an older child are dropped
        self._closing = False
        self._started: Optional[asyncio.Future[Any]] = None
        self._restart_task: Optional[asyncio.Task[None]] = None
        self.restarts = 0
        self.failed_permanently = False

    @property
    def pid(self) -> Optional[int]:
        """The engine process's pid (None when there is none)."""
        return self._proc.pid if self._proc is not None else None

    def _send(self, msg: Any) -> None:
        self._inbox.put(msg)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._spawn()

    async def _spawn(self) -> None:
        assert self._loop is not None
        self._gen += 1
        gen = self._gen
        self._started = self._loop.create_future()
        self._retire_inbox()
        self._inbox = self._ctx.Queue()
        out_r, out_w = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(target=child_main, name="moeserve-engine", daemon=True,
                                 args=(self._factory, self._inbox, out_w, self._log_level,
                                       os.getpid()))
        proc.start()
        out_w.close()   # the child holds the only write end: EOF on our side means it is gone
        self._proc = proc
        log.info("engine process started (pid %d)", proc.pid)
        threading.Thread(target=self._read, args=(gen, proc, out_r), daemon=True,
                         name=f"engine-reader-{gen}").start()
        try:
            info = await asyncio.wait_for(asyncio.shield(self._started), self._start_timeout)
        except asyncio.TimeoutError:
            proc.kill()
            raise EngineStartError(f"the engine did not start within {self._start_timeout:.0f}s")
        self._info = info
        self._ready = True
        log.info("engine ready: model %s, context %d", info.name, info.context_length)

    def _read(self, gen: int, proc: mp.process.BaseProcess, conn: mpc.Connection) -> None:
        """Reader thread: forward every message to the event loop; report the child's exit."""
        assert self._loop is not None
        while True:
            ready = mpc.wait([conn, proc.sentinel])
            if conn not in ready:
                if not conn.poll():
                    break          # dead and nothing left to read
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # noqa: BLE001 - a message cut by a dying child
                log.exception("engine message could not be read")
                break
            self._loop.call_soon_threadsafe(self._on_child_message, gen, msg)
        proc.join()
        conn.close()
        self._loop.call_soon_threadsafe(self._on_exit, gen, proc.exitcode)

    def _on_child_message(self, gen: int, msg: Any) -> None:
        if gen != self._gen:
            return
        if isinstance(msg, Ready):
            assert self._started is not None
            _set_result(self._started, msg.model_info)
        elif isinstance(msg, StartFailed):
            assert self._started is not None
            _set_exc(self._started, EngineStartError(f"the engine failed to start:\n{msg.message}"))
        else:
            self._on_message(msg)

    def _on_exit(self, gen: int, exitcode: Optional[int]) -> None:
        if gen != self._gen:
            return
        was_ready = self._ready
        self._ready = False
        if self._started is not None:
            _set_exc(self._started, EngineStartError(
                f"the engine process exited with code {exitcode} while starting"))
        if self._closing:
            return
        why = f"the engine process exited unexpectedly (code {exitcode})"
        log.error("%s; %d request(s) failed; starting a new engine", why, len(self._streams))
        self._fail_all(why)
        if was_ready and (self._restart_task is None or self._restart_task.done()):
            self._restart_task = asyncio.ensure_future(self._restart())

    @property
    def restarting(self) -> bool:
        return self._restart_task is not None and not self._restart_task.done()

    async def _restart(self) -> None:
        for attempt in range(1, MAX_RESTARTS_WITHOUT_READY + 1):
            if self._closing:
                return
            if attempt > 1:
                await asyncio.sleep(min(2.0 ** (attempt - 1), 30.0))   # back off between tries
            try:
                await self._spawn()
                self.restarts += 1
                log.warning("engine restarted (restart #%d)", self.restarts)
                return
            except EngineStartError as exc:
                log.error("engine restart attempt %d failed: %s", attempt, exc)
        self.failed_permanently = True
        why = f"the engine could not be restarted ({MAX_RESTARTS_WITHOUT_READY} attempts failed)"
        log.critical("%s", why)
        self._set_failed(why)

    def _retire_inbox(self) -> None:
        """Close the previous child's queue and drop it, so that its semaphores are unlinked now
        (the process may end by a re-raised SIGTERM, which skips multiprocessing's finalizers and
        makes the resource tracker warn about 'leaked semaphore objects')."""
        inbox, self._inbox = self._inbox, None
        if inbox is None:
            return
        inbox.close()
        # the feeder thread holds two of the semaphores until it has flushed; the child is gone,
        # so wait for it briefly in a daemon thread rather than risk blocking on a full pipe
        joiner = threading.Thread(target=inbox.join_thread, daemon=True)
        joiner.start()
        joiner.join(2.0)

    async def close(self) -> None:
        self._closing = True
        self._ready = False
        if self._restart_task is not None and not self._restart_task.done():
            self._restart_task.cancel()
        proc = self._proc
        if proc is None:
            return
        if proc.is_alive():
            self._inbox.put(Shutdown())
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, proc.join, 30.0)
            if proc.is_alive():
                log.warning("engine process did not stop in 30s; killing it")
                proc.kill()
                await loop.run_in_executor(None, proc.join, 5.0)
        self._fail_all("the engine was shut down")
        self._retire_inbox()
        self._proc = None
        log.info("engine process stopped")
