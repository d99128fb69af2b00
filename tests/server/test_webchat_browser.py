"""The chat page in headless Chromium (issue 16), against real `moeserve serve` processes: it
loads with nothing fetched from elsewhere, streams an answer while its expert heatmap fills,
stop aborts the request in the engine, a wrong API key gets a clear message, and a thinking
model's reasoning is shown folded above its answer.

Needs Debian's chromium (or MOESERVE_CHROMIUM naming a Chromium binary) and the playwright
package; skipped with the reason otherwise. Playwright drives that browser; it downloads none."""
from __future__ import annotations

import os
import re
import shutil
import time
from typing import Any, Iterator

import httpx
import pytest

from tests.server.conftest import API_KEY, ServerProcess

CHROMIUM = os.environ.get("MOESERVE_CHROMIUM") or shutil.which("chromium") \
    or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if CHROMIUM is None:
    pytest.skip("no Chromium installed (apt-get install chromium, or set MOESERVE_CHROMIUM)",
                allow_module_level=True)
expect = sync_api.expect
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


class Page:
    """A fresh browser context on ``srv``'s page; every request to another origin is blocked
    and remembered (the page must work offline)."""

    def __init__(self, browser: Any, srv: ServerProcess, storage: dict[str, str] | None = None) -> None:
        self.ctx = browser.new_context(viewport={"width": 1400, "height": 900})
        self.foreign: list[str] = []
        self.errors: list[str] = []
        self.ctx.route("**/*", self._route(srv.base))
        if storage:   # local storage as a returning user has it (before the page's own script runs)
            self.ctx.add_init_script("".join(
                f"localStorage.setItem({k!r}, {v!r});" for k, v in storage.items()))
        self.page = self.ctx.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(srv.base + "/")

    def _route(self, base: str) -> Any:
        def handle(route: Any) -> None:
            url = route.request.url
            if url.startswith(base + "/") or url.startswith("data:"):
                route.continue_()
            else:
                self.foreign.append(url)
                route.abort()
        return handle

    def send(self, text: str) -> None:
        self.page.fill("#input", text)
        self.page.click("#send")

    def close(self) -> None:
        self.ctx.close()


def _settings(max_tokens: int) -> dict[str, str]:
    return {"moeserve.settings": f'{{"max_tokens": "{max_tokens}", "temperature": "0"}}'}


