"""The harmony parser (gpt-oss): reasoning, content and tool calls read from a reply whole and
streamed in any pieces alike, partial tags held back, preambles, several calls, malformed calls,
bare replies and headers without <|channel|>; the grammars of forced calls and of response_format
(random sampling under them always gives a valid call, valid JSON); the history and tools as
gpt-oss's template reads them."""
from __future__ import annotations

import json
import random
from typing import Any, Iterator, Optional

import jinja2
import jsonschema
import pytest
import torch
from tokenizers import AddedToken, Tokenizer

from engine.constraints import GrammarCompiler
from engine.protocol import Constraint, SamplingParams
from engine.sampling import SamplerState, sample
from server.harmony import (HarmonySplit, forcing_grammar, parse, read_header, response_format_grammar,
                            template_harmony, template_messages, template_tools)
from server.reasoning import CONTENT, REASONING
from server.structured import check, response_format_constraint
from server.tokenizer import HARMONY_TAGS, TemplateError, compile_chat_template
from server.tools import ToolSetup, prompt_messages
from tests.engine.test_constraints import EOS, byte_tokenizer
from tests.server.harmony_model import GPT_OSS_LIKE_TEMPLATE
from tests.server.test_tools import SCHEMAS, TOOLS

FUNCS = tuple(t["function"] for t in TOOLS)
AUTO = ToolSetup(FUNCS, "auto", None, True, "harmony")
SINGLE = ToolSetup(FUNCS, "auto", None, False, "harmony")
FORCED = ToolSetup(FUNCS, "required", None, True, "harmony")
THINK = "<|channel|>analysis<|message|>The user wants the weather.<|end|>"
WEATHER = ('<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json'
           '<|message|>{"city":"Paris","days":2}<|call|>')
TIME = '<|start|>assistant to=functions.get_time<|channel|>commentary json<|message|>{"zone": "UTC"}<|call|>'
PARIS = {"city": "Paris", "days": 2}

# (reply, tools, expected reasoning, content, calls as (name, arguments))
CASES: list[tuple[str, Optional[ToolSetup], Optional[str], str, list[tuple[str, Any]]]] = [
    (THINK + "<|start|>assistant<|channel|>final<|message|>Paris.<|return|>", None,
     "The user wants the weather.", "Paris.", []),
    ("<|channel|>final<|message|>No thinking.<|return|>", AUTO, None, "No thinking.", []),
    (THINK + WEATHER, AUTO, "The user wants the weather.", "", [("get_weather", PARIS)]),
    # the recipient before the channel, the content type without <|constrain|>
    (TIME.removeprefix("<|start|>assistant"), AUTO, None, "", [("get_time", {"zone": "UTC"})]),
    # a preamble (commentary without a recipient) is content for the user
    (THINK + "<|start|>assistant<|channel|>commentary<|message|>Let me look that up.<|end|>" + WEATHER, AUTO,
     "The user wants the weather.", "Let me look that up.", [("get_weather", PARIS)]),
    (WEATHER.removeprefix("<|start|>assistant") + TIME, AUTO, None, "",
     [("get_weather", PARIS), ("get_time", {"zone": "UTC"})]),
    (WEATHER.removeprefix("<|start|>assistant") + TIME, SINGLE, None, "", [("get_weather", PARIS)]),
    # two messages of one channel are joined by a newline, as vLLM joins them
    (THINK + "<|start|>assistant<|channel|>analysis<|message|>Then answer.<|end|>"
     "<|start|>assistant<|channel|>final<|message|>a < b, 1 <| 2<|return|>", None,
     "The user wants the weather.\nThen answer.", "a < b, 1 <| 2", []),
    # calls that are no calls stay their channel's text: malformed JSON, an unknown function,
    # arguments that are not an object, a call without tools, a call cut short
    ('<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": Paris}<|call|>', AUTO,
     None, '{"city": Paris}', []),
    ('<|channel|>commentary to=functions.unknown <|constrain|>json<|message|>{}<|call|>', AUTO, None, "{}", []),
    ('<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>["UTC"]<|call|>', AUTO,
     None, '["UTC"]', []),
    (WEATHER, None, None, '{"city":"Paris","days":2}', []),
    (WEATHER[:-12], AUTO, None, '{"city":"Paris","days', []),
    # forced: a call cut by max_tokens keeps its arguments so far (as the other formats' do)
    (WEATHER[:-12], FORCED, None, "", [("get_weather", '{"city":"Paris","days')]),
    ("<|channel|>analysis<|message|>still thinking when max_tokens hit", FORCED,
     "still thinking when max_tokens hit", "", []),
    # not harmony (no header): all content; a header cut short says nothing
    ("Plain words, no tags.", AUTO, None, "Plain words, no tags.", []),
    ("to be or not", None, None, "to be or not", []),
    ("<|channel|>analysis", None, None, "", []),
    ("", None, None, "", []),
    # a message without <|end|> ends where the next header begins; stray header tags are dropped
    ("<|channel|>analysis<|message|>a<|constrain|>b<|start|>assistant<|channel|>final<|message|>c<|end|>  ",
     None, "ab", "c", []),
    ("<|channel|>final<|message|>done<|return|><|end|><|end|>", None, None, "done", []),
    # header words only, ended by <|return|>, <|end|> or <|call|> rather than <|message|>: a bare
    # reply, content as written
    ("assistant: the answer is 4.<|return|>", None, None, "assistant: the answer is 4.", []),
    ("assistant: 4<|end|><|start|>assistant<|channel|>final<|message|>Yes.<|return|>", AUTO, None,
     "assistant: 4\nYes.", []),
    ("to=functions.get_time now<|call|>", AUTO, None, "to=functions.get_time now", []),
    ("finally, words", None, None, "finally, words", []),
    ("analysis of the data", None, None, "analysis of the data", []),
    # a header that names its channel without <|channel|>
    ("analysis<|message|>The user says hi.<|end|><|start|>assistant<|channel|>final<|message|>Hello!<|return|>",
     None, "The user says hi.", "Hello!", []),
    ('commentary to=functions.get_time<|message|>{"zone": "UTC"}<|call|>', AUTO, None, "",
     [("get_time", {"zone": "UTC"})]),
    # a response_format reply: the final channel's JSON, the content type named
    (THINK + '<|start|>assistant<|channel|>final <|constrain|>json<|message|>{"a": 1}<|return|>', None,
     "The user wants the weather.", '{"a": 1}', []),
]


