"""OpenAI's harmony format (gpt-oss): its replies split into reasoning, content and tool calls,
the history and tools as gpt-oss's chat template reads them, and the grammars of a forced call
and of a response_format reply.

After the prompt's ``<|start|>assistant`` the model writes messages: a header (its channel, and for
a tool call the recipient ``to=functions.NAME``, which may sit before or after the channel), then
``<|message|>``, the body, and ``<|end|>`` (another message follows, from ``<|start|>assistant``),
``<|return|>`` (the answer is done) or ``<|call|>`` (a tool call is done)::

    <|channel|>analysis<|message|>The user asks...<|end|><|start|>assistant<|channel|>final<|message|>Paris.<|return|>
    <|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>

As vLLM and llama.cpp's server deliver it: the analysis channel is ``reasoning_content``; the final
channel, and a commentary message with no recipient (a preamble meant for the user), are
``content``; a message to ``functions.NAME`` is a tool call whose body is its JSON arguments.
The parser reads the decoded tags (server/tokenizer.py keeps them in the text): the openai-harmony
package would fetch its vocabulary from the internet on first use, and moeserve runs offline.
"""
from __future__ import annotations

import json
import re
from typing import Any, Optional

from server.detokenize import partial_suffix
from server.reasoning import CONTENT, REASONING
from server.structured import json_rule
from server.tokenizer import HARMONY_TAGS
from server.tools import ToolCall, ToolSetup, ToolStream, new_id

START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL = HARMONY_TAGS
FUNCTIONS = "functions."
MAX_HEADER = 256                       # characters; a longer "header" is text the model wrote bare
CHANNELS = ("analysis", "commentary", "final")
# what a header may begin with (a channel's bare name too: a header whose <|channel|> the model left out)
_OPENERS = (START, CHANNEL, "assistant", "to=", *CHANNELS)
_TAG = re.compile("|".join(re.escape(t) for t in HARMONY_TAGS))
_HEAD_END = re.compile("|".join(re.escape(t) for t in (MESSAGE, END, RETURN, CALL)))
_HEADER_WORDS = re.compile(r"[\w.\-=: \t]*")      # what a header holds between its tags
_CHANNEL = re.compile(re.escape(CHANNEL) + r"\s*([\w\-]+)")
_BARE_CHANNEL = re.compile(r"\s*(" + "|".join(CHANNELS) + r")(?![\w\-])")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")


def template_harmony(template: str) -> bool:
    """Whether a chat template writes the harmony format (--reasoning-parser/--tool-parser auto)."""
    return CHANNEL in template


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history as gpt-oss's template reads it (the request's own list is left as it was):

    - an assistant turn's reasoning under ``thinking`` (OpenAI clients send it back as
      ``reasoning_content``);
    - a tool-call turn without a ``content`` key where its content is empty or null (clients send
      null, which server/schemas.message_dicts has made ""): the template tests
      ``"..." in message.content`` and refuses content beside thinking on such a turn. Content
      there (a preamble) beside reasoning is folded into ``thinking``: the reasoning, a newline,
      the content;
    - a turn with several calls as one turn per call, each followed by its own tool result
      (matched by ``tool_call_id``; results that match no call keep their order after the last
      call), the reasoning on the first: the template writes only ``tool_calls[0]`` and names every
      tool result after the last call written;
    - another assistant turn's null content as "" (the template adds it to a string)."""
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(messages):
        m = dict(messages[i])
        i += 1
        if m.get("role") != "assistant":
            out.append(m)
            continue
        if m.get(REASONING) and not m.get("thinking"):
            m["thinking"] = m[REASONING]
        calls = m.get("tool_calls")
        if not calls or not isinstance(calls, list):
            if "content" in m and m["content"] is None:
                m["content"] = ""
            out.append(m)
            continue
        content = m.pop("content", None)
        if content and m.get("thinking"):
            m["thinking"] = f"{m['thinking']}\n{content}"
        elif content:
            m["content"] = content
        if len(calls) == 1:
            out.append(m)
            continue
        results = []
        while i < len(messages) and messages[i].get("role") == "tool":
            results.append(dict(messages[i]))
            i += 1
        ids = [c.get("id") if isinstance(c, dict) else None for c in calls]
        placed: list[list[dict[str, Any]]] = [[] for _ in calls]
        rest = []
        for r in results:
            k = next((j for j, cid in enumerate(ids)
                      if cid is not None and cid == r.get("tool_call_id")), None)
            (rest if k is None else placed[k]).append(r)
        later = {k: v for k, v in m.items() if k not in ("content", "thinking", REASONING)}
        for j, call in enumerate(calls):
            out.append({**(m if j == 0 else later), "tool_calls": [call]})
            out += placed[j]
        out += rest
    return out


