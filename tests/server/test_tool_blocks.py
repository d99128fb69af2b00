"""The block tool-call formats, MiniMax-M2's (--tool-parser minimax_m2) and DeepSeek's
(deepseek_v3, deepseek_v31): whole replies and streams split at every point agree, validation
against the tools, the history rendered through templates like the models' own, detection from
the chat template, and the tokenizer keeping DeepSeek's tags where they are special tokens."""
from __future__ import annotations

import json
import os

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from server.tokenizer import TextTokenizer, compile_chat_template
from server.tool_blocks import DEEPSEEK_TAGS
from server.tools import ToolSetup, ToolStream, parse, prompt_messages, template_style
from tests.server.test_tool_formats import FUNCS

CB, CE, B, E, SEP = ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
                     "<｜tool▁call▁end｜>", "<｜tool▁sep｜>")
STYLES = ("minimax_m2", "deepseek_v3", "deepseek_v31")
WEATHER, TIME = {"city": "Paris", "days": 3}, {"zone": "UTC"}
NOTE_ARGS = {"text": "line 1\n<b>2</b>", "tags": [1, 2], "urgent": True}


def setup(style: str, choice: str = "auto", parallel: bool = True) -> ToolSetup:
    return ToolSetup(FUNCS, choice, None, parallel, style)


def call(style: str, name: str, args: dict) -> str:
    """One call as the model writes it (its chat template renders past calls so)."""
    if style == "minimax_m2":
        pairs = "".join(f'<parameter name="{k}">{v if isinstance(v, str) else json.dumps(v)}</parameter>\n'
                        for k, v in args.items())
        return f'<invoke name="{name}">\n{pairs}</invoke>\n'
    if style == "deepseek_v3":
        return f"{B}function{SEP}{name}\n```json\n{json.dumps(args)}\n```{E}"
    return f"{B}{name}{SEP}{json.dumps(args)}{E}"


def block(style: str, *calls: tuple[str, dict]) -> str:
    if style == "minimax_m2":
        return "<minimax:tool_call>\n" + "".join(call(style, n, a) for n, a in calls) + "</minimax:tool_call>"
    return CB + ("\n" if style == "deepseek_v3" else "").join(call(style, n, a) for n, a in calls) + CE


def calls_of(text: str, s: ToolSetup) -> tuple[str, list[tuple[str, object]]]:
    content, calls = parse(text, s)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("style", STYLES)
def test_whole_replies_with_several_calls_and_text_around_them(style: str) -> None:
    two = block(style, ("get_weather", WEATHER), ("get_time", TIME))
    want = [("get_weather", WEATHER), ("get_time", TIME)]
    assert calls_of(two, setup(style)) == ("", want)
    assert calls_of(f"Let me look.\n{two}\nBack soon.", setup(style)) == ("Let me look.\nBack soon.", want)
    assert calls_of(f"Checking. {two}\n\n", setup(style)) == ("Checking.", want)
    # two blocks, and one call only without parallel_tool_calls
    assert calls_of(block(style, ("get_time", TIME)) + block(style, ("get_weather", WEATHER)),
                    setup(style))[1] == [("get_time", TIME), ("get_weather", WEATHER)]
    assert calls_of(two, setup(style, parallel=False))[1] == want[:1]
    # arguments by the schema: a string stays a string, the others are JSON
    note = block(style, ("add_note", NOTE_ARGS))
    assert calls_of(note, setup(style))[1] == [("add_note", NOTE_ARGS)]
    assert calls_of(block(style, ("get_time", {})), setup(style))[1] == [("get_time", {})]