def _collect(deltas: list[dict[str, Any]]) -> tuple[str, str, dict[int, dict[str, str]]]:
    calls: dict[int, dict[str, str]] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            c = calls.setdefault(tc["index"], {"name": "", "arguments": ""})
            if "id" in tc:
                assert tc["id"].startswith("call_") and tc["type"] == "function" and not c["name"]
                c["name"] = tc["function"]["name"]
            c["arguments"] += tc["function"]["arguments"]
    return ("".join(d.get(REASONING, "") for d in deltas), "".join(d.get(CONTENT, "") for d in deltas), calls)


def _args(value: Any) -> Any:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


@pytest.mark.parametrize("reply,setup,reasoning,content,calls", CASES)
def test_whole_and_streamed_at_every_boundary_agree(reply: str, setup: Optional[ToolSetup],
                                                    reasoning: Optional[str], content: str,
                                                    calls: list[tuple[str, Any]]) -> None:
    thought, text, got = parse(reply, setup)
    assert (thought, text) == (reasoning, content)
    want = [(name, _args(args)) for name, args in calls]
    assert [(c.name, c.arguments) for c in got] == want
    pieces_by_cut = [[reply[:i], reply[i:]] for i in range(len(reply) + 1)]
    rng = random.Random(len(reply))
    for _ in range(20):   # and in several random pieces
        cuts = sorted(rng.sample(range(len(reply) + 1), min(5, len(reply) + 1)))
        pieces_by_cut.append([reply[a:b] for a, b in zip([0, *cuts], [*cuts, len(reply)])])
    for pieces in pieces_by_cut:
        split = HarmonySplit(setup)
        deltas = [d for p in pieces for d in split.feed(p)] + split.feed("", final=True)
        r, c, streamed = _collect(deltas)
        assert (r if split.thought else None, c) == (reasoning, content), pieces
        assert [(v["name"], v["arguments"]) for _, v in sorted(streamed.items())] == want, pieces
        texts = [v for d in deltas for v in d.values() if isinstance(v, str)]
        assert all(texts) and not any(t in v for v in texts for t in HARMONY_TAGS)   # no tag leaks


PIECES = [*HARMONY_TAGS, "assistant", "analysis", "final", "commentary", " to=functions.get_time",
          " to=python", " json", '{"zone": "UTC"}', "{", "x", " ", "\n", ",", "<", "|", ">"]


