"""How a GGUF's tokenizer cuts text into pieces before its BPE merges: the pre-tokenizer its
``tokenizer.ggml.pre`` names, split as llama.cpp splits it. transformers' GGUF conversion knows
some of these names (GGUF_PRE_TOKENIZER_SPLITS) and splits every other one by GPT-2's rule: a
SmolLM2 file's "  12" would become 'Ġ', 'Ġ', '1', '2' where SmolLM2's tokenizer, which takes each
digit alone, gives 'ĠĠ', '1', '2'. SPLITS holds the names transformers lacks, each as the regexes
the model's own tokenizer splits with, in order (tokenizer.json's Split steps, or the tiktoken
pattern), each piece then byte-encoded as GPT-2's.
tests/convert/test_gguf_pre_llama_cpp.py checks every name against llama.cpp's own tokenizer."""
from __future__ import annotations

import logging
from typing import Any, Optional

log = logging.getLogger(__name__)

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
# GPT-2's rule: what transformers applies to a name it does not know
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3's (tiktoken cl100k's), and Qwen2's, which keeps each digit alone
_QWEN2_WORDS = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = _CONTRACTIONS + "|" + _QWEN2_WORDS
LLAMA3 = QWEN2.replace(r"+|\p{N}|", r"+|\p{N}{1,3}|", 1)
# DeepSeek-V3's (also Hunyuan's dense models', JoyAI's): numbers in threes, CJK runs, then words
DEEPSEEK_V3 = (r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
               r'''[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+'''
               r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Kimi-K2's tiktoken pattern (also Moonlight's): Han runs apart from cased words of other scripts
_NOT_HAN_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_NOT_HAN_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
KIMI_K2 = (r"[\p{Han}]+"
           rf"|[^\r\n\p{{L}}\p{{N}}]?{_NOT_HAN_UPPER}*{_NOT_HAN_LOWER}+{_CONTRACTIONS}?"
           rf"|[^\r\n\p{{L}}\p{{N}}]?{_NOT_HAN_UPPER}+{_NOT_HAN_LOWER}*{_CONTRACTIONS}?"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# BLOOM's: a word up to a space or punctuation (also Poro's, Viking's)
_BLOOM = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
_DIGITS_THEN_GPT2 = (r"\p{N}", GPT2)          # StarCoder's: every digit alone, then GPT-2's rule
# DeepSeek's first models' CJK runs; their letters, by code point (escaped: several would change
# under Unicode normalisation)
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK_LETTERS = (
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
    "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
    "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
    "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943]+")

SPLITS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b",
                     "mellum2"), _DIGITS_THEN_GPT2),
    **dict.fromkeys(("chatglm-bpe", "glm4", "glm5"), (LLAMA3,)),
    **dict.fromkeys(("stablelm2", "hunyuan", "solar-open", "grok-2"), (QWEN2,)),
    **dict.fromkeys(("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"), DEEPSEEK_V3),
    **dict.fromkeys(("bloom", "poro-chat", "gpt3-finnish"), (_BLOOM,)),
    "viking": (_BLOOM, r"\p{N}"),
    "kimi-k2": (KIMI_K2,),
    # llama.cpp's own, for a file naming none of the models' splits
    "default": (r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"),
    "deepseek-llm": ("[\r\n]", _DEEPSEEK_LETTERS, "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
                     r"\s+$", _CJK, r"\p{N}+"),
    "deepseek-coder": ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"),
    "minicpm5": (r"\p{N}{1,3}", LLAMA3.replace(r"+|\p{N}{1,3}|", r"+|\p{N}+|", 1)),
    "ufakzeka": (_QWEN2_WORDS,),       # Qwen2's without the English contractions
    # Youtu-LLM's (llama.cpp's deepseek2): Hangul, CJK punctuation, bopomofo and CJK runs, then o200k's
    # cased words with every digit alone
    "youtu": ("[\uac00-\ud7a3\u3131-\u318e]+|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b\uff0c"
              "\u3001-\u303f\ufe30-\ufe4f]+|[\u3105-\u312f]+|[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
              r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS
              + r"?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS
              + r"?|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "seed-coder": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+",),
}
# names llama.cpp splits by GPT-2's rule, as transformers does any name it does not know
GPT2_NAMES = frozenset(("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4",
                        "gigachat", "a.x-4.0", "mellum", "modern-bert", "roberta-bpe", "jina-es", "jina-de",
                        "jina-v1-en", "jina-v2-es", "jina-v2-de", "jina-v2-code"))
# names split as above since moeserve's first GGUF import; conversions of files naming any other
# name in SPLITS were made with GPT-2's rule, and are made again (conversion_params)
FIRST_SPLITS = frozenset(("deepseek-llm", "deepseek-v3", "glm4"))


def conversion_params(pre: Optional[str]) -> dict[str, Any]:
    """What a conversion's parameters record of its split: nothing for a split unchanged since the
    first conversions, so those are reused; a version for one moeserve has since corrected."""
    return {"pre_split": 2} if pre in SPLITS and pre not in FIRST_SPLITS else {}


def file_pre(path: str, pre: Optional[str], vocab: Optional[str]) -> Optional[str]:
    """The pre-tokenizer the GGUF at ``path`` splits by, as llama.cpp reads it: its
    tokenizer.ggml.pre ``pre``, or ``default`` for a BPE vocabulary (tokenizer.ggml.model
    ``vocab`` 'gpt2') that names none, with the warning llama.cpp gives too."""
    if pre is None and vocab == "gpt2":
        log.warning("%s names no pre-tokenizer (tokenizer.ggml.pre): text is split by llama.cpp's 'default', "
                    "as llama.cpp splits it; a file converted again by a current converter names its own", path)
        return "default"
    return pre


def _transformers_splits() -> frozenset[str]:
    """The names transformers' GGUF conversion splits itself (none in a version without the table)."""
    from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping
    return frozenset(getattr(mapping, "GGUF_PRE_TOKENIZER_SPLITS", {}))


def known_names() -> frozenset[str]:
    """Every pre-tokenizer name this conversion splits as llama.cpp does."""
    return _transformers_splits() | frozenset(SPLITS) | GPT2_NAMES


def split_like_llama_cpp(tok: Any, path: str, pre: Optional[str]) -> None:
    """Give the transformers tokenizer ``tok`` read from the GGUF at ``path`` the split its
    pre-tokenizer ``pre`` names: transformers' own where it knows the name, else SPLITS'; an
    unknown name keeps GPT-2's rule, with a warning (its text may be tokenized differently)."""
    if pre in _transformers_splits():
        from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping
        mapping.set_split_regex(tok, {"pre_tokenizer_type": pre})
    elif pre in SPLITS:
        from tokenizers import Regex, pre_tokenizers
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [*(pre_tokenizers.Split(Regex(r), behavior="isolated") for r in SPLITS[pre]),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        log.info("%s: pre-tokenizer %r split by its own %d regexes, as llama.cpp splits it", path, pre, len(SPLITS[pre]))
    elif pre is not None and pre not in GPT2_NAMES:
        log.warning("%s: pre-tokenizer %r is not one moeserve knows: text is split by GPT-2's rule, and some "
                    "text may be tokenized differently from llama.cpp", path, pre)