@pytest.mark.parametrize("style", STYLES)
def test_malformed_or_unknown_calls_stay_text(style: str) -> None:
    s = setup(style)
    unknown = block(style, ("delete_everything", {"now": True}))
    if style == "minimax_m2":
        broken = "<minimax:tool_call>\n<invoke name=\"get_time\">\nzone = UTC\n</invoke>\n</minimax:tool_call>"
    else:
        broken = block(style, ("get_time", TIME)).replace('"UTC"}', '"UTC"')     # not JSON
    for text in (unknown, broken, "plain words", f"Hi {unknown} there"):
        content, calls = parse(text, s)
        assert calls == [] and content == (text if style == "minimax_m2" else strip_tags(text)), text
    # a bad call beside a good one: the good one is a call, the other stays text
    mixed = block(style, ("delete_everything", {}), ("get_time", TIME))
    content, calls = calls_of(mixed, s)
    assert calls == [("get_time", TIME)] and "delete_everything" in content
    # an unclosed call at the end of an auto reply (max_tokens) is text
    cut = block(style, ("get_time", TIME))
    cut = cut[:cut.index("UTC")]
    assert parse(cut, s)[1] == []


def strip_tags(text: str) -> str:
    for tag in DEEPSEEK_TAGS:
        text = text.replace(tag, " " if tag == SEP else "")
    return text


def test_deepseek_tags_never_reach_the_content() -> None:
    for style in ("deepseek_v3", "deepseek_v31"):
        stray = f"Done.{CE}"                   # a closing tag with no block
        assert parse(stray, setup(style)) == ("Done.", [])
        unknown = block(style, ("nope", {"a": 1}))
        content, _ = parse("Trying: " + unknown, setup(style))
        assert not any(t in content for t in DEEPSEEK_TAGS) and "nope" in content and '{"a": 1}' in content


def test_minimax_values_are_read_as_its_parsers_read_them() -> None:
    s = setup("minimax_m2")
    text = ('<minimax:tool_call>\n<invoke name=\'add_note\'>\n<parameter name="text">\n  padded  \n</parameter>\n'
            '<parameter name="tags">\n[1, 2]\n</parameter>\n<parameter name="urgent">yes</parameter>\n'
            '</invoke>\n</minimax:tool_call>')
    assert calls_of(text, s)[1] == [("add_note", {"text": "padded", "tags": [1, 2], "urgent": True})]
    loose = {"name": "f", "parameters": {"type": "object", "properties": {
        "n": {"type": ["integer", "null"]}, "s": {"type": "string"}, "b": {"type": "boolean"}}}}
    words = ToolSetup((loose,), "auto", None, True, "minimax_m2")
    for raw, want in (("nil", None), ("None", None), ("12", 12), ("off", False), ("True", True)):
        key = "b" if want in (True, False) else "n"
        text = f'<minimax:tool_call><invoke name="f"><parameter name="{key}">{raw}</parameter></invoke></minimax:tool_call>'
        assert calls_of(text, words)[1] == [("f", {key: want})], raw
    text = '<minimax:tool_call><invoke name="f"><parameter name="s">null</parameter></invoke></minimax:tool_call>'
    assert calls_of(text, words)[1] == [("f", {"s": "null"})]       # a string stays as written


@pytest.mark.parametrize("style", STYLES)
def test_a_cut_forced_call_keeps_what_was_written(style: str) -> None:
    forced = setup(style, "required")
    done = block(style, ("get_time", TIME))
    text = done[:-len("</minimax:tool_call>" if style == "minimax_m2" else CE)]     # the block's end cut
    assert calls_of(text, forced) == ("", [("get_time", TIME)])
    weather = block(style, ("get_time", TIME), ("get_weather", WEATHER))
    cut = weather[:weather.index("days") + 2]
    content, calls = parse(cut, forced)
    assert content == "" and [c.name for c in calls] == ["get_time", "get_weather"]
    assert calls[1].arguments.startswith('{"city": "Paris"')
    head = weather[:weather.index("get_wea") + 7]          # the name itself cut: no call
    assert [c.name for c in parse(head, forced)[1]] == ["get_time"]
    content, calls = parse(cut, setup(style))       # auto: the cut call is text
    assert [c.name for c in calls] == ["get_time"] and "Paris" in content