def test_any_mix_of_tags_and_text_parses_alike_whole_and_streamed() -> None:
    """Malformed replies too (headers without messages, tags in odd places, text between
    messages): the parser ends, streamed pieces agree with the whole, no tag ever shows."""
    rng = random.Random(7)
    for _ in range(400):
        reply = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 14)))
        setup = rng.choice([None, AUTO, SINGLE, FORCED])
        thought, content, calls = parse(reply, setup)
        for field in (thought or "", content):
            assert not any(t in field for t in HARMONY_TAGS), reply
        cuts = sorted(rng.sample(range(len(reply) + 1), min(4, len(reply) + 1)))
        split = HarmonySplit(setup)
        deltas = [d for a, b in zip([0, *cuts], [*cuts, len(reply)]) for d in split.feed(reply[a:b])]
        r, c, streamed = _collect(deltas + split.feed("", final=True))
        assert (r if split.thought else None, c) == (thought, content), reply
        assert [(v["name"], v["arguments"]) for _, v in sorted(streamed.items())] == \
            [(x.name, x.arguments) for x in calls], reply


def test_partial_tags_are_held_back_until_decided() -> None:
    split = HarmonySplit(None)
    assert split.feed("<|chan") == [] and split.feed("nel|>final<|mess") == []
    assert split.feed("age|>Hi <") == [{CONTENT: "Hi "}]      # '<' may begin <|end|>
    assert split.feed("|en") == []
    assert split.feed("d|>") == []                             # it did: nothing shows
    assert split.feed("<|start|>assistant<|channel|>final<|message|>x <b") == [{CONTENT: "\nx <b"}]
    assert split.feed("", final=True) == []
    # a reply cut inside a tag's start releases it as text
    split = HarmonySplit(None)
    assert split.feed("<|channel|>final<|message|>a <|") == [{CONTENT: "a "}]
    assert split.feed("", final=True) == [{CONTENT: "<|"}]


def test_analysis_is_content_when_reasoning_is_off() -> None:
    reply = CASES[0][0]
    assert parse(reply, None, reasoning=False) == (None, "The user wants the weather.\nParis.", [])


def test_tool_call_deltas_have_openai_shape() -> None:
    split = HarmonySplit(AUTO)
    long_args = json.dumps({"city": "x" * 60, "days": 3})
    deltas = split.feed(f"<|channel|>commentary to=functions.get_weather<|message|>{long_args}<|call|>",
                        final=True)
    head, *rest = deltas
    assert head == {"tool_calls": [{"index": 0, "id": split.calls[0].id, "type": "function",
                                    "function": {"name": "get_weather", "arguments": ""}}]}
    assert len(rest) > 1 and all(set(d["tool_calls"][0]) == {"index", "function"} for d in rest)
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in rest) == long_args


def test_header_and_template_detection() -> None:
    assert read_header("<|channel|>commentary to=functions.f <|constrain|>json") == ("commentary", "functions.f")
    assert read_header(" to=functions.f<|channel|>commentary json") == ("commentary", "functions.f")
    assert read_header("<|channel|>final") == ("final", None)
    assert read_header("analysis") == ("analysis", None)                # <|channel|> left out
    assert read_header(" commentary to=functions.f") == ("commentary", "functions.f")
    assert read_header("finally") == (None, None) and read_header("assistant final") == (None, None)
    assert template_harmony("{{ '<|start|>assistant<|channel|>final<|message|>' }}")
    assert not template_harmony("<|im_start|>assistant\n<think>")


def harmony_byte_tokenizer(folder: str) -> dict[str, int]:
    """The byte-level tokenizer of the constraint tests, with harmony's tags as special tokens."""
    byte_tokenizer(folder)
    tk = Tokenizer.from_file(f"{folder}/tokenizer.json")
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in HARMONY_TAGS])
    tk.save(f"{folder}/tokenizer.json")
    return {t: tk.token_to_id(t) for t in HARMONY_TAGS}


