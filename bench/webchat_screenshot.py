"""The README's screenshots of the chat page: a real server, the page in headless Chromium, a
question asked, the page captured mid-answer with its expert view.

    python -m bench.webchat_screenshot --out docs/webchat-8x.png [--model DIR]
        [--expert-budget 25%] [--after-tokens 24] [--chromium /usr/bin/chromium]

Needs playwright (pip) and a Chromium (Debian's `chromium`); downloads nothing.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import time
from typing import Optional

from bench.common import free_port, start_server

QUESTION = ("Write a Python function that checks whether a word is a palindrome, in a code "
            "block, then explain it in two bullet points.")


def _decoded(summary: str) -> int:
    """Tokens decoded so far, from the page's decode summary ("12 tokens, hit rate ...")."""
    m = re.match(r"(\d+) tokens", summary)
    return int(m.group(1)) if m else 0


def capture(base: str, out: str, chromium: str, after_tokens: int, width: int, height: int) -> str:
    from playwright.sync_api import expect, sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(600_000)
            page.goto(base + "/")
            expect(page.locator("body[data-ready='1']")).to_have_count(1)
            page.fill("#input", QUESTION)
            page.click("#send")
            deadline = time.monotonic() + 600
            while _decoded(page.inner_text("#decode-sum")) < after_tokens:
                if time.monotonic() > deadline:
                    raise SystemExit("the answer did not reach --after-tokens within 10 minutes")
                page.wait_for_timeout(200)   # the page streams; look again shortly
            page.screenshot(path=out)
            summary = page.inner_text("#decode-sum")
            page.click("#stop")
            return summary
        finally:
            browser.close()


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--model", help="model directory (default: the built-in default model)")
    ap.add_argument("--expert-budget", default="25%", help="the server's --expert-budget")
    ap.add_argument("--after-tokens", type=int, default=24,
                    help="capture once this many tokens have been decoded")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium",
                    help="the Chromium binary")
    ap.add_argument("--size", default="1500x1050", help="viewport WIDTHxHEIGHT")
    a = ap.parse_args(argv)
    width, height = (int(x) for x in a.size.split("x"))
    port = free_port()
    args = ["--expert-budget", a.expert_budget] + (["--model", a.model] if a.model else [])
    log = os.path.splitext(a.out)[0] + ".server.log"
    proc = start_server(args, port, log)
    try:
        summary = capture(f"http://127.0.0.1:{port}", a.out, a.chromium, a.after_tokens, width,
                          height)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    os.remove(log)
    print(f"| screenshot | model | budget | decode at capture |\n|---|---|---|---|\n"
          f"| {a.out} | {a.model or 'default'} | {a.expert_budget} | {summary} |")


if __name__ == "__main__":
    main()