def _aborted(srv: ServerProcess) -> float:
    text = httpx.get(srv.base + "/metrics", headers=srv.headers).text
    m = re.search(r"^moeserve_engine_requests_aborted_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_page_streams_an_answer_with_a_live_heatmap(browser: Any, server: ServerProcess) -> None:
    shape = httpx.get(server.base + "/v1/models").json()["data"][0]["moeserve"]
    L, E = shape["moe_layers"], shape["experts"]
    p = Page(browser, server, _settings(48))
    try:
        page = p.page
        expect(page.locator("body[data-ready='1']")).to_have_count(1)
        expect(page.locator("#model")).to_contain_text(httpx.get(server.base + "/v1/models").json()["data"][0]["id"])
        for grid in ("#heat-prompt", "#heat-decode"):
            expect(page.locator(grid + " .cell")).to_have_count(L * E)
        # every update of the token count, with the heatmap as it was then, recorded by the
        # page itself: polled over the driver, a loaded machine could finish the answer between
        # two reads (the test failed so twice)
        page.evaluate("""() => { window.__seen = [];
            const sum = document.getElementById("decode-sum");
            new MutationObserver(() => window.__seen.push([parseInt(sum.textContent) || 0,
                Array.from(document.querySelectorAll("#heat-decode .cell"),
                           (c) => c.className + (c.getAttribute("style") || "")).join("|")]))
              .observe(sum, {childList: true, characterData: true, subtree: true}); }""")
        p.send("Tell me about the sea.")
        answer = page.locator(".msg.assistant").last
        expect(page.locator("#decode-sum")).to_contain_text(re.compile(r"^(1[2-9]|[2-9]\d) tokens"))
        expect(page.locator("#send")).to_be_visible()                # the answer has ended
        seen = [(n, cells) for n, cells in page.evaluate("window.__seen") if n > 0]
        counts = [n for n, _ in seen]
        assert counts == sorted(counts) and len(set(counts)) >= 2, counts
        assert len({cells for _, cells in seen}) >= 2              # it changes as tokens arrive
        expect(answer.locator(".meta")).to_contain_text("TTFT")
        expect(answer.locator(".meta")).to_contain_text("tokens/s")
        assert answer.inner_text().strip()
        assert page.locator("#heat-prompt .cell.hot").count() > 0
        assert page.locator("#heat-decode .cell.hot").count() > 0
        # hovering a token of the answer shows that token's experts
        tok = answer.locator(".tok").nth(3)
        tok.hover()
        expect(page.locator("#token-info")).to_contain_text(f"token {tok.get_attribute('data-t')}:")
        # the server view: counters and one occupancy row per MoE layer
        page.click("#tab-server")
        expect(page.locator("#occupancy .row")).to_have_count(L)
        expect(page.locator("#counters")).to_contain_text("generated tokens")
        # the conversation survives a reload (local storage)
        page.reload()
        expect(page.locator(".msg.user")).to_contain_text("Tell me about the sea.")
        assert p.foreign == [] and p.errors == []
    finally:
        p.close()


def test_stop_aborts_the_request_on_the_server(browser: Any, server: ServerProcess) -> None:
    before = _aborted(server)
    p = Page(browser, server, _settings(4000))
    try:
        page = p.page
        expect(page.locator("body[data-ready='1']")).to_have_count(1)
        p.send("Write a very long story.")
        expect(page.locator("#decode-sum")).to_contain_text(re.compile(r"^([3-9]|\d\d+) tokens"))
        page.click("#stop")
        expect(page.locator(".msg.assistant .meta").last).to_contain_text("stopped")
        deadline = time.monotonic() + 30
        while _aborted(server) <= before and time.monotonic() < deadline:
            time.sleep(0.1)     # polling the server's counter, bounded by the deadline
        assert _aborted(server) == before + 1
        page.click("#regenerate")     # the same question again, answered anew
        expect(page.locator("#stop")).to_be_visible()
        page.click("#stop")
        expect(page.locator("#send")).to_be_visible()
        assert p.errors == []
    finally:
        p.close()


def test_wrong_api_key_gets_a_clear_message_then_the_right_one_works(
        browser: Any, auth_server: ServerProcess) -> None:
    p = Page(browser, auth_server, {"moeserve.apiKey": "not-the-key", **_settings(6)})
    try:
        page = p.page
        expect(page.locator("#keydlg")).to_be_visible()
        expect(page.locator("#key-why")).to_contain_text("rejected the stored API key")
        expect(page.locator("#notice")).to_contain_text("Wrong API key")
        page.fill("#key-input", API_KEY)
        page.click("#keydlg button[value='save']")
        expect(page.locator("body[data-ready='1']")).to_have_count(1)
        expect(page.locator("#notice")).to_be_hidden()
        # an all-resident server: every used expert is a hit, none loaded
        p.send("Hello")
        expect(page.locator("#send")).to_be_visible()
        expect(page.locator("#decode-sum")).to_contain_text("hit rate 100%")
        assert page.locator("#heat-decode .cell.miss").count() == 0
        assert p.foreign == [] and p.errors == []
    finally:
        p.close()


def test_a_thinking_models_reasoning_is_folded_above_the_answer(browser: Any, thinking: ServerProcess) -> None:
    """The thinking fixture's template opens a <think> block that the tiny model never closes:
    the whole reply streams as reasoning_content, shown in a fold labelled "Thought" once done,
    which stays open when the conversation is drawn again, and is kept on reload."""
    p = Page(browser, thinking, _settings(48))
    try:
        page = p.page
        expect(page.locator("body[data-ready='1']")).to_have_count(1)
        p.send("What is the capital of France?")
        expect(page.locator("#send")).to_be_visible()                # the answer has ended
        fold = page.locator(".msg.assistant details.thinking")
        expect(fold.locator("summary")).to_have_text("Thought")
        assert fold.locator("div").text_content().strip()
        expect(page.locator(".msg.assistant .meta")).to_contain_text("48 tokens")
        fold.locator("summary").click()
        page.click("#new-chat")                                      # away and back: drawn anew
        expect(page.locator(".msg")).to_have_count(0)
        page.locator("#conversations li", has_text="capital of France").click()
        expect(page.locator(".msg.assistant details.thinking[open]")).to_have_count(1)
        page.reload()
        page.locator("#conversations li", has_text="capital of France").click()
        expect(page.locator(".msg.assistant details.thinking div")).not_to_be_empty()
        assert p.foreign == [] and p.errors == []
    finally:
        p.close()