def sampled_texts(folder: Any, tags: dict[str, int], constraint: Constraint, n: int = 8) -> Iterator[str]:
    """``n`` replies sampled at random (seeds 0..n-1) under ``constraint``, each to the grammar's
    end (where the engine ends a request); <|end|> boosted so that thoughts end after a few tokens."""
    vocab = max(tags.values()) + 1
    tk = Tokenizer.from_file(str(folder / "tokenizer.json"))
    compiler = GrammarCompiler(str(folder), vocab, (tags["<|return|>"], tags["<|call|>"], EOS))
    for seed in range(n):
        state = SamplerState(SamplingParams(temperature=1.0, seed=seed, constraint=constraint), (1,))
        state.grammar = compiler.matcher(constraint)
        gen = torch.Generator().manual_seed(seed)
        out: list[int] = []
        for _ in range(600):
            logits = torch.randn(1, vocab, generator=gen) * 3
            logits[0, tags["<|end|>"]] += 4.0
            (c,) = sample(logits, [state])
            state.note(c.token)
            out.append(c.token)
            if state.grammar.finished:
                break
        assert state.grammar.finished and state.grammar.error is None
        yield tk.decode(out, skip_special_tokens=False)


@pytest.mark.parametrize("choice,named", [("required", None), ("named", "get_time"), ("named", "get_weather")])
def test_random_sampling_under_the_forcing_grammar_always_gives_a_valid_call(tmp_path, choice: str,
                                                                              named: Optional[str]) -> None:
    tags = harmony_byte_tokenizer(str(tmp_path))
    setup = ToolSetup(FUNCS, choice, named, True, "harmony")
    constraint = Constraint(forcing_grammar(setup))
    check(constraint.lark, "tools")                      # the server's own check passes it
    seen, thought = set(), 0
    for text in sampled_texts(tmp_path, tags, constraint):
        assert text.endswith("<|call|>") and "<|channel|>commentary to=functions." in text, text
        reasoning, content, calls = parse(text, setup)
        assert content == "" and len(calls) == 1, text
        assert named is None or calls[0].name == named
        jsonschema.validate(json.loads(calls[0].arguments), SCHEMAS[calls[0].name])
        seen.add(calls[0].name)
        thought += reasoning is not None
    assert named is not None or seen == set(SCHEMAS)     # required: the grammar offers every function
    assert 0 < thought < 8                               # reasoning may come first, or not


def test_history_is_given_as_the_gpt_oss_template_reads_it() -> None:
    """OpenAI clients send a tool-call turn back with content null and its reasoning as
    reasoning_content; gpt-oss's template reads ``thinking`` and tests ``in message.content``."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    hist = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "reasoning_content": "plan", "tool_calls": [call]},
            {"role": "assistant", "content": "done", "reasoning_content": "r", "thinking": "own"}]
    out = template_messages(hist)
    assert out[0] == hist[0]
    assert "content" not in out[1] and out[1]["thinking"] == "plan" and out[1]["tool_calls"] == [call]
    assert out[2]["thinking"] == "own" and out[2]["content"] == "done"
    assert hist[1]["content"] is None                     # the request's own list is left as it was



CALL_W = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}
CALL_T = {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}
CALL_X = {"id": "c3", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome", "days": 1}'}}


def test_a_preamble_beside_reasoning_is_folded_into_thinking() -> None:
    """The server's own reply to a tool call (preamble as content, reasoning, the call) sent back:
    gpt-oss's template refuses content beside thinking on a tool-call turn."""
    hist = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Checking.", "reasoning_content": "plan", "tool_calls": [CALL_W]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "assistant", "content": "", "tool_calls": [CALL_T]},      # message_dicts' null
            {"role": "assistant", "content": "Let me see.", "tool_calls": [CALL_T]},
            {"role": "assistant", "content": None}]
    out = template_messages(hist)
    assert out[1]["thinking"] == "plan\nChecking." and "content" not in out[1]
    assert out[1]["tool_calls"] == [CALL_W] and out[2] == hist[2]
    assert "content" not in out[3] and "thinking" not in out[3]
    assert out[4]["content"] == "Let me see." and "thinking" not in out[4]   # the template's analysis
    assert out[5] == {"role": "assistant", "content": ""}
    assert hist[1]["content"] == "Checking." and "thinking" not in hist[1]   # the request's list as it was
    assert render(hist[:3]).endswith(
        "<|start|>user<|message|>hi<|end|><|start|>assistant<|channel|>analysis<|message|>plan\nChecking.<|end|>"
        '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris", "days": 1}'
        "<|call|><|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>sunny<|end|>"
        "<|start|>assistant")
    unfolded = [hist[0], {**hist[1], "thinking": "plan"}, hist[2]]     # (the fold undone)
    with pytest.raises(TemplateError, match="both content and thinking"):
        render(unfolded, shape_messages=False)


