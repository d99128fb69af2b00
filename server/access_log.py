"""One access line per request at info (method, path, status, prompt and completion tokens, time),
and a warning/error line for each 4xx/5xx with the message the client got.

uvicorn's own access log (no tokens, no error message) stays off unless --log-level debug.
Successful /health and /metrics polls (every few seconds from a supervisor or Prometheus) are
logged at debug, so that the info log shows requests people made.
"""
from __future__ import annotations

import json
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("moeserve.access")

USAGE_KEY = "moeserve_usage"      # scope["state"][USAGE_KEY] = (prompt, completion), set by routes
_ERROR_BODY_LIMIT = 4096
_POLLED = frozenset({"/health", "/metrics"})


def record_usage(scope: Scope, prompt: int, completion: int) -> None:
    scope.setdefault("state", {})[USAGE_KEY] = (prompt, completion)


def _error_message(body: bytes) -> str:
    try:
        err = json.loads(body)["error"]
        msg = str(err.get("message"))
        return msg + (f" (param {err['param']})" if err.get("param") else "")
    except (ValueError, KeyError, TypeError, AttributeError):
        return body[:200].decode("utf-8", "replace") or "(no body)"


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status, body = [0], bytearray()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and status[0] >= 400 \
                    and len(body) < _ERROR_BODY_LIMIT:
                body.extend(message.get("body", b"")[:_ERROR_BODY_LIMIT - len(body)])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            code = status[0] or 500   # no response started: the app failed (or the client left)
            usage = scope.get("state", {}).get(USAGE_KEY)
            tokens = f" prompt={usage[0]} completion={usage[1]}" if usage else ""
            path = scope.get("path", "")
            quiet = code < 400 and path in _POLLED
            log.log(logging.DEBUG if quiet else logging.INFO, "%s %s %d%s %.3fs",
                    scope.get("method", "?"), path, code, tokens, time.perf_counter() - start)
            if code >= 400 and code != 499:
                level = logging.ERROR if code >= 500 else logging.WARNING
                log.log(level, "%d on %s %s: %s", code, scope.get("method", "?"), path,
                        _error_message(bytes(body)))
