"""Every pre-tokenizer name moeserve's GGUF conversion knows (convert/gguf_pre.py, and those
transformers knows) splits text as llama.cpp's own tokenizer does: the same token ids from a
vocab-only load of the same file. Skipped unless llama-cpp-python is installed (`make bench-install`)."""
from __future__ import annotations

import copy
import importlib.util
from typing import Any, Optional

import pytest

from convert.gguf_convert import ensure_gguf
from convert.gguf_pre import known_names, split_like_llama_cpp
from tests.convert.gguf_cases import FAMILIES, OVERRIDES
from tests.engine.tiny_families import make_family_checkpoint

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python is not installed (make bench-install)")
# text where the splits differ: digits (ASCII, full-width, Arabic-Indic), Han beside Latin with no
# space, kana, Hangul, cased contractions, punctuation runs, every kind of whitespace
TEXTS = ("Année 2024: 12345 tokens!", "价格是 1234567 元。你好，世界", "line one\n\n  line two\r\n\tend  ",
         "x=(a+b)*c; // ok?!... 'quoted' \"too\"", "日本語のテキストとカタカナ", "   leading and trailing   ",
         "emoji 🙂, Ωmega and ṃaṇi", "$3.50 + 7% = ???", "价格abc中文Def測試XYZ", "I'M SURE they'LL say DON'T",
         "１２３ full-width ٣٤٥ digits", "한국어 텍스트 ㄱㄴ and 123,456.78", "CamelCaseWord snake_case_word HTTPServer",
         "tabs\t\tand\u3000ideographic space", "<think>\n\n</think>\n\nok", "a\n\n\n\nb    c")


@pytest.fixture(scope="module")
def llama_hf(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_family_checkpoint("llama", str(tmp_path_factory.mktemp("hf")),
                                  overrides={**OVERRIDES, **FAMILIES["llama"]})


def gguf_naming(pre: Optional[str], hf: str, path: str) -> str:
    """A tiny GGUF with SmolLM2's vocabulary naming pre-tokenizer ``pre`` (None: naming none)."""
    from tests.convert.gguf_writer import smollm2_tokenizer, write_gguf
    tok = smollm2_tokenizer()
    if pre is None:
        del tok["tokenizer.ggml.pre"]
    else:
        tok["tokenizer.ggml.pre"] = (pre, tok["tokenizer.ggml.pre"][1])
    return write_gguf(hf, path, tok)


def llama_cpp_ids(path: str) -> Any:
    import llama_cpp
    try:
        theirs = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    except ValueError:          # this llama.cpp predates the name
        pytest.skip("the installed llama.cpp does not know this pre-tokenizer")
    return lambda text: theirs.tokenize(text.encode(), add_bos=False, special=False)


@pytest.mark.parametrize("pre", sorted(known_names()))
def test_each_known_pre_tokenizer_splits_as_llama_cpp_splits(pre: str, llama_hf: str,
                                                             smollm2_hf_tokenizer: Any, tmp_path: Any) -> None:
    theirs = llama_cpp_ids(gguf_naming(pre, llama_hf, str(tmp_path / "m.gguf")))
    ours = copy.deepcopy(smollm2_hf_tokenizer)
    split_like_llama_cpp(ours, "m.gguf", pre)
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=False) == theirs(text), text


@pytest.mark.parametrize("pre", ["kimi-k2", "deepseek-llm", "smollm", None])
def test_a_converted_checkpoints_tokenizer_keeps_the_split(pre: Optional[str], llama_hf: str, tmp_path: Any) -> None:
    """Through the whole conversion: the tokenizer.json written beside the checkpoint (a file
    naming no pre-tokenizer: split by llama.cpp's 'default', as llama.cpp splits it)."""
    from transformers import PreTrainedTokenizerFast
    path = gguf_naming(pre, llama_hf, str(tmp_path / "m.gguf"))
    theirs = llama_cpp_ids(path)
    ours = PreTrainedTokenizerFast.from_pretrained(ensure_gguf(path, home=str(tmp_path / "home"), progress=False))
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=False) == theirs(text), text
