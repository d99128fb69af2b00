"""The FastAPI application: routes, auth, CORS, metrics, error envelopes. Never imports torch."""
from __future__ import annotations

import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from configs import ServerConfig
from engine.client import EngineClient, EngineNotReady
from server.errors import APIError, bad_request
from server.metrics import Metrics
from server.tokenizer import TextTokenizer

log = logging.getLogger("moeserve.server")

KNOWN_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


@dataclass
class ServerState:
    cfg: ServerConfig
    client: EngineClient
    tokenizer: TextTokenizer
    model_name: str
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "moeserve"}

    def check_model(self, requested: str | None) -> None:
        if requested and requested != self.model_name:
            raise APIError(404, f"The model '{requested}' does not exist; this server serves "
                                f"'{self.model_name}'", param="model", code="model_not_found")


class AuthMiddleware:
    """Bearer key on every route but /health and CORS preflights (OPTIONS)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app, self.key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and self.key and scope["method"] != "OPTIONS"
                and scope["path"] != "/health"):
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                     self.key.encode()):
                err = APIError(401, "Invalid or missing API key: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class MetricsMiddleware:
    """Counts every HTTP response by route and status (unknown paths grouped as 'other')."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        norm = path if path.startswith("/v1/") or path in ("/health", "/metrics") else "/v1" + path
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


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON whatever the Content-Type (curl -d sends a form type)."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body has {length} bytes; the limit is {limit}")
    raw = await request.body()
    if len(raw) > limit:
        raise APIError(413, f"the request body has {len(raw)} bytes; the limit is {limit}")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None


def create_app(cfg: ServerConfig, client: EngineClient, tokenizer: TextTokenizer,
               model_name: str) -> FastAPI:
    from server.openai_routes import add_openai_routes

    app = FastAPI(title="moeserve", docs_url=None, redoc_url=None, openapi_url=None)
    state = ServerState(cfg, client, tokenizer, model_name)
    app.state.moeserve = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        msg = (f"Unknown route {request.method} {request.url.path}" if exc.status_code == 404
               else str(exc.detail))
        return APIError(exc.status_code, msg).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()

    @app.get("/health")
    async def health() -> Response:
        if client.ready:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})

    @app.get("/metrics")
    async def metrics() -> Response:
        stats = None
        if client.ready:
            try:
                stats = await client.stats()
            except EngineNotReady:
                stats = None
        text = state.metrics.render(client.queue_depth, client.in_flight, stats, client.ready)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    for prefix in ("/v1", ""):
        @app.get(prefix + "/models")
        async def list_models() -> Response:
            return JSONResponse({"object": "list", "data": [state.model_card()]})

        @app.get(prefix + "/models/{model_id:path}")
        async def get_model(model_id: str) -> Response:
            if model_id != model_name:
                raise APIError(404, f"The model '{model_id}' does not exist", param="model",
                               code="model_not_found")
            return JSONResponse(state.model_card())

    add_openai_routes(app, state)
    # added last = outermost: CORS answers preflights before auth; metrics see 401s too
    app.add_middleware(AuthMiddleware, api_key=cfg.api_key)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["*"],
                       allow_headers=["*"], expose_headers=["Retry-After"], max_age=600)
    return app
