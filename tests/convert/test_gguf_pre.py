"""The splits of convert/gguf_pre.py, as the models' own tokenizers define them (the comparison
with llama.cpp's tokenizer, name by name, is tests/convert/test_gguf_pre_llama_cpp.py)."""
from __future__ import annotations

import copy
import logging
from typing import Any

import pytest

from convert.gguf_pre import SPLITS, conversion_params, file_pre, known_names, split_like_llama_cpp


@pytest.fixture(scope="module")
def converted(smollm2_hf_tokenizer: Any) -> Any:
    """A copy, whose split each test sets."""
    return copy.deepcopy(smollm2_hf_tokenizer)


def pieces(tok: Any, pre: str, text: str) -> list[str]:
    split_like_llama_cpp(tok, "m.gguf", pre)            # replaces whatever split it had
    return [p for p, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]


def test_every_split_compiles_and_keeps_every_byte(converted: Any) -> None:
    text = "Année 2024: 12345 价格abc中文 I'M 한국어\n\n\tend ٣٤٥  "
    for pre in SPLITS:
        split_like_llama_cpp(converted, "m.gguf", pre)
        assert converted.decode(converted.encode(text, add_special_tokens=False)) == text, pre


@pytest.mark.parametrize("pre, text, expected", [
    # SmolLM2's tokenizer.json: each digit alone (Digits, individual_digits), then GPT-2's rule
    ("smollm", "Tokens 12345 here!", ["Tokens", "Ġ", "1", "2", "3", "4", "5", "Ġhere", "!"]),
    ("smollm", "  12", ["ĠĠ", "1", "2"]),                 # GPT-2's rule: "Ġ", "Ġ12"
    # Kimi-K2's tiktoken pattern: Han runs apart from the Latin words beside them
    ("kimi-k2", "价格abc中文Def", ["ä»·æł¼", "abc", "ä¸Ńæĸĩ", "Def"]),
    ("kimi-k2", "I'M 1234567", ["I'M", "Ġ", "123", "456", "7"]),
    # DeepSeek Coder's: newlines, then letters, punctuation and digits each apart
    ("deepseek-coder", "x1\nfoo()", ["x", "1", "Ċ", "foo", "()"]),
    # Qwen2's rule under Hunyuan's and Grok-2's names: digits alone, cased contractions
    ("grok-2", "WE'LL pay 42", ["WE", "'LL", "Ġpay", "Ġ", "4", "2"]),
])
def test_a_models_own_split(converted: Any, pre: str, text: str, expected: list[str]) -> None:
    assert pieces(converted, pre, text) == expected


def test_an_unknown_name_keeps_gpt2s_rule_and_says_so(smollm2_hf_tokenizer: Any,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    converted = copy.deepcopy(smollm2_hf_tokenizer)
    with caplog.at_level(logging.WARNING, logger="convert.gguf_pre"):
        assert pieces(converted, "no-such-pre", "Tokens 12345") == ["Tokens", "Ġ12345"]
    assert "'no-such-pre' is not one moeserve knows" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="convert.gguf_pre"):
        assert pieces(converted, "olmo", "Tokens 12345") == ["Tokens", "Ġ12345"]     # GPT-2's, by name
    assert caplog.text == ""


def test_conversions_are_made_again_only_where_the_split_changed() -> None:
    assert {pre for pre in known_names() if conversion_params(pre)} == set(SPLITS) - {"deepseek-llm", "deepseek-v3", "glm4"}
    assert conversion_params("qwen2") == conversion_params(None) == {}


def test_a_bpe_file_naming_no_pre_tokenizer_is_split_by_llama_cpps_default(caplog: pytest.LogCaptureFixture) -> None:
    """llama.cpp splits a BPE ('gpt2') vocabulary whose file names no pre-tokenizer by its 'default'
    (a warning says so); a SentencePiece file ('llama') has no pre-tokenizer, and a named one stays."""
    with caplog.at_level(logging.WARNING, logger="convert.gguf_pre"):
        assert file_pre("m.gguf", "qwen2", "gpt2") == "qwen2"
        assert file_pre("m.gguf", None, "llama") is None
        assert caplog.text == ""
        assert file_pre("m.gguf", None, "gpt2") == "default"
    assert "m.gguf names no pre-tokenizer" in caplog.text
    assert conversion_params("default") == {"pre_split": 2}     # such files converted before: again
