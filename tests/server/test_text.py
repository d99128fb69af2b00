"""Tokenizer, chat template, incremental detokenization and stop strings against the real tokenizer."""
from __future__ import annotations

import pytest

from server.detokenize import IncrementalDetokenizer, StopMatcher
from server.tokenizer import TemplateError, TextTokenizer, compile_chat_template

TEXTS = ["Hello, world! Ünïcödé ✓ 日本語のテキスト 🙂🚀 done.", "  leading spaces\n\nand\ttabs  ",
         "naïve café — “quotes” and emoji 👩‍👩‍👧 family"]


@pytest.fixture(scope="module")
def tok(tiny_model_dir: str) -> TextTokenizer:
    return TextTokenizer(tiny_model_dir)


def test_chat_template_matches_transformers(tok: TextTokenizer, tiny_model_dir: str) -> None:
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(tiny_model_dir)
    for messages in ([{"role": "user", "content": "Hi there"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}]):
        want = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tok.render_chat(messages) == want
        ids = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert tok.encode_chat(messages) == list(ids)


def test_raise_exception_in_template_is_a_template_error() -> None:
    tpl = compile_chat_template("{% if messages[0]['role'] != 'user' %}"
                                "{{ raise_exception('first message must be user') }}{% endif %}ok")
    assert tpl.render(messages=[{"role": "user"}]) == "ok"
    with pytest.raises(TemplateError, match="first message must be user"):
        tpl.render(messages=[{"role": "system"}])


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenization_equals_full_decode_and_never_splits_characters(
        tok: TextTokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    # byte-level tokens split multi-byte characters: some token must have been held back
    if any(ord(c) > 0x7FF for c in text):
        assert "" in pieces[:-1]


def test_special_tokens_are_skipped(tok: TextTokenizer) -> None:
    ids = tok.encode("Hi", add_special_tokens=False) + [2]   # 2 = <|im_end|>
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.add(t) for t in ids) + detok.flush() == "Hi"


def _run_stops(pieces: list[str], stops: list[str]) -> tuple[list[str], bool]:
    m = StopMatcher(stops)
    out = [m.feed(p) for p in pieces]
    if not m.stopped:
        out.append(m.flush())
    return out, m.stopped


def test_stop_string_spanning_pieces_is_cut_without_leaking() -> None:
    out, stopped = _run_stops(["Hello wo", "rld, EN", "D", "MARK tail"], ["ENDMARK"])
    assert stopped and "".join(out) == "Hello world, "
    # nothing that could begin the stop string was released before the match was decided
    assert out[1] == "rld, " and out[2] == ""


def test_partial_stop_prefix_is_released_when_it_does_not_complete() -> None:
    out, stopped = _run_stops(["abc EN", "Dless", " fin"], ["ENDMARK"])
    assert not stopped and "".join(out) == "abc ENDless fin" and out[0] == "abc "


def test_earliest_of_several_stops_wins() -> None:
    out, stopped = _run_stops(["one two three"], ["three", "two", "zzz"])
    assert stopped and "".join(out) == "one "


def test_no_stops_passes_everything_through() -> None:
    out, stopped = _run_stops(["a", "b", ""], [])
    assert not stopped and out == ["a", "b", "", ""]


def test_parsed_tags_survive_decoding_where_the_tokenizer_marks_them_special(tiny_model_dir: str,
                                                                           tmp_path) -> None:
    """A tokenizer may mark <think> or <tool_call> special; decoding (which drops special tokens)
    still keeps those, since the reasoning and tool-call parsers read them; other special tokens
    (the end of turn) are still dropped. Every tag those parsers read is in the kept list."""
    import shutil

    from tokenizers import Tokenizer

    from server import reasoning, tool_formats, tools
    from server.tokenizer import KEPT_TAGS
    for tag in (reasoning.OPEN, reasoning.CLOSE, tools.OPEN, tools.CLOSE, "<arg_key>", "</arg_key>",
                "<arg_value>", tool_formats.GLM45.value_close):
        assert tag in KEPT_TAGS
    path = str(tmp_path / "tok")
    shutil.copytree(tiny_model_dir, path)
    raw = Tokenizer.from_file(f"{path}/tokenizer.json")
    raw.add_special_tokens(["<think>", "</think>", "<tool_call>"])
    raw.save(f"{path}/tokenizer.json")
    tok = TextTokenizer(path)
    think, close, call = (tok.tokenizer.token_to_id(t) for t in ("<think>", "</think>", "<tool_call>"))
    eos = tok.tokenizer.token_to_id("<|im_end|>")
    ids = [think, *tok.encode("Let me see.", add_special_tokens=False), close,
           *tok.encode(" Paris", add_special_tokens=False), call, eos]
    assert tok.decode(ids) == "<think>Let me see.</think> Paris<tool_call>"
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.add(i) for i in ids) + detok.flush() == tok.decode(ids)


def test_kept_tags_keep_the_decoders_own_spacing(tmp_path) -> None:
    """With a SentencePiece-style decoder (Metaspace, as Llama and Mistral tokenizers have) the
    text after a kept tag keeps its leading space: one decode, not one per run between tags."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    words = ["▁Hello", "▁world", "▁The", "▁answer"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="▁Hello"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    raw.add_special_tokens(["<think>", "</think>", "<eos>"])
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = TextTokenizer(str(tmp_path))
    think, close, eos = (tok.tokenizer.token_to_id(t) for t in ("<think>", "</think>", "<eos>"))
    ids = [think, 0, 1, close, 2, 3, eos]
    want = tok.tokenizer.decode(ids[:-1], skip_special_tokens=False)
    assert tok.decode(ids) == want and "</think> The answer" in want


def test_a_sentencepiece_only_checkpoint_is_told_how_to_write_tokenizer_json(tmp_path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json .*save_pretrained"):
        TextTokenizer(str(tmp_path))
