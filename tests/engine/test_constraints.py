"""Grammar masks per row: a constrained row of a batch follows its grammar to the end, the free
row next to it samples exactly what it samples alone."""
from __future__ import annotations

import json
import os

import jsonschema
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from engine.constraints import GrammarCompiler
from engine.protocol import Constraint, SamplingParams
from engine.sampling import SamplerState, sample
from server.structured import response_format_constraint

EOS = 256
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "b": {"enum": ["x", "yz"]}},
          "required": ["a", "b"], "additionalProperties": False}


def byte_tokenizer(folder: str) -> None:
    """A byte-level BPE with the 256 bytes and an end-of-sequence token (id 256)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    order = sorted(alphabet, key=lambda c: ord(c))
    vocab = {c: i for i, c in enumerate(order)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>"])
    tok.save(os.path.join(folder, "tokenizer.json"))


def test_the_mask_is_per_row(tmp_path) -> None:
    byte_tokenizer(str(tmp_path))
    tk = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tk.token_to_id("<eos>") == EOS
    compiler = GrammarCompiler(str(tmp_path), EOS + 1, (EOS,))
    rf = {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA, "strict": True}}
    constraint = response_format_constraint(rf)
    assert isinstance(constraint, Constraint)
    free_params = SamplingParams(temperature=1.0, seed=11)
    for seed in range(5):
        bound = SamplerState(SamplingParams(temperature=1.0, seed=seed, constraint=constraint), (1,))
        bound.grammar = compiler.matcher(constraint)
        free, alone = SamplerState(free_params, (1,)), SamplerState(free_params, (1,))
        gen = torch.Generator().manual_seed(seed)
        out: list[int] = []
        for _ in range(60):
            logits = torch.randn(2, EOS + 1, generator=gen)
            c_bound, c_free = sample(logits, [bound, free])
            assert c_free.token == sample(logits[1:], [alone])[0].token
            bound.note(c_bound.token)
            if c_bound.token == EOS:
                break
            out.append(c_bound.token)
            if bound.grammar.finished:   # the engine ends the request here
                break
        assert bound.grammar.finished and bound.grammar.error is None
        jsonschema.validate(json.loads(tk.decode(out)), SCHEMA)


def test_a_grammar_that_does_not_compile_is_a_value_error(tmp_path) -> None:
    compiler = GrammarCompiler(str(tmp_path), EOS + 1, (EOS,))
    try:
        compiler.matcher(Constraint("start: %json {}"))
    except ValueError as exc:
        assert "tokenizer.json" in str(exc)   # no tokenizer here: refused, not a crash
    else:
        raise AssertionError("expected ValueError")
    byte_tokenizer(str(tmp_path))
    try:
        GrammarCompiler(str(tmp_path), EOS + 1, (EOS,)).matcher(Constraint("start: nothing_here"))
    except ValueError as exc:
        assert "does not compile" in str(exc)
    else:
        raise AssertionError("expected ValueError")