def replies(style: str) -> list[str]:
    two = block(style, ("get_weather", WEATHER), ("get_time", TIME))
    return [f"Let me look.\n{two}\nBack soon.", two, "Just text, no calls.\n",
            f"A {block(style, ('nope', {}))} B", block(style, ("nope", {}), ("add_note", NOTE_ARGS)) + " tail",
            f"{block(style, ('get_time', TIME))} and {block(style, ('get_time', {'zone': 'CET'}))}"]


def stream(text: str, s: ToolSetup, cuts: list[int]) -> tuple[str, list[tuple[str, object]], int]:
    st, deltas, last = ToolStream(s), [], 0
    for cut in [*cuts, len(text)]:
        deltas += st.feed(text[last:cut])
        last = cut
    deltas += st.finish()
    calls: dict[int, list[str]] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            if "id" in tc:
                calls[tc["index"]] = [tc["function"]["name"], ""]
            calls[tc["index"]][1] += tc["function"]["arguments"]
    content = "".join(d.get("content", "") for d in deltas)
    return content, [(n, json.loads(a)) for n, a in calls.values()], st.calls


@pytest.mark.parametrize("style", STYLES)
def test_streams_split_anywhere_agree_with_the_whole_reply(style: str) -> None:
    s = setup(style)
    for text in replies(style):
        whole = calls_of(text, s)
        for i in range(len(text) + 1):
            content, calls, n = stream(text, s, [i])
            assert (content, calls) == whole and n == len(calls), (text[:i], text[i:])
        assert stream(text, s, list(range(len(text))))[:2] == whole      # a character at a time


@pytest.mark.parametrize("style", STYLES)
def test_a_call_is_sent_when_it_is_complete_and_tags_are_held_back(style: str) -> None:
    two = block(style, ("get_weather", WEATHER), ("get_time", TIME))
    first_end = two.index("</invoke>" if style == "minimax_m2" else E) + len("</invoke>" if style == "minimax_m2" else E)
    st = ToolStream(setup(style))
    out = st.feed("Looking" + two[:first_end])
    assert [d for d in out if "content" in d] == [{"content": "Looking"}]
    heads = [d["tool_calls"][0] for d in out if "tool_calls" in d and "id" in d["tool_calls"][0]]
    assert [h["function"]["name"] for h in heads] == ["get_weather"] and st.calls == 1
    st = ToolStream(setup(style))
    opening = two[:len("<minimax:tool_call>" if style == "minimax_m2" else CB) - 3]
    assert st.feed("Hi " + opening) == [{"content": "Hi"}]          # a possible tag start waits


MINIMAX_LIKE = (
    "{% for m in messages %}{% if m.role == 'assistant' %}]~b]ai\n{{ m.content }}{% if m.tool_calls %}"
    "\n<minimax:tool_call>\n{% for tc in m.tool_calls %}<invoke name=\"{{ tc.function.name }}\">\n"
    "{% for k, v in tc.function.arguments|items %}<parameter name=\"{{ k }}\">"
    "{{ v if v is string else v|tojson }}</parameter>\n{% endfor %}</invoke>\n{% endfor %}"
    "</minimax:tool_call>{% endif %}[e~[\n{% elif m.role == 'tool' %}]~b]tool\n<response>{{ m.content }}"
    "</response>[e~[\n{% else %}]~b]{{ m.role }}\n{{ m.content }}{% if tools %}<tools>{% for t in tools %}"
    "{{ t.function|tojson }}{% endfor %}</tools>{% endif %}[e~[\n{% endif %}{% endfor %}")
