"""The served /openapi.json: request bodies from the pydantic schemas (the handlers read the body
themselves, so FastAPI cannot infer them) and the error envelope for every documented status."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

_REF = "#/components/schemas/{model}"
_DEFS: dict[str, Any] = {}

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"],
                             "properties": {"message": {"type": "string"},
                                            "type": {"type": "string"},
                                            "param": {"type": ["string", "null"]},
                                            "code": {"type": ["string", "null"]}}}}}
# Ollama's envelope, on its /api/ routes
OLLAMA_ERROR_SCHEMA: dict[str, Any] = {"type": "object", "required": ["error"],
                                       "properties": {"error": {"type": "string"}}}
# Anthropic's envelope, on the Messages API's routes
ANTHROPIC_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["type", "error"],
    "properties": {"type": {"const": "error"},
                   "error": {"type": "object", "required": ["type", "message"],
                             "properties": {"type": {"type": "string"},
                                            "message": {"type": "string"}}}}}

_STATUS = {"400": "invalid request (the error names the field in `param`)",
           "401": "missing or wrong API key", "403": "Host or Origin not allowed",
           "404": "unknown model or route", "405": "method not allowed",
           "413": "request body too large", "429": "the queue is full; retry after Retry-After",
           "500": "the engine failed", "503": "the engine is loading, restarting or failed"}


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra for an operation whose JSON body is ``model``."""
    schema = model.model_json_schema(ref_template=_REF)
    _DEFS.update(schema.pop("$defs", {}))
    _DEFS[model.__name__] = schema
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": _REF.format(model=model.__name__)}}}}}


def error_responses(*statuses: str, envelope: str = "ErrorResponse",
                    stream_type: str = "text/event-stream") -> dict[str, Any]:
    """The responses of a generation route; ``envelope``: its errors' schema (ErrorResponse,
    AnthropicErrorResponse or OllamaErrorResponse); ``stream_type``: its streams' media type."""
    out: dict[str, Any] = {"200": {"description": "the completion (JSON, or SSE when stream is "
                                                  "true)",
                                   "content": {"application/json": {"schema": {"type": "object"}},
                                               stream_type: {"schema": {
                                                   "type": "object", "properties": {
                                                       "data": {"type": "string"}}}}}}}
    for code in statuses or tuple(_STATUS):
        out[code] = {"description": _STATUS[code],
                     "content": {"application/json": {"schema": {"$ref": _REF.format(
                         model=envelope)}}}}
    return out


def install_openapi(app: FastAPI) -> None:
    """app.openapi() with the collected body schemas and the error envelope as components."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                              description="OpenAI-compatible local MoE inference server")
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(_DEFS)
            schemas["ErrorResponse"] = ERROR_SCHEMA
            schemas["AnthropicErrorResponse"] = ANTHROPIC_ERROR_SCHEMA
            schemas["OllamaErrorResponse"] = OLLAMA_ERROR_SCHEMA
            app.openapi_schema = doc
        return app.openapi_schema
    app.openapi = openapi   # type: ignore[method-assign]
