"""Open WebUI pointed at moeserve, one chat sent through its own page in headless Chromium.

    python e2e/webui_check.py --webui .venv-webui/bin/open-webui [--server-python .venv/bin/python]

Run it with a Python that has Playwright (the project's venv has it); Chromium is Debian's
(`apt-get install chromium`, or --chromium PATH: Playwright downloads no browser). It starts
`moeserve serve` (the built-in default model) and `open-webui serve` on free ports, Open WebUI
with its default settings except what a local single-user setup needs (no login, offline, no
Ollama, the OpenAI connection at moeserve), types a question into Open WebUI's chat box, waits for
the streamed answer and saves a screenshot (docs/open-webui.png). Writes
bench/results/webui_check.json; exit status 1 when no answer appeared.
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
from typing import Any, Optional

from launch import free_port, launched

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGS = os.path.join(REPO, "bench", "results", "webui-logs")
QUESTION = "What is the capital of France?"


def chat_through_page(url: str, chromium: str, shot: str, timeout_s: float) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    out: dict[str, Any] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(url, wait_until="load", timeout=120_000)
        box = page.locator("#chat-input")
        box.wait_for(state="visible", timeout=120_000)
        # the "What's New" dialog of a first visit
        page.wait_for_timeout(2000)
        for label in ("Okay, Let's Go!", "Okay, Let's Go"):
            btn = page.get_by_role("button", name=label)
            if btn.count() and btn.first.is_visible():
                btn.first.click()
                break
        else:
            page.keyboard.press("Escape")
        out["model_shown"] = "smollm2-moe-8x" in page.inner_text("body")
        box.click()
        page.keyboard.type(QUESTION)
        page.keyboard.press("Enter")
        t0 = time.monotonic()
        answer, last, stable_since = "", None, time.monotonic()
        first_text_s = None
        while time.monotonic() - t0 < timeout_s:
            page.wait_for_timeout(500)
            parts = page.locator("#response-content-container")
            text = parts.last.inner_text().strip() if parts.count() else ""
            if text and first_text_s is None:
                first_text_s = time.monotonic() - t0
            if text != last:
                last, stable_since = text, time.monotonic()
            # done: the text stopped changing and the reply's action buttons are there
            done = page.locator("button[aria-label='Copy']").count() > 0
            if text and time.monotonic() - stable_since > 4 and done:
                answer = text
                break
        answer = answer or (last or "")
        out.update(answer=answer, seconds=round(time.monotonic() - t0, 1),
                   first_text_s=None if first_text_s is None else round(first_text_s, 1))
        page.screenshot(path=shot)
        browser.close()
    return out


def access_lines(log_path: str) -> list[str]:
    with open(log_path, errors="replace") as f:
        return [ln.strip() for ln in f if "/chat/completions" in ln]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--webui", default=os.path.join(REPO, ".venv-webui", "bin", "open-webui"))
    ap.add_argument("--server-python", default=os.path.join(REPO, ".venv", "bin", "python"))
    ap.add_argument("--chromium", default=os.environ.get("MOESERVE_CHROMIUM", "/usr/bin/chromium"))
    ap.add_argument("--screenshot", default=os.path.join(REPO, "docs", "open-webui.png"))
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "webui_check.json"))
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for the answer")
    args = ap.parse_args(argv)

    mport, wport = free_port(), free_port()
    data = tempfile.mkdtemp(prefix="moeserve-open-webui-")
    menv = {**os.environ, "PYTHONPATH": REPO}
    wenv = {**os.environ, "DATA_DIR": data, "WEBUI_AUTH": "False", "OFFLINE_MODE": "True",
            "ENABLE_OLLAMA_API": "False", "WEBUI_SECRET_KEY": "moeserve-e2e",
            "OPENAI_API_BASE_URL": f"http://127.0.0.1:{mport}/v1", "OPENAI_API_KEY": "unused",
            "ANONYMIZED_TELEMETRY": "False", "DO_NOT_TRACK": "True", "SCARF_NO_ANALYTICS": "True"}
    result: dict[str, Any] = {"question": QUESTION}
    with launched("moeserve", [args.server_python, "-m", "moeserve.cli", "serve", "--port",
                              str(mport)], menv, f"http://127.0.0.1:{mport}/health", REPO, LOGS) as mlog, \
         launched("open-webui", [args.webui, "serve", "--host", "127.0.0.1", "--port", str(wport)],
                 wenv, f"http://127.0.0.1:{wport}/health", data, LOGS):
        result["open_webui"] = subprocess.run(
            [os.path.join(os.path.dirname(args.webui), "python"), "-c",
             "import importlib.metadata as m; print(m.version('open-webui'))"],
            capture_output=True, text=True).stdout.strip()
        result.update(chat_through_page(f"http://127.0.0.1:{wport}/", args.chromium,
                                        args.screenshot, args.timeout))
        time.sleep(5)   # Open WebUI's background requests (title, follow-ups) after the answer
        lines = access_lines(mlog)
        result["moeserve_requests"] = [re.sub(r"^\S+ \S+ ", "", ln) for ln in lines]
        with open(mlog, errors="replace") as f:
            result["tools_left_out"] = "served without the tools" in f.read()
    statuses = [int(m.group(1)) for ln in lines
                if (m := re.search(r"POST /v1/chat/completions (\d{3})", ln))]
    # an answer on the page, and every request Open WebUI made got a 200 (its error text
    # shows in the page like an answer)
    result["ok"] = bool(result.get("answer")) and bool(statuses) and set(statuses) == {200}
    result["mentions_paris"] = "paris" in result.get("answer", "").lower()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(json.dumps(result, indent=1, ensure_ascii=False))
    print(f"screenshot: {os.path.relpath(args.screenshot, REPO)}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
