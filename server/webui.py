"""The built-in chat page: GET / and its files under /ui/, served from the package (nothing
fetched at run time). The page uses only the public routes, so it needs no key to load; its
API calls carry the key like any client's."""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles

WEBCHAT = Path(__file__).with_name("webchat")
UI_PREFIX = "/ui"
# what the page may load: its own files only (the vendored scripts included); no inline script
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
       "form-action 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def is_page_path(method: str, path: str) -> bool:
    """The page's own files: readable without the API key."""
    return method in ("GET", "HEAD") and (path == "/" or path.startswith(UI_PREFIX + "/"))


class _UIFiles(StaticFiles):
    async def get_response(self, path: str, scope: dict) -> Response:   # type: ignore[override]
        resp = await super().get_response(path, scope)
        resp.headers.update(HEADERS)
        return resp


def add_web_ui(app: FastAPI) -> None:
    if not (WEBCHAT / "index.html").is_file():
        raise RuntimeError(f"the chat page's files are missing from {WEBCHAT} (a broken install?)")

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return FileResponse(WEBCHAT / "index.html", headers=HEADERS)

    app.mount(UI_PREFIX, _UIFiles(directory=WEBCHAT), name="ui")