DEEPSEEK_LIKE = (      # DeepSeek's templates: no tools; calls and arguments concatenated as text
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' and m['tool_calls'] is defined %}<｜Assistant｜>"
    "{{ m['content'] if m['content'] is not none else '' }}<｜tool▁calls▁begin｜>"
    "{% for tool in m['tool_calls'] %}{{ '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n```json\\n' + tool['function']['arguments'] + '\\n```<｜tool▁call▁end｜>' }}"
    "{% endfor %}<｜tool▁calls▁end｜><｜end▁of▁sentence｜>{% elif m['role'] == 'tool' %}"
    "<｜tool▁output▁begin｜>{{ m['content'] }}<｜tool▁output▁end｜>{% elif m['role'] == 'assistant' %}"
    "<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}")
HISTORY = [{"role": "user", "content": "Time?"},
           {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_time", "arguments": "{\"zone\": \"UTC\"}"}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]


def test_history_reaches_each_template_in_the_form_it_renders() -> None:
    messages, extra = prompt_messages(HISTORY, setup("minimax_m2"), template_takes_tools=True)
    prompt = compile_chat_template(MINIMAX_LIKE).render(messages=messages, **extra)
    assert '<invoke name="get_time">\n<parameter name="zone">UTC</parameter>\n</invoke>' in prompt
    assert '"name": "get_weather"' in prompt and "<response>12:00</response>" in prompt
    for style in ("deepseek_v3", "deepseek_v31"):
        messages, extra = prompt_messages(HISTORY, setup(style), template_takes_tools=False)
        assert extra == {} and messages[0]["role"] == "system" and "### get_weather" in messages[0]["content"]
        form = f"{B}function{SEP}tool_call_name\n```json" if style == "deepseek_v3" else f"{B}tool_call_name{SEP}"
        assert form in messages[0]["content"]
        prompt = compile_chat_template(DEEPSEEK_LIKE).render(messages=messages)
        assert f'{B}function{SEP}get_time\n```json\n{{"zone": "UTC"}}\n```{E}' in prompt
        assert "<｜tool▁output▁begin｜>12:00<｜tool▁output▁end｜>" in prompt
    # a template that renders no calls: MiniMax's form in the text, its listing in the system message
    messages, _ = prompt_messages(HISTORY, setup("minimax_m2"), template_takes_tools=False)
    assert "<minimax:tool_call>" in messages[0]["content"] and "<tool>{" in messages[0]["content"]
    assert messages[2]["content"] == block("minimax_m2", ("get_time", TIME))


def test_auto_picks_the_format_whose_tags_the_template_writes() -> None:
    assert template_style(MINIMAX_LIKE) == "minimax_m2"
    assert template_style(DEEPSEEK_LIKE) == "deepseek_v3"
    v31 = DEEPSEEK_LIKE.replace("tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + "
                                "'\\n```json\\n' + tool['function']['arguments'] + '\\n```",
                                "tool['function']['name'] + '<｜tool▁sep｜>' + tool['function']['arguments'] + '")
    assert "```json" not in v31 and template_style(v31) == "deepseek_v31"


def special_tokenizer(folder: str, tags: tuple[str, ...]) -> None:
    """A byte-level BPE with an end-of-sequence token (id 256) and ``tags`` as special tokens."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>", *tags])
    tok.save(os.path.join(folder, "tokenizer.json"))


def test_the_tokenizer_keeps_deepseek_tags_that_are_special_tokens(tmp_path) -> None:
    special_tokenizer(str(tmp_path), (*DEEPSEEK_TAGS, "<｜end▁of▁sentence｜>"))
    tk = TextTokenizer(str(tmp_path))
    text = block("deepseek_v31", ("get_time", TIME))
    ids = tk.encode(text + "<｜end▁of▁sentence｜>", add_special_tokens=False)
    assert tk.decode(ids) == text                   # the tags kept, the end of sentence dropped
    assert tk.single_tags == frozenset(DEEPSEEK_TAGS)
    assert calls_of(tk.decode(ids), setup("deepseek_v31"))[1] == [("get_time", TIME)]
