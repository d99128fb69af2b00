"""The tagged-pairs tool-call formats, GLM-4.5's (--tool-parser glm45) and Qwen3-Coder's
(qwen3_coder): parsing what their templates teach, cut forced calls, streaming, the forcing
grammar (random sampling under it always parses into calls that validate), detection from the
chat template, and the wiring through a real server."""
from __future__ import annotations

import json
from typing import Iterator

import jsonschema
import openai
import pytest
from tokenizers import Tokenizer

from engine.constraints import GrammarCompiler
from engine.protocol import Constraint
from server.errors import APIError
from server.tools import ToolSetup, ToolStream, forcing_grammar, parse, template_style
from tests.engine.test_constraints import EOS, byte_tokenizer
from tests.server.conftest import parser_client
from tests.server.test_tools import ASK, SCHEMAS, TOOLS, check_calls

NOTE = {"type": "object", "properties": {"text": {"type": "string"}, "tags": {"type": "array", "items": {
    "type": "integer"}}, "urgent": {"type": "boolean"}}, "required": ["text"], "additionalProperties": False}
FUNCS = tuple(t["function"] for t in TOOLS) + ({"name": "add_note", "parameters": NOTE},)
GLM = ToolSetup(FUNCS, "auto", None, True, "glm45")
WEATHER_CALL = "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n" \
               "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"


QWEN = ToolSetup(FUNCS, "auto", None, True, "qwen3_coder")
STYLES = ["glm45", "qwen3_coder"]


def render(style: str, name: str, args: dict[str, object]) -> str:
    """A call as each model's chat template writes a past one (GLM: non-strings as JSON; Qwen3-Coder:
    objects and lists as JSON, other values through Python's str)."""
    if style == "glm45":
        pairs = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{v if isinstance(v, str) else json.dumps(v)}"
                        f"</arg_value>\n" for k, v in args.items())
        return f"<tool_call>{name}\n{pairs}</tool_call>"
    pairs = "".join(f"<parameter={k}>\n{json.dumps(v) if isinstance(v, (dict, list)) else str(v)}\n</parameter>\n"
                    for k, v in args.items())
    return f"<tool_call>\n<function={name}>\n{pairs}</function>\n</tool_call>"


def calls_of(text: str, setup: ToolSetup = GLM) -> tuple[str, list[tuple[str, object]]]:
    content, calls = parse(text, setup)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


def test_glm_blocks_parse_with_types_from_the_schema() -> None:
    assert calls_of("Let me look.\n" + WEATHER_CALL) == ("Let me look.", [("get_weather", {"city": "Paris", "days": 3})])
    two = WEATHER_CALL + "\n<tool_call>get_time\n<arg_key>zone</arg_key>\n<arg_value>UTC</arg_value>\n</tool_call>"
    assert calls_of(two)[1] == [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {"zone": "UTC"})]
    # a string parameter keeps what looks like JSON; the others are read as JSON
    note = ("<tool_call>add_note\n<arg_key>text</arg_key>\n<arg_value>42</arg_value>\n<arg_key>tags</arg_key>\n"
            "<arg_value>[1, 2]</arg_value>\n<arg_key>urgent</arg_key>\n<arg_value>true</arg_value>\n</tool_call>")
    assert calls_of(note)[1] == [("add_note", {"text": "42", "tags": [1, 2], "urgent": True})]
    assert calls_of("<tool_call>get_time\n</tool_call>")[1] == [("get_time", {})]
    # the Hermes form in the same tags is read too; one call only without parallel_tool_calls
    hermes = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    assert calls_of(hermes)[1] == [("get_time", {"zone": "CET"})]
    single = ToolSetup(FUNCS, "auto", None, False, "glm45")
    assert [n for n, _ in calls_of(two, single)[1]] == ["get_weather"]
    for text in ("<tool_call>unknown\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n</tool_call>",
                 "<tool_call>get_time\nzone = UTC\n</tool_call>", "plain words"):
        assert parse(text, GLM) == (text, [])


def test_qwen3_coder_blocks_parse_as_its_template_writes_them() -> None:
    weather = render("qwen3_coder", "get_weather", {"city": "Paris", "days": 3})
    assert weather.startswith("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>")
    assert calls_of("Checking.\n" + weather, QWEN) == ("Checking.", [("get_weather", {"city": "Paris", "days": 3})])
    # Python's str of True and a multi-line string value, kept as written
    note = render("qwen3_coder", "add_note", {"text": "line 1\n<b>line 2</b>", "tags": [1, 2], "urgent": True})
    assert calls_of(note, QWEN)[1] == [("add_note", {"text": "line 1\n<b>line 2</b>", "tags": [1, 2], "urgent": True})]
    assert calls_of("<tool_call>\n<function=get_time>\n</function>\n</tool_call>", QWEN)[1] == [("get_time", {})]
    hermes = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    assert calls_of(hermes, QWEN)[1] == [("get_time", {"zone": "CET"})]
    cut = weather[:weather.index("<parameter=days>")] + "<parameter=da"
    forced = ToolSetup(FUNCS, "required", None, True, "qwen3_coder")
    assert [(c.name, c.arguments) for c in parse(cut, forced)[1]] == [("get_weather", '{"city": "Paris"')]
    assert parse("<tool_call>\n<function=get_wea", forced)[1] == []


