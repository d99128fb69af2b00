"""Open WebUI's REST API as the check uses it: the Workspace setup a user makes for a tool call
(a Tool, a Filter function, the model's settings) and the chat state the check waits on.

Endpoints and payloads as Open WebUI 0.12.4 defines them (routers/tools.py, routers/functions.py,
routers/models.py, main.py's /api/tasks) and as its own pages send them (the admin model editor
saves a connection's model as a model entry with the same id and base_model_id null).
"""
from __future__ import annotations

import json
import os
import time
import urllib.request
from typing import Any, Callable, Optional

PLUGINS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "webui_plugins")
TOOL_ID, FILTER_ID = "weather", "force_tool_call"
# the capabilities the model editor starts from (src/lib/constants.ts DEFAULT_CAPABILITIES), with
# "Builtin Tools" off: their 36 tools would not leave the 2048-token context room for ours
CAPABILITIES = {"file_context": True, "vision": True, "file_upload": True, "web_search": True,
                "image_generation": True, "code_interpreter": True, "terminal": True,
                "citations": True, "status_updates": True, "memory": True, "builtin_tools": False}


def api(base: str, token: str, method: str, path: str, payload: Optional[dict[str, Any]] = None) -> Any:
    req = urllib.request.Request(
        base + path, method=method, data=None if payload is None else json.dumps(payload).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read() or b"null")


def plugin_source(name: str) -> str:
    with open(os.path.join(PLUGINS, name)) as f:
        return f.read()


def set_up_tool_call(base: str, token: str, model_id: str) -> dict[str, Any]:
    """Workspace -> Tools: the weather tool; Admin -> Functions: the filter, switched on; Admin ->
    Settings -> Models -> model_id: builtin tools off, the tool and the filter attached."""
    tool = api(base, token, "POST", "/api/v1/tools/create", {
        "id": TOOL_ID, "name": "Weather", "content": plugin_source("weather_tool.py"),
        "meta": {"description": "The current weather in a city (a fixed answer)"}})
    fn = api(base, token, "POST", "/api/v1/functions/create", {
        "id": FILTER_ID, "name": "Force the first tool call",
        "content": plugin_source("force_tool_call.py"),
        "meta": {"description": "tool_choice required on the request that answers the user"}})
    if not fn.get("is_active"):
        fn = api(base, token, "POST", f"/api/v1/functions/id/{FILTER_ID}/toggle")
    model = api(base, token, "POST", "/api/v1/models/create", {
        "id": model_id, "name": model_id, "base_model_id": None, "params": {},
        "access_grants": [], "is_active": True,
        "meta": {"capabilities": CAPABILITIES, "toolIds": [TOOL_ID], "filterIds": [FILTER_ID]}})
    return {"tool_id": tool["id"], "filter_id": fn["id"], "filter_type": fn.get("type"), "filter_active": fn["is_active"],
            "model_meta": {k: model["meta"].get(k) for k in ("toolIds", "filterIds")} |
            {"builtin_tools": model["meta"]["capabilities"]["builtin_tools"]}}


def last_assistant(chat: dict[str, Any]) -> dict[str, Any]:
    history = chat.get("chat", {}).get("history", {})
    msg = history.get("messages", {}).get(history.get("currentId") or "", {})
    return msg if msg.get("role") == "assistant" else {}


def wait_settled(base: str, token: str, chat_id: str, idle: Callable[[], bool],
                 timeout_s: float) -> tuple[dict[str, Any], float]:
    """Poll until the chat's answer is stored as done, Open WebUI runs no task for the chat (its
    follow-up and tag requests run in the chat's task, after the answer) and ``idle()`` (no
    request to the model in flight: a new chat's title request runs in a task of its own, started
    with the answer); returns the stored chat and the seconds waited. TimeoutError past
    ``timeout_s``."""
    t0 = time.monotonic()
    while True:
        chat = api(base, token, "GET", f"/api/v1/chats/{chat_id}")
        tasks = api(base, token, "GET", f"/api/tasks/chat/{chat_id}").get("task_ids")
        if last_assistant(chat).get("done") and not tasks and idle():
            return chat, round(time.monotonic() - t0, 1)
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"chat {chat_id} not settled in {timeout_s:.0f}s (tasks {tasks})")
        time.sleep(0.5)   # a poll interval: the loop ends on the condition above, not on time


def stored_tool_calls(chat: dict[str, Any]) -> list[dict[str, Any]]:
    """The tool calls of the chat's answer as Open WebUI stored them (its `output` items:
    function_call, then function_call_output with the tool's result), arguments parsed."""
    output = last_assistant(chat).get("output") or []
    results = {o.get("call_id"): "".join(p.get("text", "") for p in o.get("output") or [])
               for o in output if o.get("type") == "function_call_output"}
    calls = []
    for o in output:
        if o.get("type") != "function_call":
            continue
        try:
            args: Any = json.loads(o.get("arguments") or "")
        except ValueError:
            args = None
        calls.append({"name": o.get("name"), "arguments": o.get("arguments"),
                      "arguments_parsed": args, "status": o.get("status"),
                      "result": results.get(o.get("call_id"))})
    return calls


def stored_answer(chat: dict[str, Any]) -> str:
    """The text of the answer's final message item (after the tool calls)."""
    output = last_assistant(chat).get("output") or []
    texts = ["".join(p.get("text", "") for p in o.get("content") or [])
             for o in output if o.get("type") == "message"]
    texts = [t.strip() for t in texts if t.strip()]
    return texts[-1] if texts else (last_assistant(chat).get("content") or "").strip()
