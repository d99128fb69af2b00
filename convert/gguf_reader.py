"""gguf-py's GGUFReader, opened in a fraction of the time on a real model's file.

gguf-py builds one numpy view per element of every metadata array: a tokenizer's vocabulary and
merges (49k to 260k strings each) and its token types and scores. That took 3.3-4.3 s for SmolLM2's
small file here, 9 s for a 152k-token vocabulary with its merges, paid at every start of a served GGUF (its
conversion is looked up by reading the file). This reader takes such an array as one view of its
bytes instead and decodes it when a value is asked for; everything else is gguf-py's own parse.
(llama.cpp's pull request 13378 would speed up gguf-py's reader itself; it is not released.)"""
from __future__ import annotations

import struct
from typing import Any, Union

import numpy as np
from gguf import GGUFReader, GGUFValueType, ReaderField


class BulkArrayField(ReaderField):
    """A metadata array read in bulk: parts end with [item type, length, values], where values are
    the elements themselves (a scalar array) or every string with its 8-byte length (strings)."""

    def contents(self, index_or_slice: Union[int, slice] = slice(None)) -> Any:
        values = self.parts[-1]
        if self.types[-1] == GGUFValueType.STRING:
            items: list[Any] = _strings(values, int(self.parts[-2][0]))
        else:
            items = values.tolist()
        return items[index_or_slice]


def _strings(blob: np.ndarray, count: int) -> list[str]:
    """``count`` strings, each an 8-byte little-endian length and its UTF-8 bytes, from ``blob``."""
    raw, out, offs = blob.tobytes(), [], 0
    for _ in range(count):
        (n,) = struct.unpack_from("<Q", raw, offs)
        out.append(raw[offs + 8:offs + 8 + n].decode("utf-8"))
        offs += 8 + n
    return out


class FastGGUFReader(GGUFReader):
    """GGUFReader whose metadata arrays of scalars or strings are read in bulk (BulkArrayField):
    the same fields, values and tensors. Files of the other byte order keep gguf-py's own parse."""

    def __init__(self, path: str) -> None:
        self._bulk: set[int] = set()         # id() of each array read in bulk, while the parse runs
        self._nested = False                 # inside an array of arrays: gguf-py's own parse
        super().__init__(path)
        for key, field in self.fields.items():
            if field.types and field.types[0] == GGUFValueType.ARRAY and id(field.parts[-1]) in self._bulk:
                self.fields[key] = BulkArrayField(*field)
        del self._bulk, self._nested

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[Any], list[int], list[GGUFValueType]]:
        if raw_type != GGUFValueType.ARRAY or self.byte_order != "I" or self._nested:
            return super()._get_field_parts(orig_offs, raw_type)
        item_type, count = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        start = orig_offs + 12
        if item_type[0] == GGUFValueType.STRING:
            end = start
            for _ in range(int(count[0])):      # only the lengths: the strings are decoded when read
                end += 8 + struct.unpack_from("<Q", self.data, end)[0]
            values = self._get(start, np.uint8, end - start)
        elif GGUFValueType(item_type[0]) in self.gguf_scalar_to_np:
            values = self._get(start, self.gguf_scalar_to_np[GGUFValueType(item_type[0])], count[0])
        else:                                   # arrays of arrays: gguf-py's own parse, all through
            self._nested = True
            try:
                return super()._get_field_parts(orig_offs, raw_type)
            finally:
                self._nested = False
        self._bulk.add(id(values))
        return 12 + int(values.nbytes), [item_type, count, values], [2], \
            [GGUFValueType.ARRAY, GGUFValueType(item_type[0])]
