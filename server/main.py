"""run_server: the HTTP process. Starts the engine client, serves with uvicorn, closes the engine on
shutdown, and exits non-zero when there is no engine to serve with (so a supervisor restarts it)."""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import sys
from types import FrameType
from typing import Any, AsyncIterator, Callable, Mapping, Optional

import uvicorn
from fastapi import FastAPI

from configs import ServerConfig
from configs.models import model_name
from engine.client import EngineClient, EngineStartError
from server.app import create_app
from server.defaults import load_generation_defaults
from server.responses import ShuttingDown
from server.state import ServerState
from server.tokenizer import TextTokenizer

log = logging.getLogger("moeserve.server")

EXIT_OK = 0
EXIT_ENGINE_START_FAILED = 3   # the engine could not be built (bad model, out of memory, ...)
EXIT_ENGINE_FAILED = 4         # the engine died and could not be restarted


def served_name(cfg: ServerConfig, model_dir: str) -> str:
    return cfg.served_model_name or model_name(model_dir)


class _Uvicorn(uvicorn.Server):
    """uvicorn.Server that tells the app when shutdown begins (signal or our own request)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: Optional[FrameType]) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


class ServerRun:
    """The app and its lifecycle: the engine starts in the background (/health says 'loading'
    meanwhile); no engine at all ends the process with a distinct exit code."""

    def __init__(self, cfg: ServerConfig, client: EngineClient, model_dir: str,
                 generation_fallback: Optional[Mapping[str, Any]] = None) -> None:
        self.cfg, self.client = cfg, client
        defaults = load_generation_defaults(model_dir, cfg.generation_config, generation_fallback)
        tok = TextTokenizer(model_dir, cfg.chat_template)
        self.app = create_app(cfg, client, tok, served_name(cfg, model_dir), defaults)
        self.state: ServerState = self.app.state.moeserve
        self.exit_code = EXIT_OK
        self.server: Optional[_Uvicorn] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.app.router.lifespan_context = self._lifespan

    def shutdown_started(self) -> None:
        """Give open requests the grace period, then end the streams still open with an error
        event (uvicorn would cut them without one)."""
        loop = self._loop
        if loop is None or self.state.shutting_down.is_set():
            return
        loop.call_soon_threadsafe(loop.call_later, self.cfg.shutdown_grace_s * 0.9,
                                  self.state.begin_shutdown, ShuttingDown())

    def _stop(self, code: int) -> None:
        self.exit_code = code
        self.shutdown_started()
        if self.server is not None:
            self.server.should_exit = True

    @contextlib.asynccontextmanager
    async def _lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        self._loop = asyncio.get_running_loop()

        async def start() -> None:
            try:
                await self.client.start()
            except EngineStartError as exc:
                log.critical("%s", exc)
                log.critical("no engine: the server exits (code %d)", EXIT_ENGINE_START_FAILED)
                self._stop(EXIT_ENGINE_START_FAILED)
                return
            why = await self.client.wait_failed()
            log.critical("%s: the server exits (code %d)", why, EXIT_ENGINE_FAILED)
            self._stop(EXIT_ENGINE_FAILED)

        task = asyncio.ensure_future(start())
        try:
            yield
        finally:
            task.cancel()
            log.info("shutting down: closing the engine")
            await self.client.close()


def build_app(cfg: ServerConfig, client: EngineClient, model_dir: str) -> FastAPI:
    """The app with a lifespan that starts the engine in the background and closes it at exit."""
    return ServerRun(cfg, client, model_dir).app


def _warn_if_exposed(cfg: ServerConfig) -> None:
    try:
        loopback = ipaddress.ip_address(cfg.host.strip("[]")).is_loopback
    except ValueError:
        loopback = cfg.host.lower() == "localhost"
    if not loopback and not cfg.api_key:
        log.warning("binding %s without an API key: anyone who can reach this address can use "
                    "the server; set --api-key (or MOESERVE_API_KEY)", cfg.host)


def run_server(server_cfg: ServerConfig, client: EngineClient, model_dir: str,
               generation_fallback: Optional[Mapping[str, Any]] = None) -> int:
    """Serve the OpenAI-compatible API for ``model_dir`` until interrupted; the exit code.
    ``generation_fallback``: default sampling values for keys the model's
    generation_config.json lacks (the built-in model's preset)."""
    run = ServerRun(server_cfg, client, model_dir, generation_fallback)
    if "torch" in sys.modules:
        log.warning("torch is imported in the HTTP process; the engine should live in its own "
                    "process (use engine.client.LazyFactory for the engine factory)")
    _warn_if_exposed(server_cfg)
    log.info("serving %s on http://%s:%d/v1 (auth %s)", served_name(server_cfg, model_dir),
             server_cfg.host, server_cfg.port, "on" if server_cfg.api_key else "off")
    config = uvicorn.Config(run.app, host=server_cfg.host, port=server_cfg.port,
                            log_level=server_cfg.log_level,
                            timeout_graceful_shutdown=max(1, round(server_cfg.shutdown_grace_s)),
                            access_log=server_cfg.log_level == "debug")
    run.server = _Uvicorn(config, run.shutdown_started)
    run.server.run()
    return run.exit_code
