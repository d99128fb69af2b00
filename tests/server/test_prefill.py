"""A reply's prefill on chat completions (vLLM's continue_final_message): the final assistant
message is the start of the reply, the prompt is the conversation before it with the prefill
written after the generation prompt, and the refusals where a prefill cannot start the reply."""
from __future__ import annotations

from typing import Any

import pytest

from server.tokenizer import TextTokenizer
from tests.server.test_responses_scripted import app_for, call

ASK = [{"role": "user", "content": "Name a color."}]
PREFILLED = [*ASK, {"role": "assistant", "content": "My favourite color is"}]


def test_the_final_assistant_message_is_continued(tiny_model_dir: str) -> None:
    app = app_for(tiny_model_dir, " blue.")
    r = call(app, "POST", "/v1/chat/completions", {"messages": PREFILLED, "continue_final_message": True,
                                                   "add_generation_prompt": False}).json()
    tok = TextTokenizer(tiny_model_dir)
    ids = tok.encode(tok.render_chat(ASK) + "My favourite color is", add_special_tokens=False)
    assert r["usage"]["prompt_tokens"] == len(ids)
    assert r["choices"][0]["message"]["content"] == " blue."       # the continuation only
    plain = call(app, "POST", "/v1/chat/completions", {"messages": PREFILLED}).json()
    assert plain["usage"]["prompt_tokens"] > len(ids)               # a new turn after it


@pytest.mark.parametrize("body,field", [
    ({"messages": ASK}, "messages"),                                          # no final assistant
    ({"messages": [PREFILLED[1]]}, "messages"),                               # nothing before it
    ({"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages"),
    ({"messages": PREFILLED, "add_generation_prompt": True}, "add_generation_prompt"),
    ({"messages": PREFILLED, "response_format": {"type": "json_object"}}, "messages"),
])
def test_refusals_name_the_field(tiny_model_dir: str, body: dict[str, Any], field: str) -> None:
    r = call(app_for(tiny_model_dir, "x"), "POST", "/v1/chat/completions",
             {**body, "continue_final_message": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_a_template_that_opens_thinking_needs_it_off(thinking_dir: str) -> None:
    app = app_for(thinking_dir, "x")
    body = {"messages": PREFILLED, "continue_final_message": True}
    r = call(app, "POST", "/v1/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"
    r = call(app, "POST", "/v1/chat/completions",
             {**body, "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "x"


def test_add_generation_prompt_alone_is_ignored(tiny_model_dir: str) -> None:
    app = app_for(tiny_model_dir, "x")
    plain = call(app, "POST", "/v1/chat/completions", {"messages": PREFILLED}).json()
    r = call(app, "POST", "/v1/chat/completions", {"messages": PREFILLED, "add_generation_prompt": False})
    assert r.status_code == 200 and r.json()["usage"] == plain["usage"]


def test_a_refused_part_names_its_own_index(tiny_model_dir: str) -> None:
    r = call(app_for(tiny_model_dir, "x"), "POST", "/v1/chat/completions", {
        "continue_final_message": True, "messages": [*ASK, {"role": "assistant", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.1.content"
