"""The files of one GGUF model: a whole file, or the parts llama.cpp's gguf-split writes
(``<prefix>-00001-of-00003.gguf``...: every GGUF release over ~50 GB on the Hugging Face hub is
published so). Named here, without gguf or torch (the HTTP process finds models with it); read
together by convert/gguf_file.py."""
from __future__ import annotations

import os
import re

# llama.cpp's llama_split_path: "%s-%05d-of-%05d.gguf"
SPLIT_NAME = re.compile(r"(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})(?P<ext>\.gguf)", re.IGNORECASE)


def split_parts(path: str) -> list[str]:
    """The files of the model ``path`` belongs to, in order: every part of a split GGUF (``path``
    may name any of them), or ``[path]``; FileNotFoundError naming the parts that are missing."""
    m = SPLIT_NAME.fullmatch(os.path.basename(path))
    if m is None:
        return [path]
    count = int(m.group("count"))
    if not 1 <= int(m.group("no")) <= count:
        raise FileNotFoundError(f"{path}: part {int(m.group('no'))} of {count} is not a part of a split GGUF")
    folder = os.path.dirname(path)
    parts = [os.path.join(folder, f"{m.group('prefix')}-{i:05d}-of-{count:05d}{m.group('ext')}")
             for i in range(1, count + 1)]
    missing = [os.path.basename(p) for p in parts if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{path}: a split GGUF of {count} parts, and {len(missing)} of them are "
                                f"missing ({listing(missing, 4)}); download every part into the same folder")
    return parts


def listing(names: list[str], most: int = 6) -> str:
    """``names`` joined for a message: the first ``most``, then "..." when there are more."""
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def model_stem(path: str) -> str:
    """The model's name in the file name: without ``.gguf`` and a split part's number."""
    name = os.path.basename(path)
    m = SPLIT_NAME.fullmatch(name)
    return m.group("prefix") if m else os.path.splitext(name)[0]


def first_parts(names: list[str]) -> list[str]:
    """``names`` (GGUF file names in one folder), sorted, with one name per split model: its
    lowest-numbered part at hand (the first, unless that is missing: reading it then says so)."""
    keep, seen = [], set()
    for name in sorted(names):
        m = SPLIT_NAME.fullmatch(name)
        key = m and (m.group("prefix"), m.group("count"), m.group("ext"))
        if not key or key not in seen:
            keep.append(name)
            seen.add(key)
    return keep
