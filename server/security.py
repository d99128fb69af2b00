"""Who may talk to the server: the API key, the Host header (DNS rebinding), the Origin of browser
requests, and CORS. Defaults are those of the local servers people trust: loopback only."""
from __future__ import annotations

import hmac
import ipaddress
import re
from typing import Optional, Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import APIError
from server.webui import is_page_path

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# http(s)://localhost, 127.x.y.z or [::1], any port: pages served from this machine
LOOPBACK_ORIGIN = r"https?://(localhost|127(\.[0-9]{1,3}){3}|\[::1\])(:[0-9]{1,5})?"
# desktop apps and editor extensions (Electron, Tauri, VS Code webviews), which Ollama allows by
# default: no web page can send these origins (a file:// page sends "null")
APP_ORIGIN = r"(app|file|tauri|vscode-webview|vscode-file)://[^\s]*"


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def host_name(header: str) -> str:
    """'example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _header(scope: Scope, name: bytes) -> Optional[bytes]:
    for k, v in scope["headers"]:
        if k == name:
            return v
    return None


class HostCheckMiddleware:
    """403 unless Host names the bound address, a loopback name, an IP literal (a rebinding page
    reaches us under its own DNS name, never an IP) or one of ``allowed`` ('*': any)."""

    def __init__(self, app: ASGIApp, bound: str, allowed: Sequence[str]) -> None:
        self.app = app
        self.any = "*" in allowed
        self.allowed = {a.strip().lower() for a in allowed} | {bound.strip("[]").lower()}

    def ok(self, header: Optional[bytes]) -> bool:
        if self.any or header is None:   # no Host: HTTP/1.0 tools, never a browser
            return True
        name = host_name(header.decode("latin-1"))
        return name in self.allowed or is_loopback(name) or _is_ip(name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.ok(_header(scope, b"host")):
            err = APIError(403, "this Host is not allowed; start the server with "
                                "--allowed-hosts NAME to serve it", code="host_not_allowed")
            await err.response(scope["path"])(scope, receive, send)
            return
        await self.app(scope, receive, send)


class OriginPolicy:
    """Which browser origins may use the API: loopback pages and desktop apps by default, else
    --cors-origins."""

    def __init__(self, origins: Sequence[str]) -> None:
        self.origins = tuple(origins)
        self.any = "*" in self.origins
        self.regex = None if self.origins else f"{LOOPBACK_ORIGIN}|{APP_ORIGIN}"

    def allows(self, origin: str) -> bool:
        if self.any or origin in self.origins:
            return True
        return self.regex is not None and re.fullmatch(self.regex, origin) is not None


def same_origin(scope: Scope, origin: bytes) -> bool:
    """The page this server itself served (the chat page opened at a LAN address): its Origin
    names the Host it was loaded from, which HostCheckMiddleware has already accepted."""
    host = _header(scope, b"host")
    scheme = scope.get("scheme", "http").encode()
    return host is not None and origin == scheme + b"://" + host


class OriginCheckMiddleware:
    """403 for requests a web page of a foreign origin sends (CORS only stops it reading the
    answer; a 'simple' POST would still start a generation)."""

    def __init__(self, app: ASGIApp, policy: OriginPolicy) -> None:
        self.app, self.policy = app, policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS":
            origin = _header(scope, b"origin")
            if origin is not None and not self.policy.allows(origin.decode("latin-1")) \
                    and not same_origin(scope, origin):
                err = APIError(403, "requests from this web origin are not allowed; start the "
                                    "server with --cors-origins ORIGIN to allow it",
                               code="origin_not_allowed")
                await err.response(scope["path"])(scope, receive, send)
                return
        await self.app(scope, receive, send)


class AuthMiddleware:
    """The key on every route but /health, the chat page's files and CORS preflights (OPTIONS),
    as a Bearer token or in ``x-api-key`` (Anthropic's SDKs and Claude Code send that); compared
    as UTF-8 bytes, so a non-ASCII key works."""

    def __init__(self, app: ASGIApp, api_key: Optional[str]) -> None:
        self.app = app
        self.key = api_key.encode("utf-8") if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and self.key and scope["method"] != "OPTIONS"
                and scope["path"] != "/health" and not is_page_path(scope["method"], scope["path"])):
            scheme, _, token = (_header(scope, b"authorization") or b"").partition(b" ")
            bearer = scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
            if not bearer and not hmac.compare_digest(_header(scope, b"x-api-key") or b"", self.key):
                err = APIError(401, "Invalid or missing API key: send 'Authorization: Bearer KEY' "
                                    "or 'x-api-key: KEY'", code="invalid_api_key")
                await err.response(scope["path"])(scope, receive, send)
                return
        await self.app(scope, receive, send)
