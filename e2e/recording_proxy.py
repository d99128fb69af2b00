"""A pass-through between Open WebUI and moeserve that records each chat request it forwards.

moeserve's access log has a line per request (status, tokens, time) but not what was asked or
answered; the tool-call check needs both (did the first request carry `tools`, did it end with
finish_reason tool_calls, which call, what did the continuation send back), and Open WebUI's
stored chat keeps only the last finish_reason. Bytes go through unchanged, streamed as they come.
"""
from __future__ import annotations

import http.client
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


def summarize_request(body: bytes) -> dict[str, Any]:
    try:
        req = json.loads(body)
    except ValueError:
        return {"unparsed_request": True}
    messages = req.get("messages") or []
    tools = req.get("tools") or []
    out: dict[str, Any] = {
        "stream": bool(req.get("stream")),
        "tools": [t.get("function", {}).get("name") for t in tools],
        "tool_choice": req.get("tool_choice"),
        "parallel_tool_calls": req.get("parallel_tool_calls"),
        "strict_tools": [t.get("function", {}).get("name") for t in tools
                         if t.get("function", {}).get("strict")],
        "roles": [m.get("role") for m in messages],
    }
    tool_msgs = [m for m in messages if m.get("role") == "tool"]
    if tool_msgs:
        out["tool_results"] = [m.get("content") for m in tool_msgs]
    return out


def summarize_response(raw: bytes, streamed: bool) -> dict[str, Any]:
    """finish_reason, text and tool calls of a chat completion, from its SSE chunks or its JSON."""
    text, finish, calls = [], None, {}   # calls: index -> {"name", "arguments"}
    bodies = []
    if streamed:
        for line in raw.decode("utf-8", "replace").splitlines():
            if line.startswith("data:") and line[5:].strip() not in ("", "[DONE]"):
                bodies.append(line[5:].strip())
    else:
        bodies.append(raw.decode("utf-8", "replace"))
    for b in bodies:
        try:
            choice = (json.loads(b).get("choices") or [{}])[0]
        except (ValueError, AttributeError):
            continue
        part = choice.get("delta") or choice.get("message") or {}
        text.append(part.get("content") or "")
        for i, tc in enumerate(part.get("tool_calls") or []):
            slot = calls.setdefault(tc.get("index", i), {"name": "", "arguments": ""})
            fn = tc.get("function") or {}
            slot["name"] += fn.get("name") or ""
            slot["arguments"] += fn.get("arguments") or ""
        finish = choice.get("finish_reason") or finish
    return {"finish_reason": finish, "text": "".join(text),
            "tool_calls": [calls[k] for k in sorted(calls)]}


class RecordingProxy:
    """``with RecordingProxy(port, upstream_port) as p``: p.records lists the chat completions
    forwarded (in the order they started), p.in_flight counts the ones not finished."""

    def __init__(self, port: int, upstream_port: int) -> None:
        self.records: list[dict[str, Any]] = []
        self.in_flight = 0
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:   # moeserve logs each request already
                pass

            def do_GET(self) -> None:
                proxy._forward(self, upstream_port)

            do_POST = do_GET

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "RecordingProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _forward(self, h: BaseHTTPRequestHandler, upstream_port: int) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        record: Optional[dict[str, Any]] = None
        if h.command == "POST" and h.path.endswith("/chat/completions"):
            record = {"start_s": round(time.monotonic() - self._t0, 1), **summarize_request(body)}
            with self._lock:
                self.records.append(record)
                self.in_flight += 1
        try:
            up = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=600)
            headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
            up.request(h.command, h.path, body=body, headers=headers)
            resp = up.getresponse()
            h.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP:
                    h.send_header(k, v)
            h.send_header("Transfer-Encoding", "chunked")
            h.send_header("Connection", "close")
            h.end_headers()
            raw = bytearray()
            while chunk := resp.read1(65536):   # as it arrives: the SSE stream stays a stream
                raw.extend(chunk)
                h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                h.wfile.flush()
            h.wfile.write(b"0\r\n\r\n")
            h.close_connection = True
            up.close()
            if record is not None:
                streamed = "text/event-stream" in (resp.getheader("Content-Type") or "")
                record.update(status=resp.status, **summarize_response(bytes(raw), streamed))
        finally:
            if record is not None:
                with self._lock:
                    record["end_s"] = round(time.monotonic() - self._t0, 1)
                    self.in_flight -= 1
