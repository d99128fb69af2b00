"""Reading a request body: the size limit counted as bytes arrive (chunked bodies too), then JSON
with a nesting limit, no NaN/Infinity literals and no lone surrogates, so that every client mistake
is a 400 and nothing big is parsed on the event loop."""
from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import ClientDisconnect, Request

from server.errors import APIError, bad_request

MAX_JSON_DEPTH = 64           # OpenAI bodies nest a handful of levels; json recursion ends ~1000
PARSE_OFF_LOOP_BYTES = 256 * 1024


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body; 413 as soon as more than ``limit`` bytes are declared or have arrived."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body has {length} bytes; the limit is {limit}",
                       code="request_too_large")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:   # a chunked body declares no length: stop reading right here
                raise APIError(413, f"the request body exceeds the limit of {limit} bytes",
                               code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise bad_request("the client disconnected while sending the body") from None
    return b"".join(chunks)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _check(doc: Any) -> None:
    """Depth limit and no lone surrogates ('\\ud800' decodes to a str that cannot be encoded)."""
    stack: list[tuple[Any, int, str]] = [(doc, 1, "")]
    while stack:
        obj, depth, path = stack.pop()
        if isinstance(obj, str):
            if not obj.isascii():
                try:
                    obj.encode("utf-8")
                except UnicodeEncodeError:
                    raise bad_request("the string contains a lone UTF-16 surrogate (an unpaired "
                                      "\\ud800-\\udfff escape), which is not text", path or None)
            continue
        if not isinstance(obj, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise bad_request(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels",
                              path or None)
        if isinstance(obj, dict):
            for k, v in obj.items():
                sub = f"{path}.{k}" if path else str(k)
                stack.append((k, depth, path))
                stack.append((v, depth + 1, sub))
        else:
            for i, v in enumerate(obj):
                stack.append((v, depth + 1, f"{path}.{i}" if path else str(i)))


def parse_json(raw: bytes) -> Any:
    """Decode and check a body; every failure is a 400."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"the request body is not UTF-8: {exc}") from None
    try:
        doc = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise bad_request(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:   # JSONDecodeError, NaN/Infinity, integers over 4300 digits
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    _check(doc)
    return doc


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON whatever the Content-Type (curl -d sends a form type); large bodies are
    parsed on a worker thread so the event loop keeps serving the other streams."""
    raw = await read_body(request, limit)
    if len(raw) > PARSE_OFF_LOOP_BYTES:
        return await asyncio.to_thread(parse_json, raw)
    return parse_json(raw)