def test_qwen3_coder_values_keep_their_own_newlines_and_json_safe_literals() -> None:
    text = "<tool_call>\n<function=add_note>\n<parameter=text>\n\nindented\n\n</parameter>\n</function>\n</tool_call>"
    assert calls_of(text, QWEN)[1] == [("add_note", {"text": "\nindented\n"})]   # one newline each side is the form's
    loose = {"name": "f", "parameters": {"type": "object", "properties": {"v": {"type": ["string", "null"]}}}}
    setup = ToolSetup((loose,), "auto", None, True, "qwen3_coder")
    for raw, want in (("{1, 2}", "{1, 2}"), ("1e999", "1e999"), ("Paris", "Paris"), ("None", None),
                      ("{'a': (1, 2)}", {"a": [1, 2]})):
        block = f"<tool_call>\n<function=f>\n<parameter=v>\n{raw}\n</parameter>\n</function>\n</tool_call>"
        assert calls_of(block, setup)[1] == [("f", {"v": want})], raw


def test_values_holding_the_closing_tag_and_cut_names() -> None:
    extra = {"name": "log", "parameters": {"type": "object", "properties": {"meta": {"type": "object"}}}}
    setup = ToolSetup(FUNCS + (extra,), "auto", None, True, "glm45")
    block = '<tool_call>log\n<arg_key>meta</arg_key>\n<arg_value>{"s": "</arg_value>"}</arg_value>\n</tool_call>'
    assert calls_of(block, setup)[1] == [("log", {"meta": {"s": "</arg_value>"}})]   # JSON read whole
    # a name cut by max_tokens is no call, though it spells another function ("get" of "get_time")
    short = ToolSetup(FUNCS + ({"name": "get", "parameters": {"type": "object", "properties": {}}},),
                      "required", None, True, "glm45")
    assert parse("<tool_call>get", short)[1] == []
    assert calls_of("<tool_call>get</tool_call>", short)[1] == [("get", {})]   # a closed block is one
    # annotations a raw string cannot break are fine when forcing (pydantic and FastMCP write them)
    annotated = {"name": "f", "parameters": {"type": "object", "properties": {"unit": {
        "type": "string", "title": "Unit", "default": "celsius", "x-order": 1}}, "required": ["unit"]}}
    forcing_grammar(ToolSetup((annotated,), "required", None, True, "glm45"))
    # GLM-4.5-Air sometimes puts a space, not a newline, after the name
    spaced = "<tool_call>get_time <arg_key>zone</arg_key><arg_value>UTC</arg_value></tool_call>"
    assert calls_of(spaced)[1] == [("get_time", {"zone": "UTC"})]
    # a malformed schema is no crash when parsing (auto) and a 400 when forcing
    for params in ({"type": "object", "properties": ["x"]}, {"type": "object", "properties": {"x": {"enum": 5}}},
                   {"type": "object", "properties": {"x": {"type": "integer"}}, "required": 5}):
        odd = ToolSetup(({"name": "odd", "parameters": params},), "auto", None, True, "glm45")
        assert calls_of("<tool_call>odd\n<arg_key>x</arg_key>\n<arg_value>1</arg_value>\n</tool_call>", odd)[1] == [
            ("odd", {"x": 1})]


@pytest.mark.parametrize("schema,message", [
    ({"type": "object", "properties": ["x"]}, "properties must be an object"),
    ({"type": "object", "properties": {"x": {"type": "string"}}, "required": 5}, "required must be"),
    ({"type": "object", "properties": {"x": {"type": "string"}}, "required": ["y"]}, "required must be"),
    ({"type": "object", "properties": {"x": {"enum": ["a", "b</arg_value>"]}}}, "holding '</'"),
    ({"type": "object", "properties": {"id": {"type": "string", "pattern": "^[0-9]+$"}}}, "pattern"),
    ({"type": "object", "properties": {"id": {"type": "string", "format": "date"}}}, "format"),
    ({"type": "object", "properties": {"id": {"type": "string", "minLength": None}}}, "length bounds"),
    ({"type": "object", "properties": {"id": {"type": "string", "minLength": 5, "maxLength": 2}}}, "length"),
])
@pytest.mark.parametrize("style", STYLES)
def test_forced_calls_refuse_what_the_raw_form_cannot_enforce(schema: dict, message: str, style: str) -> None:
    setup = ToolSetup(({"name": "f", "parameters": schema},), "required", None, True, style)
    with pytest.raises(APIError, match=message) as e:
        forcing_grammar(setup)
    assert e.value.status == 400 and e.value.param.startswith("tools.0.function.parameters")


