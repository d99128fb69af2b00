"""Open WebUI pointed at moeserve: a chat, then a tool call, through its own page in headless Chromium.

    python e2e/webui_check.py --webui .venv-webui/bin/open-webui [--server-python .venv/bin/python]

Run it with a Python that has Playwright (the project's venv has it); Chromium is Debian's
(`apt-get install chromium`, or --chromium PATH: Playwright downloads no browser). It starts
`moeserve serve` (the built-in default model) and `open-webui serve` on free ports, Open WebUI
with its default settings except what a local single-user setup needs (no login, offline, no
Ollama, the OpenAI connection at moeserve, through a pass-through that records each chat request,
e2e/recording_proxy.py). Two scenarios, in one run:

1. chat: types a question into Open WebUI's chat box, waits for the streamed answer and for
   Open WebUI's requests around it (title, follow-ups, tags), saves docs/open-webui.png.
2. tool_call: sets up, through Open WebUI's REST API as a user would in its pages, a Tool
   (e2e/webui_plugins/weather_tool.py), a Filter that forces the first call
   (e2e/webui_plugins/force_tool_call.py; the default model calls no tool by itself) and the
   model's settings (Builtin Tools off, the tool and the filter attached); asks for the weather in
   a new chat, waits until Open WebUI has run the tool and the model has answered, saves
   docs/open-webui-tool.png.

Writes bench/results/webui_check.json; exit status 1 when either scenario failed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional

from launch import free_port, launched
from recording_proxy import RecordingProxy
from webui_setup import (api, last_assistant, set_up_tool_call, stored_answer,
                         stored_tool_calls, wait_settled)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGS = os.path.join(REPO, "bench", "results", "webui-logs")
MODEL = "smollm2-moe-8x"
QUESTION = "What is the capital of France?"
TOOL_QUESTION = "What is the weather in Paris?"
TOOL_NAME = "get_current_weather"
TOOL_RESULT = re.compile(r"Sunny, 21 °C in \S")   # what weather_tool.py returns


def open_chat(page: Any, url: str) -> None:
    """A new chat in the page, ready for typing (a first visit's "What's New" dialog closed)."""
    page.goto(url, wait_until="load", timeout=120_000)
    page.locator("#chat-input").wait_for(state="visible", timeout=120_000)
    btn = page.get_by_role("button", name=re.compile(r"Okay, Let's Go"))
    try:
        btn.first.wait_for(state="visible", timeout=3000)
        btn.first.click()
    except Exception:   # no dialog (it shows once per browser profile)
        page.keyboard.press("Escape")


def ask(page: Any, base: str, token: str, question: str, idle: Callable[[], bool],
        timeout_s: float) -> dict[str, Any]:
    """Types ``question``, waits for the page's first text and for the stored answer marked done,
    then for the chat to settle (Open WebUI's title, follow-up and tag requests done too)."""
    page.locator("#chat-input").click()
    page.keyboard.type(question)
    page.keyboard.press("Enter")
    t0 = time.monotonic()
    page.wait_for_url(re.compile(r"/c/[0-9a-f-]+"), timeout=60_000)
    chat_id = page.url.rsplit("/c/", 1)[1].split("?")[0].split("#")[0]
    parts = page.locator("#response-content-container")
    first_text_s = done_s = None
    while first_text_s is None or done_s is None:
        now = time.monotonic() - t0
        if first_text_s is None and parts.count() and parts.last.inner_text().strip():
            first_text_s = round(now, 1)
        if done_s is None and last_assistant(
                api(base, token, "GET", f"/api/v1/chats/{chat_id}")).get("done"):
            done_s = round(now, 1)
        if now > timeout_s:
            raise TimeoutError(f"no answer in {timeout_s:.0f}s (first text {first_text_s})")
        page.wait_for_timeout(250)   # a poll interval; the loop ends on the page and chat state
    chat, _ = wait_settled(base, token, chat_id, idle, timeout_s)
    settled_s = round(time.monotonic() - t0, 1)
    # the page shows the finished reply with its action buttons
    page.locator("button[aria-label='Copy']").last.wait_for(state="visible", timeout=30_000)
    return {"chat_id": chat_id, "answer_shown": parts.last.inner_text().strip(),
            "answer": stored_answer(chat), "first_text_s": first_text_s, "answer_done_s": done_s,
            "settled_s": settled_s, "chat": chat}


def access_lines(log_path: str) -> list[str]:
    with open(log_path, errors="replace") as f:
        return [re.sub(r"^\S+ \S+ ", "", ln.strip()) for ln in f if "/chat/completions" in ln]


def plain_chat(page: Any, url: str, token: str, proxy: RecordingProxy, shot: str,
               timeout_s: float) -> dict[str, Any]:
    got = ask(page, url.rstrip("/"), token, QUESTION, lambda: proxy.in_flight == 0, timeout_s)
    page.screenshot(path=shot)
    got.pop("chat")
    records = list(proxy.records)
    statuses = [r.get("status") for r in records]
    return {"question": QUESTION, **got, "requests": records,
            "mentions_paris": "paris" in got["answer"].lower(),
            # an answer, and every request Open WebUI made got a 200 (its error text shows in the
            # page like an answer)
            "ok": bool(got["answer"]) and bool(statuses) and set(statuses) == {200}}


def tool_chat(page: Any, url: str, token: str, proxy: RecordingProxy, shot: str,
              timeout_s: float) -> dict[str, Any]:
    base = url.rstrip("/")
    setup = set_up_tool_call(base, token, MODEL)
    first_record = len(proxy.records)
    # the page reloaded (its model and tool lists predate the setup), then the sidebar's "New
    # Chat": that selects the model's default tools. A page load alone (a new tab too) left them
    # unselected in Open WebUI 0.12.4, and the chat went without the tool.
    posted: list[Any] = []
    page.on("request", lambda r: posted.append(r.post_data_json)
            if r.method == "POST" and r.url.endswith("/api/chat/completions") else None)
    open_chat(page, url)
    page.locator("a[aria-label='New Chat']:visible, button[aria-label='New Chat']:visible").first.click()
    # the chat box's wrench badge: the tool is selected for the next message
    page.locator("button[aria-label='Available Tools']").wait_for(state="visible", timeout=30_000)
    got = ask(page, base, token, TOOL_QUESTION, lambda: proxy.in_flight == 0, timeout_s)
    got["page_sent_tool_ids"] = [(b or {}).get("tool_ids") for b in posted]
    chat = got.pop("chat")
    calls = stored_tool_calls(chat)
    # the tool call's block in the reply ("View Result from get_current_weather"), opened to
    # show the call's arguments and the tool's result
    block = page.get_by_text(re.compile(f"Result from {TOOL_NAME}")).first
    tool_shown = block.count() > 0
    result_shown = False
    if tool_shown:
        block.click()
        try:
            page.get_by_text(TOOL_RESULT).first.wait_for(state="visible", timeout=10_000)
            result_shown = True
        except Exception:   # recorded below; the block's markup may differ in other versions
            pass
    page.screenshot(path=shot, animations="disabled")   # the block's opening, run to its end
    records = proxy.records[first_record:]
    return {"question": TOOL_QUESTION, "setup": setup, **got, "tool_shown_in_page": tool_shown,
            "tool_result_shown_in_page": result_shown,
            "stored_tool_calls": calls, "requests": records,
            **judge_tool_call(records, calls, got["answer"])}


def judge_tool_call(records: list[dict[str, Any]], calls: list[dict[str, Any]],
                    answer: str) -> dict[str, Any]:
    """ok only when moeserve was sent the tool and answered with a call of it (parseable JSON
    arguments), Open WebUI ran the tool, and the request carrying its result got a text answer."""
    chat_reqs = [r for r in records if r.get("tools")]
    first = chat_reqs[0] if chat_reqs else {}
    sent = first.get("tool_calls") or [{}]
    try:
        first_args = json.loads(sent[0].get("arguments") or "")
    except ValueError:
        first_args = None
    cont = next((r for r in chat_reqs if (r.get("roles") or [None])[-1] == "tool"), {})
    checks = {
        "first_request_sent_the_tool": TOOL_NAME in (first.get("tools") or []),
        "first_request_only_our_tool": first.get("tools") == [TOOL_NAME],
        "first_request_tool_choice": first.get("tool_choice"),
        "first_finish_reason": first.get("finish_reason"),
        "first_call": {"name": sent[0].get("name"), "arguments": sent[0].get("arguments")},
        "call_arguments_json": isinstance(first_args, dict),
        "tool_ran": any(c["name"] == TOOL_NAME and TOOL_RESULT.search(c.get("result") or "")
                        for c in calls),
        "continuation_carried_result": any(TOOL_RESULT.search(str(t))
                                           for t in cont.get("tool_results") or []),
        "continuation_tool_choice": cont.get("tool_choice"),
        "continuation_status": cont.get("status"),
        "continuation_finish_reason": cont.get("finish_reason"),
        "continuation_text": cont.get("text", ""),
        # not a condition of ok: whether the model's words took up the tool's result
        "answer_mentions_result": "21" in answer and "sunny" in answer.lower(),
    }
    ok = (checks["first_request_sent_the_tool"] and first.get("status") == 200
          and checks["first_finish_reason"] == "tool_calls"
          and checks["first_call"]["name"] == TOOL_NAME and checks["call_arguments_json"]
          and checks["tool_ran"] and checks["continuation_carried_result"]
          and checks["continuation_status"] == 200 and bool(checks["continuation_text"].strip())
          and bool(answer) and all(r.get("status") == 200 for r in records))
    return {"checks": checks, "ok": bool(ok)}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--webui", default=os.path.join(REPO, ".venv-webui", "bin", "open-webui"))
    ap.add_argument("--server-python", default=os.path.join(REPO, ".venv", "bin", "python"))
    ap.add_argument("--chromium", default=os.environ.get("MOESERVE_CHROMIUM", "/usr/bin/chromium"))
    ap.add_argument("--screenshot", default=os.path.join(REPO, "docs", "open-webui.png"))
    ap.add_argument("--tool-screenshot", default=os.path.join(REPO, "docs", "open-webui-tool.png"))
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "webui_check.json"))
    ap.add_argument("--timeout", type=float, default=300,
                    help="seconds to wait for each answer, and then for its chat to settle")
    args = ap.parse_args(argv)

    from playwright.sync_api import sync_playwright

    mport, pport, wport = free_port(), free_port(), free_port()
    data = tempfile.mkdtemp(prefix="moeserve-open-webui-")
    menv = {**os.environ, "PYTHONPATH": REPO}
    wenv = {**os.environ, "DATA_DIR": data, "WEBUI_AUTH": "False", "OFFLINE_MODE": "True",
            "ENABLE_OLLAMA_API": "False", "WEBUI_SECRET_KEY": "moeserve-e2e",
            "OPENAI_API_BASE_URL": f"http://127.0.0.1:{pport}/v1", "OPENAI_API_KEY": "unused",
            "ANONYMIZED_TELEMETRY": "False", "DO_NOT_TRACK": "True", "SCARF_NO_ANALYTICS": "True"}
    url = f"http://127.0.0.1:{wport}/"
    result: dict[str, Any] = {}
    with launched("moeserve", [args.server_python, "-m", "moeserve.cli", "serve", "--port",
                              str(mport)], menv, f"http://127.0.0.1:{mport}/health", REPO, LOGS) as mlog, \
         RecordingProxy(pport, mport) as proxy, \
         launched("open-webui", [args.webui, "serve", "--host", "127.0.0.1", "--port", str(wport)],
                 wenv, f"http://127.0.0.1:{wport}/health", data, LOGS), \
         sync_playwright() as p:
        result["open_webui"] = subprocess.run(
            [os.path.join(os.path.dirname(args.webui), "python"), "-c",
             "import importlib.metadata as m; print(m.version('open-webui'))"],
            capture_output=True, text=True).stdout.strip()
        browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
        open_chat(page, url)
        result["model_shown"] = MODEL in page.inner_text("body")
        token = page.evaluate("localStorage.token")   # the session Open WebUI's page signed in
        scenarios: list[tuple[str, Callable[..., dict[str, Any]], str]] = [
            ("chat", plain_chat, args.screenshot), ("tool_call", tool_chat, args.tool_screenshot)]
        for name, run, shot in scenarios:
            seen = len(access_lines(mlog))
            try:
                result[name] = run(page, url, token, proxy, shot, args.timeout)
            except Exception as e:   # recorded, and the next scenario still runs
                page.screenshot(path=shot)
                result[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                "requests": proxy.records[-8:]}
            result[name]["moeserve_requests"] = access_lines(mlog)[seen:]
        browser.close()
        with open(mlog, errors="replace") as f:
            result["chat"]["tools_left_out"] = "served without the tools" in f.read()
    result["ok"] = all(result[name].get("ok") for name in ("chat", "tool_call"))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(json.dumps(result, indent=1, ensure_ascii=False))
    print(f"screenshots: {os.path.relpath(args.screenshot, REPO)}, "
          f"{os.path.relpath(args.tool_screenshot, REPO)}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
