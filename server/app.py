"""The FastAPI application: routes, middleware order, error envelopes. Never imports torch."""
from __future__ import annotations

import logging
from typing import Optional

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from configs import ServerConfig
from engine.client import EngineClient
from server.access_log import AccessLogMiddleware
from server.defaults import GenerationDefaults
from server.errors import APIError, JSONBody
from server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from server.metrics import Metrics
from server.openai_routes import add_openai_routes
from server.responses_route import add_responses_routes
from server.anthropic_route import add_messages_routes
from server.ollama_route import add_ollama_routes
from server.openapi import install_openapi
from server.security import (AuthMiddleware, HostCheckMiddleware, OriginCheckMiddleware,
                             OriginPolicy)
from server.state import ServerState
from server.tokenizer import TextTokenizer
from server.webui import add_web_ui

log = logging.getLogger("moeserve.server")

KNOWN_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages",
                "/v1/models", "/health", "/metrics", "/openapi.json", "/ui", "/api/chat",
                "/api/generate", "/api/tags", "/api/show", "/api/ps", "/api/version")


class MetricsMiddleware:
    """Counts every HTTP response by route and status (unknown paths grouped as 'other')."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path == "/":
            route = "/"   # the chat page
        else:
            norm = path if path.startswith(("/v1/", "/ui/")) or path in KNOWN_ROUTES else "/v1" + path
            route = next((r for r in KNOWN_ROUTES if norm == r or norm.startswith(r + "/")), "other")
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.request_done(route, status[0])


def health_response(client: EngineClient) -> Response:
    """ok (200); loading or restarting (503, Retry-After); failed for good (503, no retry)."""
    if client.ready:
        return JSONBody({"status": "ok"})
    if client.failure is not None:
        return JSONBody({"status": "failed", "error": {
            "message": client.failure, "type": "server_error", "param": None,
            "code": "engine_failed"}}, status_code=503)
    status = "restarting" if getattr(client, "restarting", False) else "loading"
    return JSONBody({"status": status}, status_code=503, headers={"Retry-After": "5"})


def create_app(cfg: ServerConfig, client: EngineClient, tokenizer: TextTokenizer,
               model_name: str, defaults: Optional[GenerationDefaults] = None) -> FastAPI:
    app = FastAPI(title="moeserve", version="0.1.0", docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    state = ServerState(cfg, client, tokenizer, model_name,
                        defaults=defaults or GenerationDefaults())
    app.state.moeserve = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return exc.response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        msg = (f"Unknown route {request.method} {request.url.path}" if exc.status_code == 404
               else str(exc.detail))
        # the headers keep Allow
        return APIError(exc.status_code, msg, headers=exc.headers).response(request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}").response(request.url.path)

    @app.get("/health", summary="Readiness", responses={503: {"description": "not ready"}})
    async def health() -> Response:
        return health_response(client)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        # the engine publishes its counters as it steps: a scrape never waits for a long step
        stats = client.snapshot if client.ready else None
        text = state.metrics.render(client.queue_depth, client.in_flight, stats, client.ready)
        return PlainTextResponse(text, media_type=METRICS_CONTENT_TYPE)

    for prefix in ("/v1", ""):
        @app.get(prefix + "/models", include_in_schema=prefix == "/v1", summary="List models")
        async def list_models() -> Response:
            # OpenAI's list, with Anthropic's paging fields (one page)
            return JSONBody({"object": "list", "data": [state.model_card()], "has_more": False,
                             "first_id": model_name, "last_id": model_name})

        @app.get(prefix + "/models/{model_id:path}", include_in_schema=prefix == "/v1",
                 summary="Retrieve a model", responses={404: {"description": "unknown model"}})
        async def get_model(model_id: str) -> Response:
            if model_id != model_name:
                raise APIError(404, f"The model '{model_id[:200]}' does not exist", param="model",
                               code="model_not_found")
            return JSONBody(state.model_card())

    add_openai_routes(app, state)
    add_responses_routes(app, state)
    add_messages_routes(app, state)
    add_ollama_routes(app, state)
    if cfg.web_ui:
        add_web_ui(app)
    install_openapi(app)
    # added last = outermost: Host first, then CORS answers preflights before the origin check
    # and auth; metrics see 401s and 403s too
    policy = OriginPolicy(cfg.cors_origins)
    app.add_middleware(AuthMiddleware, api_key=cfg.api_key)
    app.add_middleware(OriginCheckMiddleware, policy=policy)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.add_middleware(CORSMiddleware, allow_origins=[o for o in policy.origins],
                       allow_origin_regex=policy.regex, allow_methods=["*"], allow_headers=["*"],
                       expose_headers=["Retry-After"], max_age=600)
    app.add_middleware(HostCheckMiddleware, bound=cfg.host, allowed=cfg.allowed_hosts)
    app.add_middleware(AccessLogMiddleware)   # outermost: every request gets its line
    return app