def template_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``tools`` template variable for gpt-oss's template, which writes ``"// " +
    tool.description``: a function without a description (optional in OpenAI's API) gets ""."""
    out = []
    for t in tools:
        f = t.get("function") if isinstance(t, dict) else None
        if isinstance(f, dict) and not isinstance(f.get("description"), str):
            t = {**t, "function": {**f, "description": ""}}
        out.append(t)
    return out


def read_header(header: str) -> tuple[Optional[str], Optional[str]]:
    """(channel, recipient) of a message header; None for what it does not name. A header that
    begins with a channel's bare name (no <|channel|> before it) is on that channel."""
    channel = _CHANNEL.search(header) or _BARE_CHANNEL.match(header)
    recipient = _RECIPIENT.search(header)
    return (channel.group(1) if channel else None), (recipient.group(1) if recipient else None)


def _partial_tag(text: str) -> int:
    """Length of the longest suffix of ``text`` that may be the start of a tag."""
    return max(partial_suffix(text, t) for t in HARMONY_TAGS)


def _may_be_header(text: str, complete: bool) -> bool:
    """Whether ``text`` is (``complete``) or may still become (a prefix of) a message header:
    tags and words only, beginning as headers do, short. Once false it stays false as text is
    added, so streamed and whole replies take the same decision at the same place."""
    head = text.lstrip()
    if not complete:                      # a tag's start: it may end the header (<|message|>)
        head = head[:len(head) - _partial_tag(head)]
    if not head:
        return True
    if not any(head.startswith(o) or o.startswith(head) for o in _OPENERS):
        return False
    return len(head) <= MAX_HEADER and _HEADER_WORDS.fullmatch(_TAG.sub(" ", head)) is not None


class HarmonySplit:
    """Splits one choice's reply, as it streams, into chat deltas: ``reasoning_content`` and
    ``content`` text, and ``tool_calls`` (each sent whole once its message ends, as
    server/tools.py's ToolStream sends them). Text that may be the start of a tag is held back
    until the next piece decides. Text that is not harmony (a reply without headers) is content.

    ``setup``: the request's tools (None or inactive: a message to a function is its channel's
    text); ``reasoning``: whether the analysis channel is reasoning_content (else content)."""

    def __init__(self, setup: Optional[ToolSetup], reasoning: bool = True) -> None:
        self.setup = setup if setup is not None and setup.active else None
        self.reasoning = reasoning
        self.calls: list[ToolCall] = []     # the calls sent
        self.thought = False                # an analysis message was read as reasoning
        self._buf = ""
        self._in_body = False
        self._field = CONTENT               # where the current body's text goes
        self._function: Optional[str] = None   # the function the current body calls
        self._args = ""
        self._bare = False                  # a body without a header that has said nothing yet
        self._said: set[str] = set()        # fields with text: a later message's text starts on a new line
        self._newline = False

    def feed(self, text: str, final: bool = False) -> list[dict[str, Any]]:
        """The deltas that ``text`` completes; ``final``: the reply ended, release everything."""
        self._buf += text
        out: list[dict[str, Any]] = []
        while self._body(out, final) if self._in_body else self._head(out, final):
            pass
        return out

    def _head(self, out: list[dict[str, Any]], final: bool) -> bool:
        """Reads a header; False when it needs more text."""
        m = _HEAD_END.search(self._buf)
        header = self._buf if m is None else self._buf[:m.start()]
        if not _may_be_header(header, complete=m is not None):
            self._open(CONTENT, None, bare=True)   # not harmony: the text is content as written
            return True
        words = bool(header.strip()) and _TAG.search(header) is None
        if words and (final if m is None else m.group() != MESSAGE):
            # words only, ended by the reply or by <|end|>, <|return|> or <|call|> rather than
            # <|message|>: a bare reply, content as written (its body reads up to that tag)
            self._open(CONTENT, None, bare=True)
            return True
        if m is None:
            if final:
                self._buf = ""                     # a header cut short: nothing to say
            return False
        self._buf = self._buf[m.end():]
        if m.group() == MESSAGE:
            channel, recipient = read_header(header)
            thinks = channel == "analysis" and self.reasoning
            self.thought = self.thought or thinks
            call = (recipient[len(FUNCTIONS):] if recipient and recipient.startswith(FUNCTIONS)
                    and self.setup is not None else None)
            self._open(REASONING if thinks else CONTENT, call)
        return True                                # (a message ended before its body: none)

    def _open(self, field: str, function: Optional[str], bare: bool = False) -> None:
        self._in_body, self._field, self._function, self._args = True, field, function, ""
        self._newline, self._bare = field in self._said, bare

    def _body(self, out: list[dict[str, Any]], final: bool) -> bool:
        """Reads a body up to the tag that ends it; False when it needs more text."""
        m = _TAG.search(self._buf)
        if m is None:
            keep = 0 if final else _partial_tag(self._buf)
            self._text(out, self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            if final:
                self._close(out, complete=False)
            return False
        self._text(out, self._buf[:m.start()])
        tag = m.group()
        # a stray header tag is dropped; so is a <|start|> or <|channel|> that begins a bare body:
        # it began the header found not to be one (ending the body there would read it again)
        if tag in (MESSAGE, CONSTRAIN) or (self._bare and tag in (START, CHANNEL)):
            self._buf = self._buf[m.end():]
            return True
        # <|end|>, <|return|>, <|call|> end the message; a <|start|> or <|channel|> without one
        # begins the next message's header
        self._buf = self._buf[m.end():] if tag in (END, RETURN, CALL) else self._buf[m.start():]
        self._close(out, complete=True)
        return True

    def _text(self, out: list[dict[str, Any]], text: str) -> None:
        if self._function is not None:
            self._args += text
        elif text:
            self._bare = False
            if self._newline:                    # separate messages of one field, as vLLM joins them
                text, self._newline = "\n" + text, False
            out.append({self._field: text})
            self._said.add(self._field)

    def _close(self, out: list[dict[str, Any]], complete: bool) -> None:
        self._in_body = False
        if self._function is None:
            return
        name, args, self._function = self._function, self._args, None
        call = self._call(name, args.strip(), complete)
        if call is None:                         # not a call: its text is its channel's
            self._text(out, args)
        elif not self.calls or (self.setup is not None and self.setup.parallel):
            out += self._call_deltas(call)

    def _call(self, name: str, args: str, complete: bool) -> Optional[ToolCall]:
        """The call, if it names a requested function with a JSON object of arguments. A call cut
        short (max_tokens) is none unless forced: then it keeps the arguments written so far,
        as the other formats' forced calls do (OpenAI too answers such a cut so)."""
        assert self.setup is not None
        if name not in self.setup.by_name:
            return None
        if not complete:
            return ToolCall(name, args, new_id()) if self.setup.forced else None
        try:
            value = json.loads(args)
        except json.JSONDecodeError:
            return None
        return ToolCall(name, json.dumps(value, ensure_ascii=False), new_id()) \
            if isinstance(value, dict) else None

    def _call_deltas(self, call: ToolCall) -> list[dict[str, Any]]:
        i = len(self.calls)
        self.calls.append(call)
        out: list[dict[str, Any]] = [{"tool_calls": [{"index": i, "id": call.id, "type": "function",
                                                      "function": {"name": call.name, "arguments": ""}}]}]
        step = ToolStream.FRAGMENT
        for k in range(0, len(call.arguments), step):
            out.append({"tool_calls": [{"index": i, "function": {"arguments": call.arguments[k:k + step]}}]})
        return out


def parse(text: str, setup: Optional[ToolSetup],
          reasoning: bool = True) -> tuple[Optional[str], str, list[ToolCall]]:
    """(reasoning or None when the reply did not think, content, calls) of a whole reply."""
    split = HarmonySplit(setup, reasoning)
    deltas = split.feed(text, final=True)
    thought = "".join(d.get(REASONING, "") for d in deltas)
    content = "".join(d.get(CONTENT, "") for d in deltas)
    return (thought if split.thought else None), content, split.calls


# an analysis message, then the next message's start: the reasoning a constrained reply may begin with
_THOUGHT = [f'thought: {CHANNEL} "analysis" {MESSAGE} THOUGHT {END} {START} "assistant"',
            r"THOUGHT: /(.|\n)*/"]


def forcing_grammar(setup: ToolSetup) -> str:
    """Lark grammar for tool_choice required/named: optional reasoning (one analysis message),
    then one call to a permitted function whose arguments follow its schema, ended by <|call|>
    (a harmony call ends the turn, so one call at a time). The tags are special tokens, which
    llguidance's Lark names bare."""
    funcs = [f for f in setup.tools if setup.named is None or f["name"] == setup.named]
    lines = ["start: thought? call", *_THOUGHT,
             f'call: {CHANNEL} "commentary to={FUNCTIONS}" ('
             + " | ".join(f"fn{i}" for i in range(len(funcs))) + f") {CALL}"]
    for i, f in enumerate(funcs):
        lines.append(f'fn{i}: {json.dumps(f["name"] + " ")} {CONSTRAIN} "json" {MESSAGE} args{i}')
        lines.append(f"args{i}: " + json_rule(f["parameters"], strict=bool(f.get("strict"))))
    return "\n".join(lines)


def response_format_grammar(lark: str, reasoning: bool = True) -> str:
    """Lark grammar for a response_format reply in harmony, as llama.cpp's gpt-oss grammar has
    it: optional reasoning (one analysis message; none where ``reasoning`` is off, so that the
    content is the JSON alone), then the final channel, optionally ``<|constrain|>json``, whose
    body is the JSON. ``lark``: server/structured.py's grammar for the JSON alone
    (``start: `` and the rule)."""
    rule = lark.removeprefix("start: ")
    head = ["start: thought? final", *_THOUGHT] if reasoning else ["start: final"]
    return "\n".join([*head, f'final: {CHANNEL} "final" (" " {CONSTRAIN} "json")? {MESSAGE} answer',
                      "answer: " + rule])
