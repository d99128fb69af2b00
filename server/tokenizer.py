"""Text <-> token ids for the server: the checkpoint's tokenizer.json (``tokenizers``) and the chat
template from its tokenizer config, rendered with jinja2 the way transformers renders it.

No transformers import: the HTTP process stays light and torch-free.
"""
from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from typing import Any, Optional

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")   # passed to every template
# the tags the reasoning and tool-call parsers read (server/reasoning.py, tools.py, tool_formats.py,
# tool_blocks.py): kept in the output text where a tokenizer marks them special, which decoding
# would drop (the tool-call parsers keep DeepSeek's out of the content)
KEPT_TAGS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>",
             "<arg_value>", "</arg_value>", "</parameter>", "</function>", "<minimax:tool_call>",
             "</minimax:tool_call>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
             "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>")
# OpenAI's harmony tags (gpt-oss, server/harmony.py): kept only by a tokenizer that has <|channel|>
# and <|message|> as special tokens, as other models use some of these names (Phi-3's <|end|>
# ends its turns, and would then show in the text)
HARMONY_TAGS = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>",
                "<|call|>")
log = logging.getLogger(__name__)
# variables the server sets itself: a request's chat_template_kwargs may not replace them
RESERVED_VARIABLES = ("messages", "add_generation_prompt", "tools", *SPECIAL_TOKENS)


class TemplateError(ValueError):
    """The chat template refused the conversation (raise_exception) or failed to render."""


def _token_text(value: Any) -> Optional[str]:
    """tokenizer_config stores special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # transformers' tojson: no HTML escaping (jinja's default tojson escapes <, >, &, ')
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """Same environment as transformers' _compile_jinja_template."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class TextTokenizer:
    """The checkpoint's tokenizer and chat template (``template_file``: a template used instead of
    the model's, --chat-template)."""

    def __init__(self, model_dir: str, template_file: Optional[str] = None) -> None:
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            hint = ("; it has only a SentencePiece tokenizer.model: write tokenizer.json once with "
                    f"transformers: AutoTokenizer.from_pretrained({model_dir!r}).save_pretrained({model_dir!r})"
                    if os.path.isfile(os.path.join(model_dir, "tokenizer.model")) else "")
            raise FileNotFoundError(f"{path}: no tokenizer.json in the model directory {model_dir!r}{hint}")
        self.tokenizer = Tokenizer.from_file(path)
        added = self.tokenizer.get_added_tokens_decoder()
        special = {t.content for t in added.values() if t.special}
        kept = set(KEPT_TAGS) | (set(HARMONY_TAGS) if {"<|channel|>", "<|message|>"} <= special else set())
        self._kept = {i for i, t in added.items() if t.special and t.content in kept}
        self._dropped = {i for i, t in added.items() if t.special and i not in self._kept}
        # the kept tags that are single tokens: tool-call grammars name them as tokens (tool_setup.py)
        self.single_tags = frozenset(t.content for t in added.values()) & frozenset(KEPT_TAGS)
        cfg_path = os.path.join(model_dir, "tokenizer_config.json")
        cfg: dict[str, Any] = {}
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
        self.special_tokens = {name: _token_text(cfg.get(name))
                               for name in SPECIAL_TOKENS}
        source = self._template_source(model_dir, cfg)
        if template_file is not None:
            try:
                with open(template_file, encoding="utf-8") as f:
                    source = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"{template_file}: the chat template cannot be read ({e})") from None
            log.info("chat template: %s (--chat-template), instead of the model's", template_file)
        self.template_source = source or ""
        try:
            self.chat_template: Optional[jinja2.Template] = (
                compile_chat_template(source) if source else None)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"{template_file or model_dir}: the chat template does not compile "
                             f"(line {e.lineno}: {e.message})") from None
        # a template that reads `tools` renders them itself (tool calling, server/tools.py)
        self.template_takes_tools = bool(source) and "tools" in jinja2.meta.find_undeclared_variables(
            ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(source))
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        # the longest token's text: a text of more than context x this many characters can never
        # fit, so it is rejected without tokenizing it (a normalizer may shrink text: then x4)
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        longest = max((len(t) for t in vocab), default=1)
        self.max_token_chars = longest * (4 if self.tokenizer.normalizer is not None else 1)

    @staticmethod
    def _template_source(model_dir: str, cfg: dict[str, Any]) -> Optional[str]:
        # transformers >= 4.43 may save it to chat_template.jinja (or .json) instead of the config
        jinja_path = os.path.join(model_dir, "chat_template.jinja")
        if os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                return f.read()
        json_path = os.path.join(model_dir, "chat_template.json")
        if os.path.isfile(json_path):
            with open(json_path, encoding="utf-8") as f:
                cfg = {"chat_template": json.load(f).get("chat_template")}
        tpl = cfg.get("chat_template")
        if isinstance(tpl, list):   # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default") or next(iter(named.values()), None)
        return tpl if isinstance(tpl, str) else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > 16384:   # encode_batch releases the GIL (encode holds it throughout)
            return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if not (skip_special_tokens and self._kept and any(i in self._kept for i in ids)):
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        # one decode of the ids without the dropped special tokens: the decoder's own spacing
        # around the kept tags (SentencePiece's leading spaces) stays as it is
        return self.tokenizer.decode([i for i in ids if i not in self._dropped], skip_special_tokens=False)

    def id_to_token(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id) or ""

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    variables: Optional[dict[str, Any]] = None) -> str:
        """The prompt text for ``messages``, like transformers' apply_chat_template(tokenize=False);
        ``variables``: more template variables (tools, a request's chat_template_kwargs), in a
        dict so that no name can collide with a Python parameter."""
        if self.chat_template is None:
            raise TemplateError("the model has no chat template (tokenizer_config.json has no "
                                "'chat_template'); use /v1/completions, or give the server one "
                                "(moeserve serve --chat-template FILE)")
        try:
            return self.chat_template.render({**(variables or {}), "messages": messages,
                                              "add_generation_prompt": add_generation_prompt,
                                              **self.special_tokens})
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the chat template failed to render: {exc}") from exc

    def encode_chat(self, messages: list[dict[str, Any]],
                    variables: Optional[dict[str, Any]] = None, prefill: str = "") -> list[int]:
        """The prompt's tokens; ``prefill``: the start of the reply, written after the generation
        prompt (encoded with it, so that tokens merge across the boundary as in a reply)."""
        # apply_chat_template(tokenize=True) encodes without adding special tokens: the template
        # already holds them
        return self.encode(self.render_chat(messages, variables=variables) + prefill,
                           add_special_tokens=False)