@pytest.mark.parametrize("style", STYLES)
def test_free_text_values_cannot_hide_a_closing_tag(tmp_path, style: str) -> None:
    """The grammar's free text never holds '</' (which would end the value early when parsed),
    yet may hold '<' anywhere, at its end too."""
    byte_tokenizer(str(tmp_path))
    tk = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    compiler = GrammarCompiler(str(tmp_path), EOS + 1, (EOS,))
    grammar = Constraint(forcing_grammar(ToolSetup(FUNCS, "named", "add_note", True, style)))

    def accepts(value: str) -> bool:
        m = compiler.matcher(grammar)
        text = render(style, "add_note", {"text": value})
        for t in tk.encode(text).ids:
            if not m.allowed()[t]:
                return False
            m.consume(t)
        return m.finished
    assert accepts("a<b> c\n") and accepts("a<") and accepts("<<x") and accepts("")
    close = "</arg_value>\n" if style == "glm45" else "\n</parameter>\n"
    assert not accepts("<" + close) and not accepts("a</b")
    # a bounded string ends at any length within its bounds (Qwen3-Coder's tag starts with a newline)
    bounded = ToolSetup(({"name": "add_note", "parameters": {"type": "object", "properties": {
        "text": {"type": "string", "minLength": 1, "maxLength": 5}}, "required": ["text"]}},),
        "named", "add_note", True, style)
    grammar = Constraint(forcing_grammar(bounded))
    assert accepts("ab") and accepts("abcde") and accepts("\n")
    assert not accepts("") and not accepts("abcdef")


def test_a_cut_forced_glm_call_keeps_its_complete_pairs() -> None:
    forced = ToolSetup(FUNCS, "required", None, True, "glm45")
    cut = WEATHER_CALL[:WEATHER_CALL.index("<arg_key>days")] + "<arg_key>da"
    content, calls = parse(cut, forced)
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Paris"')]
    assert parse("<tool_call>get_wea", forced) == ("<tool_call>get_wea", [])   # the name itself was cut
    assert parse(cut, GLM) == (cut, [])       # auto: what the model chose to write stays text


def test_glm_stream_sends_content_then_the_call() -> None:
    st = ToolStream(GLM)
    deltas = []
    text = "Checking." + WEATHER_CALL
    for i in range(0, len(text), 7):
        deltas += st.feed(text[i:i + 7])
    deltas += st.finish()
    assert "".join(d.get("content", "") for d in deltas) == "Checking."
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(c["function"].get("arguments", "") for c in calls)) == {"city": "Paris", "days": 3}


def test_auto_picks_the_format_whose_tags_the_template_writes() -> None:
    glm_like = "{% for tc in m.tool_calls %}<tool_call>{{ tc.name }}\n<arg_key>{{ k }}</arg_key>{% endfor %}"
    assert template_style(glm_like) == "glm45"
    qwen_like = "{{- '<function=' + tool_call.name + '>\\n' }}{{- '<parameter=' + args_name + '>\\n' }}"
    assert template_style(qwen_like) == "qwen3_coder"
    assert template_style("{{ '<tool_call>' }}") == template_style("") == "hermes"


@pytest.fixture(scope="module", params=STYLES + ["minimax_m2", "deepseek_v31"])
def styled_client(request: pytest.FixtureRequest, tiny_model_dir: str,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, openai.OpenAI]]:
    yield from parser_client(request.param, tiny_model_dir, tmp_path_factory)


def test_server_forces_and_streams_calls_in_the_chosen_format(styled_client: tuple[str, openai.OpenAI]) -> None:
    """The tiny model's tokenizer (SmolLM2's) has none of these formats' tags: the grammars spell
    them out."""
    style, client = styled_client
    name = client.models.list().data[0].id
    r = client.chat.completions.create(model=name, messages=ASK, tools=TOOLS, tool_choice="required",
                                       seed=3, max_tokens=200, logprobs=True)
    assert r.choices[0].finish_reason == "tool_calls"
    written = "".join(t.token for t in r.choices[0].logprobs.content)     # the model's own text
    head, pair = {"glm45": ("<tool_call>get_", "<arg_key>"),
                  "qwen3_coder": ("<tool_call>\n<function=get_", "<parameter="),
                  "minimax_m2": ('<minimax:tool_call>\n<invoke name="get_', "<parameter name="),
                  # (DeepSeek's fullwidth tags come as partial UTF-8 tokens: not checked as text)
                  "deepseek_v31": ("", "")}[style]
    assert written.startswith(head) and pair in written, written
    check_calls(r.choices[0].message.tool_calls, set(SCHEMAS))
    assert not r.choices[0].message.content
    stream = client.chat.completions.create(
        model=name, messages=ASK, tools=TOOLS, stream=True, seed=4, max_tokens=200,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    parts, finish, content = [], None, ""
    for chunk in stream:
        for tc in chunk.choices[0].delta.tool_calls or []:
            parts.append(tc.function.arguments or "")
        content += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == ""
    jsonschema.validate(json.loads("".join(parts)), SCHEMAS["get_weather"])
