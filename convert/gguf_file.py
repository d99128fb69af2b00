"""One GGUF model's file, or the parts of a split one (convert/gguf_parts.py), as gguf-py (llama.cpp's
own reader) maps them: metadata by key, tensors by name, dequantized on read."""
from __future__ import annotations

import os
import re
from typing import Any, Optional

import numpy as np
import torch

from convert.gguf_ollama import LEGACY_HINT, translate
from convert.gguf_parts import split_parts
from convert.model_store import BuildError

FLOAT_TYPES = ("F32", "F16", "BF16")
STORED = {"F32": torch.float32, "F16": torch.float16}    # kept as they are; bf16 for the rest


class GgufFile:
    """One GGUF model: metadata values by key, tensors by name (memory-mapped by gguf-py) from
    its file or every part of a split one (``path`` naming any part); ``path`` is then the
    first part, and ``parts`` lists them all. Ollama's own layouts are read under llama.cpp's
    architecture and tensor names (convert/gguf_ollama.py); ``arch`` is llama.cpp's."""

    def __init__(self, path: str) -> None:
        first = _open(path)
        count = _int_field(first, "split.count", 1)
        self.parts = [path]
        readers = [first]
        if count > 1:       # metadata in the first part; tensors spread over all of them
            try:
                self.parts = split_parts(path)
            except FileNotFoundError as e:
                raise BuildError(str(e)) from None
            if len(self.parts) != count:
                raise BuildError(f"{path}: one part of a split GGUF of {count} files, whose name is not "
                                 f"llama.cpp's <name>-00001-of-{count:05d}.gguf: rename the parts so")
            readers = [first if os.path.abspath(p) == os.path.abspath(path) else _open(p) for p in self.parts]
            for i, (p, r) in enumerate(zip(self.parts, readers)):
                if (_int_field(r, "split.no", -1), _int_field(r, "split.count", 1)) != (i, count):
                    raise BuildError(f"{p}: not part {i + 1} of {count} by its metadata (split.no, "
                                     "split.count): the parts come from different models or splits")
        self.path = self.parts[0]
        self._reader = readers[0]
        self._overrides: dict[str, Any] = {}
        self.tensors: dict[str, Any] = {}
        for p, r in zip(self.parts, readers):
            for t in r.tensors:
                if t.name in self.tensors:
                    raise BuildError(f"{p}: tensor {t.name!r} is in two parts of the split GGUF")
                self.tensors[t.name] = t
        listed = self.meta("split.tensors.count", None)
        if listed is not None and int(listed) != len(self.tensors):
            raise BuildError(f"{self.path}: the split GGUF lists {listed} tensors; its parts hold "
                             f"{len(self.tensors)}")
        self._key_arch = str(self.meta("general.architecture"))      # the prefix of its metadata keys
        self.arch, self.tensors, self._overrides = translate(self.path, self._key_arch, self.tensors, self.meta)
        self._check_types()

    def _check_types(self) -> None:
        """Every ggml type in the file is one gguf-py can dequantize (found now, not an hour
        into a conversion)."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize
        for qtype in {t.tensor_type for t in self.tensors.values()}:
            if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                continue
            block, size = GGML_QUANT_SIZES[qtype]
            try:
                dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
            except NotImplementedError:
                raise BuildError(f"{self.path}: tensors of ggml type {qtype.name}, which gguf-py "
                                 "cannot dequantize") from None

    def meta(self, key: str, default: Any = KeyError) -> Any:
        if key in self._overrides:
            return self._overrides[key]
        field = self._reader.fields.get(key)
        if field is None:
            if default is KeyError:
                raise BuildError(f"{self.path}: the GGUF metadata has no {key!r}")
            return default
        return field.contents()

    def arch_meta(self, key: str, default: Any = KeyError) -> Any:
        return self.meta(f"{self._key_arch}.{key}", default)

    def tensor(self, name: str) -> Any:
        t = self.tensors.get(name)
        if t is None:
            raise BuildError(f"{self.path}: the file has no tensor {name!r}")
        return t

    def type_name(self, name: str) -> str:
        return self.tensor(name).tensor_type.name

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in torch order (ggml lists dimensions innermost first)."""
        return tuple(int(d) for d in reversed(self.tensor(name).shape))

    def read(self, name: str, index: Optional[int] = None) -> torch.Tensor:
        """The tensor (or its ``index``-th slice along the first dimension), dequantized, fp32."""
        from gguf import GGMLQuantizationType, dequantize
        t = self.tensor(name)
        data = t.data if index is None else t.data[index]
        shape = self.shape(name) if index is None else self.shape(name)[1:]
        if t.tensor_type == GGMLQuantizationType.F32:
            out = np.asarray(data, dtype=np.float32)
        else:
            out = dequantize(np.asarray(data), t.tensor_type)
        return torch.from_numpy(np.array(out, dtype=np.float32).reshape(shape))   # a copy: the file is read-only


def as_written(value: float) -> float:
    """An f32 metadata value as the converter wrote it: f32 keeps about 7 significant digits (1e-6
    reads 9.99999997e-07, 0.6 reads 0.60000002), so 7 give the value back."""
    return float(f"{value:.7g}")


def stored_dtype(type_name: str) -> torch.dtype:
    """The dtype a tensor of ggml type ``type_name`` is written in: F32 and F16 as they are,
    every other type in bf16 (BF16 exactly; a quantized type's values rounded to bf16, whose
    step is finer than theirs)."""
    return STORED.get(type_name, torch.bfloat16)


def _open(path: str) -> Any:
    try:
        from convert.gguf_reader import FastGGUFReader
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise BuildError("reading a GGUF file needs gguf: pip install 'moeserve[build]'") from e
    try:
        return FastGGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, TypeError, OverflowError) as e:
        # gguf-py reads a truncated or foreign file until an index or a parse fails
        hint = LEGACY_HINT if re.fullmatch(r"(np\.uint32\()?4\)? is not a valid GGMLQuantizationType", str(e)) else ""
        raise BuildError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}){hint}") from None


def _int_field(reader: Any, key: str, default: int) -> int:
    field = reader.fields.get(key)
    return default if field is None else int(field.contents())
