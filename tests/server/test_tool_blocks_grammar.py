"""Forced tool calls (tool_choice required/named) in the block formats (minimax_m2, deepseek_v3,
deepseek_v31): random sampling under the grammar always gives calls that parse and validate,
with the formats' tags as single tokens of the tokenizer and spelled out; the tagged formats
(hermes, glm45, qwen3_coder) with their tags as tokens; and the wiring through a real server."""
from __future__ import annotations

import json
import os
import re

import jsonschema
import pytest
import torch
from tokenizers import Tokenizer

from engine.constraints import GrammarCompiler
from engine.protocol import Constraint, SamplingParams
from engine.sampling import SamplerState, sample
from server.errors import APIError
from server.tool_blocks import DEEPSEEK_TAGS, MINIMAX_TAGS
from server.tools import ToolSetup, forcing_grammar, parse
from tests.server.test_tool_blocks import special_tokenizer
from tests.server.test_tool_formats import FUNCS, NOTE
from tests.server.test_tools import SCHEMAS

EOS = 256
TAGS = {"minimax_m2": MINIMAX_TAGS, "deepseek_v3": DEEPSEEK_TAGS, "deepseek_v31": DEEPSEEK_TAGS,
        "hermes": ("<tool_call>", "</tool_call>"), "qwen3_coder": ("<tool_call>", "</tool_call>", "</parameter>"),
        "glm45": ("<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>")}
# a string value's opening and closing (free text: '<', '/' and the newline are made likely in it)
VALUES = {"minimax_m2": ('<parameter name="', "</parameter>"), "qwen3_coder": ("<parameter=", "</parameter>"),
          "glm45": ("<arg_value>", "</arg_value>")}


def compiled(folder: str, style: str, as_tokens: bool) -> tuple[Tokenizer, GrammarCompiler, frozenset[str]]:
    tags = TAGS[style] if as_tokens else ()
    special_tokenizer(folder, tags)
    tk = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    n = tk.get_vocab_size(with_added_tokens=True)
    return tk, GrammarCompiler(folder, n, (EOS,)), frozenset(tags)


def sampled(tk: Tokenizer, compiler: GrammarCompiler, grammar: str, seed: int, style: str) -> str:
    constraint = Constraint(grammar)
    n = tk.get_vocab_size(with_added_tokens=True)
    state = SamplerState(SamplingParams(temperature=1.0, seed=seed, constraint=constraint), (1,))
    state.grammar = compiler.matcher(constraint)
    gen = torch.Generator().manual_seed(seed)
    closers = [tk.token_to_id("<"), tk.token_to_id("/"), *tk.encode("\n").ids]
    closers += [i for i in [tk.token_to_id(VALUES[style][1])] if i is not None] if style in VALUES else []
    opens, closes = VALUES.get(style, ("\0", "\0"))
    out: list[int] = []
    for _ in range(1500):
        logits = torch.randn(1, n, generator=gen) * 3
        logits[0, EOS] -= 2.0                        # let calls grow before the end is allowed
        so_far = tk.decode(out, skip_special_tokens=False)
        if so_far.count(opens) > so_far.count(closes):
            logits[0, closers] += 9.0
        (c,) = sample(logits, [state])
        state.note(c.token)
        if c.token == EOS:
            break
        out.append(c.token)
        if state.grammar.finished:                  # the engine ends the request here
            break
    text = tk.decode(out, skip_special_tokens=False)
    assert state.grammar.finished and state.grammar.error is None, (state.grammar.error, text)
    return text


@pytest.mark.parametrize("as_tokens", [True, False], ids=["tags-as-tokens", "tags-spelled"])
@pytest.mark.parametrize("style", ["minimax_m2", "deepseek_v3", "deepseek_v31", "hermes", "glm45", "qwen3_coder"])
@pytest.mark.parametrize("choice,named", [("required", None), ("named", "add_note"), ("named", "get_weather")])
def test_random_sampling_under_the_grammar_always_gives_valid_calls(tmp_path, style: str, choice: str,
                                                                     named: str, as_tokens: bool) -> None:
    tk, compiler, tokens = compiled(str(tmp_path), style, as_tokens)
    setup = ToolSetup(FUNCS, choice, named, True, style, frozenset(tokens))
    grammar = forcing_grammar(setup)
    assert all((t in grammar.replace(f'"{t}"', "")) == as_tokens for t in tokens)   # named bare
    schemas, seen = {**SCHEMAS, "add_note": NOTE}, set()
    for seed in range(5):
        text = sampled(tk, compiler, grammar, seed, style)
        content, calls = parse(text, setup)
        assert content == "" and calls, text
        for call in calls:
            assert named is None or call.name == named
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
            seen.add(call.name)
        if style == "minimax_m2":                      # its parser trims values: none needed it
            values = re.findall(r'<parameter name="[^"]*">(.*?)</parameter>', text, re.S)
            assert values and all(v == v.strip() for v in values), text
    assert named is not None or len(seen) >= 2         # required: the grammar offers every function


def test_minimax_free_text_neither_starts_nor_ends_with_space(tmp_path) -> None:
    tk, compiler, _ = compiled(str(tmp_path), "minimax_m2", False)

    def accepts(setup: ToolSetup, value: str) -> bool:
        m = compiler.matcher(Constraint(forcing_grammar(setup)))
        text = (f'<minimax:tool_call>\n<invoke name="add_note">\n<parameter name="text">{value}</parameter>\n'
                "</invoke>\n</minimax:tool_call>")
        for t in tk.encode(text).ids:
            if not m.allowed()[t]:
                return False
            m.consume(t)
        return m.finished
    free = ToolSetup(FUNCS, "named", "add_note", True, "minimax_m2")
    for value in ("a<b> c\nd", "a<", "<<x", "", "x", "<", "é"):
        assert accepts(free, value), value
    for value in (" a", "a ", "\n", "a</b", "a\n"):
        assert not accepts(free, value), value
    bounded = ToolSetup(({"name": "add_note", "parameters": {"type": "object", "properties": {
        "text": {"type": "string", "minLength": 2, "maxLength": 4}}, "required": ["text"]}},),
        "named", "add_note", True, "minimax_m2")
    for value, ok in (("ab", True), ("a  b", True), ("abcd", True), ("a", False), ("abcde", False),
                      (" ab", False), ("ab ", False)):
        assert accepts(bounded, value) == ok, value


@pytest.mark.parametrize("schema,message", [
    ({"type": "object", "properties": {"id": {"type": "string", "pattern": "^[0-9]+$"}}}, "pattern"),
    ({"type": "object", "properties": {"x": {"enum": ["a", "b</parameter>"]}}}, "holding '</'"),
])
def test_minimax_refuses_what_its_raw_values_cannot_enforce(schema: dict, message: str) -> None:
    with pytest.raises(APIError, match=message) as e:
        forcing_grammar(ToolSetup(({"name": "f", "parameters": schema},), "required", None, True, "minimax_m2"))
    assert e.value.status == 400
