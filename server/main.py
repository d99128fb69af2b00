"""run_server: the HTTP process. Starts the engine client, serves with uvicorn, closes the engine on
shutdown (SIGINT/SIGTERM are handled by uvicorn's graceful shutdown)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from typing import AsyncIterator

import uvicorn
from fastapi import FastAPI

from configs import ServerConfig
from engine.client import EngineClient, EngineStartError
from server.app import create_app
from server.tokenizer import TextTokenizer

log = logging.getLogger("moeserve.server")


def served_name(cfg: ServerConfig, model_dir: str) -> str:
    return cfg.served_model_name or os.path.basename(os.path.normpath(model_dir))


def build_app(cfg: ServerConfig, client: EngineClient, model_dir: str) -> FastAPI:
    """The app with a lifespan that starts the engine in the background and closes it at exit.

    The engine starts in the background so /health answers 503 "loading" meanwhile.
    """
    app = create_app(cfg, client, TextTokenizer(model_dir), served_name(cfg, model_dir))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async def start() -> None:
            try:
                await client.start()
            except EngineStartError as exc:
                log.critical("%s", exc)
                os.kill(os.getpid(), 15)   # nothing to serve: shut the server down
        task = asyncio.ensure_future(start())
        try:
            yield
        finally:
            task.cancel()
            log.info("shutting down: closing the engine")
            await client.close()

    app.router.lifespan_context = lifespan
    return app


def run_server(server_cfg: ServerConfig, client: EngineClient, model_dir: str) -> None:
    """Serve the OpenAI-compatible API for ``model_dir`` until interrupted."""
    app = build_app(server_cfg, client, model_dir)
    if "torch" in sys.modules:
        log.warning("torch is imported in the HTTP process; the engine should live in its own "
                    "process (use engine.client.LazyFactory for the engine factory)")
    log.info("serving %s on http://%s:%d/v1 (auth %s)", served_name(server_cfg, model_dir),
             server_cfg.host, server_cfg.port, "on" if server_cfg.api_key else "off")
    uvicorn.run(app, host=server_cfg.host, port=server_cfg.port, log_level=server_cfg.log_level,
                timeout_graceful_shutdown=10, access_log=server_cfg.log_level == "debug")
