"""The expert stream over HTTP and the chat page's files (issue 16): opt-in per request, shaped as
the model card says, absent otherwise; the page served from the package with a strict CSP and
readable without the API key, which the API still demands."""
from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from tests.server.conftest import API_KEY, ServerProcess

CHAT = {"messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 8,
        "temperature": 0, "ignore_eos": True}


def _events(srv: ServerProcess, body: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    with httpx.stream("POST", srv.base + "/v1/chat/completions", headers=srv.headers,
                      json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


def test_streamed_chunks_carry_each_tokens_routing(server: ServerProcess) -> None:
    shape = httpx.get(server.base + "/v1/models").json()["data"][0]["moeserve"]
    L, E, k = shape["moe_layers"], shape["experts"], shape["top_k"]
    events = _events(server, {**CHAT, "moeserve": {"experts": True}})
    entries = [e["moeserve"] for e in events if "moeserve" in e]
    assert [x["token"] for x in entries] == list(range(8))          # one per token, in order
    assert entries[0]["phase"] == "prompt" and {x["phase"] for x in entries[1:]} == {"decode"}
    for x in entries:
        assert len(x["layers"]) == len(x["resident"]) == L
        for layer, mask in zip(x["layers"], x["resident"]):
            assert 0 <= int(mask, 16) < 2 ** E
            for e, rows, status in layer:
                assert 0 <= e < E and rows >= 1 and status in ("h", "p", "m")
        assert x["hits"] + x["misses"] == sum(len(layer) for layer in x["layers"])
        assert x["bytes_read"] >= 0 and x["stall_ms"] >= 0 and x["batch"] >= 1
    for x in entries[1:]:
        assert all(len(layer) == k for layer in x["layers"])
    # the same request without the extension: the same text, and no moeserve key anywhere
    plain = _events(server, CHAT)
    assert not any("moeserve" in e for e in plain)
    text = lambda evs: "".join(c["delta"].get("content") or "" for e in evs for c in e["choices"])
    assert text(plain) == text(events)


def test_non_streamed_response_lists_every_token(server: ServerProcess) -> None:
    r = httpx.post(server.base + "/v1/chat/completions", json={**CHAT, "moeserve": {"experts": True}},
                   timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert [x["token"] for x in choice["moeserve"]["tokens"]] == list(range(8))
    r = httpx.post(server.base + "/v1/chat/completions", json=CHAT, timeout=120)
    assert "moeserve" not in r.json()["choices"][0]


@pytest.mark.parametrize("ext", [{"expert": True}, {"experts": "maybe"}, "yes"])
def test_bad_extension_is_a_400_naming_it(server: ServerProcess, ext: Any) -> None:
    r = httpx.post(server.base + "/v1/chat/completions", json={**CHAT, "moeserve": ext}, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["param"].startswith("moeserve")
    assert httpx.get(server.base + "/health").status_code == 200


def test_completions_route_streams_experts_too(server: ServerProcess) -> None:
    with httpx.stream("POST", server.base + "/v1/completions", timeout=120,
                      json={"prompt": "Hello", "max_tokens": 3, "stream": True, "temperature": 0,
                            "ignore_eos": True, "moeserve": {"experts": True}}) as r:
        chunks = [json.loads(l[6:]) for l in r.iter_lines()
                  if l.startswith("data: ") and l != "data: [DONE]"]
    assert [c["moeserve"]["token"] for c in chunks if "moeserve" in c] == [0, 1, 2]


def test_page_is_served_without_the_key_and_the_api_still_needs_it(auth_server: ServerProcess) -> None:
    page = httpx.get(auth_server.base + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    refs = re.findall(r'(?:src|href)="([^"]*)"', page.text)
    assert refs and all(r.startswith("/ui/") or r.startswith("data:") for r in refs), refs
    for path in ("/ui/app.js", "/ui/experts.js", "/ui/vendor/marked.min.js", "/ui/style.css"):
        r = httpx.get(auth_server.base + path)
        assert r.status_code == 200 and r.content, path
        assert r.headers["content-security-policy"] == page.headers["content-security-policy"]
    # no way out of the page's folder, even with the key
    for sneaky in ("/ui/%2e%2e/webui.py", "/ui/%2e%2e/%2e%2e/configs/server.py", "/ui/vendor/"):
        assert httpx.get(auth_server.base + sneaky, headers=auth_server.headers).status_code == 404, sneaky
    assert httpx.get(auth_server.base + "/v1/models").status_code == 401
    assert httpx.post(auth_server.base + "/ui/app.js").status_code in (401, 405)
    assert httpx.get(auth_server.base + "/metrics").status_code == 401


def test_all_resident_stream_is_all_hits(auth_server: ServerProcess) -> None:
    shape = httpx.get(auth_server.base + "/v1/models", headers=auth_server.headers).json()["data"][0]["moeserve"]
    entries = [e["moeserve"] for e in _events(auth_server, {**CHAT, "moeserve": {"experts": True}})
               if "moeserve" in e]
    full = format(2 ** shape["experts"] - 1, "x")
    assert entries and all(x["resident"] == [full] * shape["moe_layers"] for x in entries)
    assert all(s == "h" for x in entries for layer in x["layers"] for _, _, s in layer)
    assert all(x["misses"] == 0 and x["bytes_read"] == 0 and not x["evicted"] for x in entries)


def test_same_origin_page_may_post_from_a_lan_address(auth_server: ServerProcess) -> None:
    """The page opened at the server's own address (any Host the server accepts) may call the API;
    a foreign origin still may not."""
    base = {"Authorization": f"Bearer {API_KEY}", "Host": f"10.1.2.3:{auth_server.port}"}
    ok = httpx.get(auth_server.base + "/v1/models", headers={**base, "Origin": f"http://10.1.2.3:{auth_server.port}"})
    assert ok.status_code == 200
    bad = httpx.get(auth_server.base + "/v1/models", headers={**base, "Origin": "http://evil.example"})
    assert bad.status_code == 403


def test_no_web_ui_flag(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    with ServerProcess(tiny_model_dir, str(tmp_path_factory.mktemp("noui") / "server.log"),
                       extra=("--no-web-ui",)) as srv:
        assert httpx.get(srv.base + "/").status_code == 404
        assert httpx.get(srv.base + "/ui/app.js").status_code == 404
        assert httpx.get(srv.base + "/v1/models").status_code == 200
