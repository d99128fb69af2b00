"""The OpenAI error envelope: {"error": {"message", "type", "param", "code"}} with a matching status
(Anthropic's {"type": "error", "error": {"type", "message"}} on the Messages API's routes, Ollama's
{"error": "..."} on its /api/ routes), and the one JSON encoder every response uses (never
NaN/Infinity, never a lone surrogate)."""
from __future__ import annotations

import json
import math
from typing import Any, Mapping, Optional

from starlette.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}
# Anthropic's error types by status (its 529 "overloaded" is our 503)
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                    429: "rate_limit_error", 500: "api_error", 503: "overloaded_error"}
ANTHROPIC_ROUTES = ("/v1/messages", "/messages")


def anthropic_route(path: str) -> bool:
    """Whether ``path`` is one of the Messages API's (its errors take Anthropic's shape)."""
    return any(path == r or path.startswith(r + "/") for r in ANTHROPIC_ROUTES)


def ollama_route(path: str) -> bool:
    """Whether ``path`` is one of Ollama's API (its errors are {"error": "..."})."""
    return path.startswith("/api/")


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any) -> str:
    """Strict JSON text: a stray NaN/inf becomes null instead of the invalid literal `NaN`."""
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:
        return json.dumps(finite(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def encode(obj: Any) -> bytes:
    text = dumps(obj)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:   # a lone surrogate (e.g. from a percent-decoded path): escape it
        return json.dumps(finite(obj), ensure_ascii=True, separators=(",", ":")).encode()


class JSONBody(JSONResponse):
    """JSONResponse rendered with ``encode``."""

    def render(self, content: Any) -> bytes:
        return encode(content)


class APIError(Exception):
    """Raised anywhere in a handler; turned into the envelope with its status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, retry_after: Optional[int] = None,
                 headers: Optional[Mapping[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after
        self.headers = dict(headers or {})

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error" if self.status >= 500
                          else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    @property
    def named_message(self) -> str:
        """The message starting with the field it is about ("FIELD: ..."), as Anthropic's and
        Ollama's envelopes, which have no field of their own for it, carry it."""
        message = self.message
        if self.param:
            message = message.removeprefix(f"invalid '{self.param}': ")   # the schema's form
            if not message.startswith(self.param):
                message = f"{self.param}: {message}"
        return message

    def anthropic_body(self) -> dict[str, Any]:
        kind = _ANTHROPIC_TYPES.get(self.status, "api_error" if self.status >= 500
                                    else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": self.named_message}}

    def ollama_body(self) -> dict[str, Any]:
        return {"error": self.named_message}

    def response(self, path: str = "") -> JSONResponse:
        """The error's response; on the Messages API's routes in Anthropic's shape, on Ollama's
        in its."""
        headers = dict(self.headers)
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        body = (self.anthropic_body() if anthropic_route(path) else
                self.ollama_body() if ollama_route(path) else self.body())
        return JSONBody(body, status_code=self.status, headers=headers or None)

    def sse_event(self) -> bytes:
        """The error as an SSE event, for failures after streaming began."""
        return b"data: " + encode(self.body()) + b"\n\n"


def bad_request(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param)


def renamed(exc: APIError, names: tuple[tuple[str, str], ...],
            tool_fields: Mapping[str, str] = {}, flatten_tools: bool = True) -> APIError:
    """An error of the chat request that another API's request became, naming that API's field:
    ``names`` maps chat fields (and their subfields) to its own, ``messages`` as a whole (its
    indices count turns the conversion merged or split); ``tools.N.function.F`` is
    ``tools.N.F`` (unless not ``flatten_tools``), with F renamed by ``tool_fields``."""
    p = exc.param or ""
    for chat, ours in names:
        if p == chat or p.startswith(chat + "."):
            exc.param = ours if chat == "messages" else ours + p[len(chat):]
            break
    parts = p.split(".")
    if flatten_tools and len(parts) >= 3 and parts[0] == "tools" and parts[2] == "function":
        rest = parts[3:]
        if rest:
            rest[0] = tool_fields.get(rest[0], rest[0])
        exc.param = ".".join(parts[:2] + rest)
    if exc.param != p:   # the schema's message names the field too
        exc.message = exc.message.replace(f"invalid '{p}'", f"invalid '{exc.param}'")
    return exc
