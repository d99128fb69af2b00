"""Grammar-constrained decoding libraries compared on this model's tokenizer: per-token overhead
(mask computation + masking a logits row + advancing the matcher) along valid JSON outputs, compile
time per schema, and how many of a set of JSON Schema features each compiles.

    python -m bench.constrained_decoding --model DIR [--extra-path /tmp/xgr]

Writes bench/results/constrained_decoding.json. Libraries that do not import are reported as such.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

# (name, schema, a valid instance): the features a front end's tool or response schema uses
CASES: list[tuple[str, dict[str, Any], Any]] = [
    ("object+required", {"type": "object", "properties": {"name": {"type": "string"},
     "age": {"type": "integer"}}, "required": ["name", "age"]}, {"name": "Ada", "age": 36}),
    ("enum+number", {"type": "object", "properties": {"unit": {"enum": ["c", "f"]},
     "t": {"type": "number"}}, "required": ["unit", "t"]}, {"unit": "c", "t": 21.5}),
    ("array minItems/maxItems", {"type": "array", "items": {"type": "integer"}, "minItems": 2,
     "maxItems": 4}, [1, 2, 3]),
    ("anyOf", {"anyOf": [{"type": "string"}, {"type": "integer"}]}, "x"),
    ("$ref/$defs", {"$defs": {"p": {"type": "object", "properties": {"x": {"type": "integer"}},
     "required": ["x"]}}, "type": "object", "properties": {"a": {"$ref": "#/$defs/p"}},
     "required": ["a"]}, {"a": {"x": 1}}),
    ("recursive $ref", {"$defs": {"n": {"type": "object", "properties": {"v": {"type": "integer"},
     "kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}}, "required": ["v"]}},
     "$ref": "#/$defs/n"}, {"v": 1, "kids": [{"v": 2}]}),
    ("string pattern", {"type": "object", "properties": {"id": {"type": "string",
     "pattern": "^[A-Z]{3}-[0-9]{2}$"}}, "required": ["id"]}, {"id": "ABC-12"}),
    ("string minLength/maxLength", {"type": "string", "minLength": 2, "maxLength": 5}, "abc"),
    ("format date-time", {"type": "string", "format": "date-time"}, "2024-01-02T03:04:05Z"),
    ("integer bounds", {"type": "integer", "minimum": 1, "maximum": 9}, 5),
    ("additionalProperties false", {"type": "object", "properties": {"a": {"type": "string"}},
     "additionalProperties": False, "required": ["a"]}, {"a": "b"}),
    ("oneOf", {"oneOf": [{"type": "object", "properties": {"k": {"const": "a"}}, "required": ["k"]},
     {"type": "object", "properties": {"k": {"const": "b"}}, "required": ["k"]}]}, {"k": "b"}),
    ("free object (json_object)", {"type": "object"}, {"reply": "hello there", "n": [1, 2]}),
    ("tool call args", {"type": "object", "properties": {"location": {"type": "string"},
     "days": {"type": "integer", "minimum": 1, "maximum": 14},
     "units": {"type": "string", "enum": ["metric", "imperial"]}},
     "required": ["location", "days"], "additionalProperties": False},
     {"location": "Paris, France", "days": 3, "units": "metric"}),
]


def byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level alphabet: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Lib:
    name = ""

    def compile(self, schema: dict[str, Any]) -> Any: ...
    def run(self, compiled: Any, tokens: list[int], logits: torch.Tensor) -> list[float]: ...


class LLGuidance(Lib):
    name = "llguidance"

    def __init__(self, tok_json: str, vocab: int, eos: int) -> None:
        import llguidance
        self.ll = llguidance
        self.tok = llguidance.LLTokenizer(tok_json, n_vocab=vocab, eos_token=eos)
        self.vocab = vocab

    def compile(self, schema: dict[str, Any]) -> Any:
        g = self.ll.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False})
        m = self.ll.LLMatcher(self.tok, g, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def run(self, m: Any, tokens: list[int], logits: torch.Tensor) -> list[float]:
        mask = torch.full(((self.vocab + 31) // 32,), -1, dtype=torch.int32)
        bits = torch.arange(32, dtype=torch.int32)
        out = []
        for t in tokens:
            t0 = time.perf_counter()
            m.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
            allowed = ((mask[:, None] >> bits) & 1).flatten()[:self.vocab].bool()
            row = logits.masked_fill(~allowed, float("-inf"))
            assert torch.isfinite(row[t]), "token not allowed"
            assert m.consume_token(t), m.get_error()
            out.append(time.perf_counter() - t0)
        return out


class OutlinesCore(Lib):
    name = "outlines-core"

    def __init__(self, tok_json: str, vocab: int, eos: int) -> None:
        from outlines_core import Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema
        self.Index, self.regex = Index, build_regex_from_schema
        dec = byte_decoder()
        v = json.loads(tok_json)["model"]["vocab"]
        m: dict[bytes, list[int]] = {}
        for s, i in v.items():
            if i == eos or i >= vocab:
                continue
            try:
                b = bytes(dec[c] for c in s)
            except KeyError:
                b = s.encode()
            m.setdefault(b, []).append(i)
        self.vocabulary = Vocabulary(eos, m)
        self.vocab = vocab

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.Index(self.regex(json.dumps(schema), r"[ ]?"), self.vocabulary)

    def run(self, index: Any, tokens: list[int], logits: torch.Tensor) -> list[float]:
        state = index.get_initial_state()
        out = []
        for t in tokens:
            t0 = time.perf_counter()
            allowed = torch.tensor(index.get_allowed_tokens(state), dtype=torch.long)
            row = torch.full_like(logits, float("-inf"))
            row[allowed] = logits[allowed]
            assert torch.isfinite(row[t]), "token not allowed"
            state = index.get_next_state(state, t)
            out.append(time.perf_counter() - t0)
        return out


class XGrammar(Lib):
    name = "xgrammar"

    def __init__(self, tok_json: str, vocab: int, eos: int) -> None:
        import xgrammar as xgr
        self.x = xgr
        v = json.loads(tok_json)["model"]["vocab"]
        enc = [""] * vocab
        for s, i in v.items():
            if i < vocab:
                enc[i] = s
        info = xgr.TokenizerInfo(enc, xgr.VocabType.BYTE_LEVEL, vocab_size=vocab,
                                 stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(info)
        self.vocab = vocab

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                  separators=(",", ":"))

    def run(self, compiled: Any, tokens: list[int], logits: torch.Tensor) -> list[float]:
        m = self.x.GrammarMatcher(compiled)
        mask = self.x.allocate_token_bitmask(1, self.vocab)
        out = []
        for t in tokens:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(mask)
            row = logits[None].clone()
            self.x.apply_token_bitmask_inplace(row, mask)
            assert torch.isfinite(row[0, t]), "token not allowed"
            assert m.accept_token(t)
            out.append(time.perf_counter() - t0)
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model directory with tokenizer.json")
    ap.add_argument("--extra-path", default=None, help="a folder to put on sys.path (a library "
                    "installed with pip --target for the comparison only)")
    ap.add_argument("--out", default="bench/results/constrained_decoding.json", help="JSON output")
    args = ap.parse_args(argv)
    if args.extra_path:
        sys.path.append(args.extra_path)
    torch.set_num_threads(1)
    from tokenizers import Tokenizer
    with open(os.path.join(args.model, "tokenizer.json"), encoding="utf-8") as f:
        tok_json = f.read()
    tk = Tokenizer.from_str(tok_json)
    with open(os.path.join(args.model, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    vocab, eos = cfg["vocab_size"], cfg.get("eos_token_id", 2)
    eos = eos[0] if isinstance(eos, list) else eos
    logits = torch.randn(vocab)
    results: dict[str, Any] = {"vocab": vocab, "libraries": {}}
    for cls in (LLGuidance, XGrammar, OutlinesCore):
        try:
            t0 = time.perf_counter()
            lib = cls(tok_json, vocab, eos)
            setup = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            results["libraries"][cls.name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{cls.name}: unavailable ({exc})")
            continue
        per_tok, compiled_ok, compile_s, failures = [], 0, [], {}
        for name, schema, inst in CASES:
            text = json.dumps(inst, separators=(",", ":"))
            ids = tk.encode(text, add_special_tokens=False).ids
            try:
                t0 = time.perf_counter()
                c = lib.compile(schema)
                compile_s.append(time.perf_counter() - t0)
                per_tok += lib.run(c, ids, logits)
                compiled_ok += 1
            except Exception as exc:  # noqa: BLE001
                failures[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
        r = {"setup_s": setup, "schemas_ok": compiled_ok, "schemas": len(CASES),
             "failures": failures,
             "per_token_us_median": statistics.median(per_tok) * 1e6 if per_tok else None,
             "per_token_us_p90": (sorted(per_tok)[int(len(per_tok) * 0.9)] * 1e6
                                  if per_tok else None),
             "compile_ms_median": statistics.median(compile_s) * 1e3 if compile_s else None,
             "compile_ms_max": max(compile_s) * 1e3 if compile_s else None}
        results["libraries"][cls.name] = r
    print(f"{'library':<14} {'setup s':>8} {'schemas':>8} {'tok us p50':>11} {'tok us p90':>11} "
          f"{'compile ms p50':>15} {'max':>9}")
    for name, r in results["libraries"].items():
        if "error" in r:
            print(f"{name:<14} unavailable: {r['error'][:80]}")
            continue
        f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        print(f"{name:<14} {r['setup_s']:>8.2f} {r['schemas_ok']:>4}/{r['schemas']:<3} "
              f"{f(r['per_token_us_median']):>11} {f(r['per_token_us_p90']):>11} "
              f"{f(r['compile_ms_median']):>15} {f(r['compile_ms_max']):>9}")
        for k, v in r["failures"].items():
            print(f"    fails {k}: {v}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