def test_a_turn_with_several_calls_becomes_one_turn_per_call() -> None:
    """Each call followed by its own result (by tool_call_id, whatever order the results came in),
    results that match no call after the last; the reasoning on the first."""
    hist = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "reasoning_content": "plan", "tool_calls": [CALL_W, CALL_T, CALL_X]},
            {"role": "tool", "tool_call_id": "c2", "content": "12:00"},
            {"role": "tool", "content": "no id"},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "c9", "content": "unknown id"},
            {"role": "tool", "tool_call_id": "c3", "content": "rain"},
            {"role": "user", "content": "thanks"}]
    out = template_messages(hist)
    assert [(m["role"], [c["id"] for c in m.get("tool_calls", [])], m.get("content"), m.get("thinking"))
            for m in out] == [
        ("user", [], "hi", None),
        ("assistant", ["c1"], None, "plan"), ("tool", [], "sunny", None),
        ("assistant", ["c2"], None, None), ("tool", [], "12:00", None),
        ("assistant", ["c3"], None, None), ("tool", [], "rain", None),
        ("tool", [], "no id", None), ("tool", [], "unknown id", None),
        ("user", [], "thanks", None)]
    assert out[1]["reasoning_content"] == "plan" and REASONING not in out[3]
    text = render(hist)
    results = [part.split("<|message|>")[0] + ":" + part.split("<|message|>")[1].split("<|end|>")[0]
               for part in text.split("<|start|>functions.")[1:]]
    assert results == ["get_weather to=assistant<|channel|>commentary:sunny",
                       "get_time to=assistant<|channel|>commentary:12:00",
                       "get_weather to=assistant<|channel|>commentary:rain",
                       "get_weather to=assistant<|channel|>commentary:no id",
                       "get_weather to=assistant<|channel|>commentary:unknown id"]
    assert text.count("<|channel|>analysis<|message|>plan<|end|>") == 1 and text.count("<|call|>") == 3


def test_a_tool_without_description_gets_an_empty_one() -> None:
    tools = [dict(t) for t in TOOLS]
    out = template_tools(tools)
    assert out[0] == TOOLS[0] and out[1]["function"] == {**TOOLS[1]["function"], "description": ""}
    assert template_tools([{"type": "function", "function": {"name": "f", "description": None}}]) == [
        {"type": "function", "function": {"name": "f", "description": ""}}]
    assert "description" not in TOOLS[1]["function"] and tools == TOOLS     # left as they were
    assert "// \ntype get_time\n" in render([{"role": "user", "content": "hi"}])
    with pytest.raises(jinja2.UndefinedError, match="description"):       # as they were sent
        render([{"role": "user", "content": "hi"}], shape_tools=False)


def render(history: list[dict[str, Any]], shape_messages: bool = True, shape_tools: bool = True) -> str:
    """The prompt that a template written like gpt-oss's makes of ``history`` and TOOLS, shaped by
    template_messages and template_tools as the server shapes them (or not)."""
    messages, extra = prompt_messages(template_messages(history) if shape_messages else history, AUTO, True)
    if shape_tools:
        extra["tools"] = template_tools(extra["tools"])
    return compile_chat_template(GPT_OSS_LIKE_TEMPLATE).render(messages=messages, add_generation_prompt=True, **extra)


@pytest.mark.parametrize("reasoning", [True, False])
def test_random_sampling_under_the_response_format_grammar_gives_its_json_as_content(
        tmp_path, reasoning: bool) -> None:
    """response_format in harmony: reasoning may come first (not where reasoning is off), then the
    final channel, its body the JSON the schema asks for, which is the content alone."""
    tags = harmony_byte_tokenizer(str(tmp_path))
    rf = {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMAS["get_weather"], "strict": True}}
    inner = response_format_constraint(rf)
    assert inner is not None
    constraint = check(response_format_grammar(inner.lark, reasoning), "response_format")
    thought, constrained = 0, 0
    for text in sampled_texts(tmp_path, tags, constraint):
        assert "<|channel|>final" in text and "commentary" not in text, text
        reasoning_text, content, calls = parse(text, None, reasoning)
        jsonschema.validate(json.loads(content), SCHEMAS["get_weather"])
        assert content == text.split("<|message|>")[-1].removesuffix("<|return|>") and calls == []
        thought += reasoning_text is not None
        constrained += "<|constrain|>json" in text
    assert (0 < thought < 8) if reasoning else thought == 0
    assert 0 < constrained < 8                           # <|constrain|>json may come, or not
