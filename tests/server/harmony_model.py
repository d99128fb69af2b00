"""A tiny model that writes OpenAI's harmony format (gpt-oss's): the tiny random Mixtral with
SmolLM2's tokenizer plus harmony's seven tags as special tokens, a chat template of our own in the
harmony form, and <|return|> and <|call|> as its end-of-sequence tokens, as gpt-oss has them."""
from __future__ import annotations

import json
import os
import shutil

from tokenizers import AddedToken, Tokenizer

from server.tokenizer import HARMONY_TAGS
from tests.tiny import make_tiny_mixtral

# written for these tests: system and developer messages (the tools, each with its parameters'
# schema), user turns, past assistant turns (reasoning, read from ``thinking`` as gpt-oss's template
# reads it, on the analysis channel, calls on
# commentary to=functions.NAME, the answer on final), tool results from functions.NAME; the
# reasoning effort in the system message, as gpt-oss's template writes it
HARMONY_TEMPLATE = """\
{%- set ns = namespace(fn='tool') -%}
<|start|>system<|message|>A test assistant. Channels: analysis, commentary, final.
{%- if reasoning_effort is defined %} Reasoning: {{ reasoning_effort }}.{% endif %}<|end|>
{%- set first = messages[0] if messages else none -%}
{%- if tools or (first and first.role in ['system', 'developer']) -%}
<|start|>developer<|message|>
{%- if first and first.role in ['system', 'developer'] %}{{ first.content }}{% endif %}
{%- for t in tools or [] %}{{ '\\n' }}functions.{{ t.function.name }}: {{ t.function.parameters | tojson }}
{%- endfor %}<|end|>
{%- endif -%}
{%- for m in messages -%}
{%- if m.role == 'user' -%}
<|start|>user<|message|>{{ m.content }}<|end|>
{%- elif m.role == 'assistant' -%}
{%- if m.thinking %}<|start|>assistant<|channel|>analysis<|message|>{{ m.thinking }}<|end|>{% endif -%}
{%- for c in m.tool_calls or [] -%}
{%- set ns.fn = c.function.name -%}
<|start|>assistant<|channel|>commentary to=functions.{{ c.function.name }} <|constrain|>json<|message|>
{{- c.function.arguments | tojson }}<|call|>
{%- endfor -%}
{%- if m.content %}<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>{% endif -%}
{%- elif m.role == 'tool' -%}
<|start|>functions.{{ ns.fn }} to=assistant<|channel|>commentary<|message|>{{ m.content }}<|end|>
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|start|>assistant{% endif -%}
"""

# also written for these tests: what gpt-oss's own template does that a request's history and tools
# must be shaped for (server/harmony.py template_messages, template_tools), in a few lines: it
# writes "// " + each tool's description, tests "..." in an assistant turn's content, refuses a
# tool-call turn with both content and thinking, writes that turn's content or thinking as analysis
# and only its first call, names every tool result after the last call written, and adds
# reasoning_effort (default medium) to a string
GPT_OSS_LIKE_TEMPLATE = """\
{%- set last = namespace(name=none) -%}
<|start|>system<|message|>Reasoning: {{ "" + (reasoning_effort if reasoning_effort is defined else "medium") }}<|end|>
{%- if tools -%}
<|start|>developer<|message|>
{%- for t in tools %}{{ "// " + t.function.description + "\\n" }}type {{ t.function.name }}{{ "\\n" }}{% endfor -%}
<|end|>
{%- endif -%}
{%- for m in messages -%}
{%- if m.role == 'user' -%}
<|start|>user<|message|>{{ m.content }}<|end|>
{%- elif m.role == 'assistant' -%}
{%- if "content" in m and "<|channel|>" in m.content %}{{ raise_exception("tags in content") }}{% endif -%}
{%- if "tool_calls" in m -%}
{%- if m.content and m.thinking %}{{ raise_exception("Cannot pass both content and thinking in an assistant message with tool calls!") }}{% endif -%}
{%- if m.content or m.thinking %}<|start|>assistant<|channel|>analysis<|message|>{{ m.content or m.thinking }}<|end|>{% endif -%}
{%- set last.name = m.tool_calls[0].function.name -%}
<|start|>assistant to=functions.{{ last.name }}<|channel|>commentary json<|message|>{{ m.tool_calls[0].function.arguments | tojson }}<|call|>
{%- else -%}
<|start|>assistant<|channel|>final<|message|>{{ "" + m.content }}<|end|>
{%- endif -%}
{%- elif m.role == 'tool' -%}
{%- if last.name is none %}{{ raise_exception("a tool result without a call") }}{% endif -%}
<|start|>functions.{{ last.name }} to=assistant<|channel|>commentary<|message|>{{ m.content }}<|end|>
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|start|>assistant{% endif -%}
"""


def make_harmony_model(path: str, tokenizer_dir: str) -> str:
    """The model in ``path``, with the tokenizer files of ``tokenizer_dir`` (SmolLM2's) extended."""
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        return path
    tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in HARMONY_TAGS])
    make_tiny_mixtral(path, vocab=tok.get_vocab_size(with_added_tokens=True) + 1)
    tok.save(os.path.join(path, "tokenizer.json"))
    shutil.copy(os.path.join(tokenizer_dir, "special_tokens_map.json"), path)
    with open(os.path.join(tokenizer_dir, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    cfg.update(chat_template=HARMONY_TEMPLATE, eos_token="<|return|>", pad_token="<|return|>")
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    ends = [tok.token_to_id("<|return|>"), tok.token_to_id("<|call|>")]
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": ends}, f)
    return path
