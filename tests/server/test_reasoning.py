"""Thinking models: the reply's <think> block as reasoning_content (split whole and streamed in
any pieces alike), chat_template_kwargs reaching the template, and the wiring through a real
server whose chat template opens the block (or, with enable_thinking false, closes it)."""
from __future__ import annotations

import random
from typing import Optional

import httpx
import openai
import pytest

from server.reasoning import REASONING, ReasoningSplit, prompt_opens_block, split, template_thinks
from tests.server.conftest import ServerProcess

CASES = [  # (reply, the prompt opened the block, expected reasoning, expected content)
    ("<think>\nLet me see.\n</think>\n\nParis.", False, "\nLet me see.\n", "Paris."),
    ("  <think>a < b</think>b", False, "a < b", "b"),
    ("Let me see.\n</think>\n\nParis.", True, "Let me see.\n", "Paris."),
    ("still thinking when max_tokens hit", True, "still thinking when max_tokens hit", ""),
    ("<think>cut", False, "cut", ""),
    ("Paris, no thinking.", False, None, "Paris, no thinking."),
    ("<thing> is not a tag", False, None, "<thing> is not a tag"),
    ("", True, "", ""),
]


@pytest.mark.parametrize("reply,inside,reasoning,content", CASES)
def test_split_whole_and_streamed_in_any_pieces(reply: str, inside: bool, reasoning: Optional[str],
                                                 content: str) -> None:
    assert split(reply, inside) == (reasoning, content)
    rng = random.Random(len(reply))
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(reply) + 1), min(4, len(reply) + 1)))
        pieces = [reply[a:b] for a, b in zip([0, *cuts], [*cuts, len(reply)])]
        st = ReasoningSplit(inside)
        parts = [p for piece in pieces for p in st.feed(piece)] + st.feed("", final=True)
        assert "".join(t for f, t in parts if f == REASONING) == (reasoning or "")
        assert "".join(t for f, t in parts if f != REASONING) == content
        fields = [f for f, _ in parts]
        assert fields == sorted(fields, key=lambda f: f != REASONING)     # reasoning comes first


def test_template_and_prompt_detection() -> None:
    assert template_thinks("{% if '</think>' in content %}...{% endif %}")
    assert not template_thinks("<|im_start|>assistant\n")
    assert prompt_opens_block("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_block("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_block("<|im_start|>assistant\n")


ASK = [{"role": "user", "content": "What is the capital of France?"}]


def test_a_reply_inside_the_opened_block_is_reasoning(thinking: ServerProcess) -> None:
    client = openai.OpenAI(base_url=thinking.base + "/v1", api_key="unused", max_retries=0)
    name = client.models.list().data[0].id
    r = client.chat.completions.create(model=name, messages=ASK, max_tokens=12, temperature=0)
    msg = r.choices[0].message.model_dump()
    assert msg["content"] == "" and len(msg[REASONING]) > 0   # the tiny model never closes the block
    # streamed: the same text arrives as reasoning_content deltas, with each token's logprobs
    chunks = list(client.chat.completions.create(model=name, messages=ASK, max_tokens=12, temperature=0,
                                                 stream=True, logprobs=True))
    deltas = [c.choices[0].delta.model_dump() for c in chunks if c.choices]
    assert "".join(d.get(REASONING) or "" for d in deltas) == msg[REASONING]
    assert not "".join(d.get("content") or "" for d in deltas)
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert len(tokens) == r.usage.completion_tokens
    # enable_thinking false through chat_template_kwargs: the template closes the block, all content
    off = client.chat.completions.create(model=name, messages=ASK, max_tokens=12, temperature=0,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off.choices[0].message.content and REASONING not in off.choices[0].message.model_dump(
        exclude_none=True)
    assert off.usage.prompt_tokens > r.usage.prompt_tokens


def test_template_kwargs_named_like_python_parameters_are_plain_variables(thinking: ServerProcess) -> None:
    r = httpx.post(thinking.base + "/v1/chat/completions", timeout=30,
                   json={"messages": ASK, "max_tokens": 2, "chat_template_kwargs": {"self": 1, "variables": 2}})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("kwargs,field", [({"messages": []}, "messages"), ({"bad key": 1}, "bad key"),
                                          ({f"k{i}": i for i in range(33)}, "33 entries")])
def test_bad_chat_template_kwargs_are_400(thinking: ServerProcess, kwargs: dict, field: str) -> None:
    r = httpx.post(thinking.base + "/v1/chat/completions", timeout=30,
                   json={"messages": ASK, "max_tokens": 2, "chat_template_kwargs": kwargs})
    assert r.status_code == 400 and field in r.json()["error"]["message"]
    assert httpx.get(thinking.base + "/health", timeout=5).status_code == 200
