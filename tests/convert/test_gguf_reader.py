"""convert/gguf_reader.py: the bulk-reading GGUFReader gives gguf-py's own fields, values and
tensors, on a real file and on one holding every kind of metadata value, in both byte orders."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from convert.gguf_reader import BulkArrayField, FastGGUFReader  # noqa: E402


def same_as_gguf_py(path: str) -> FastGGUFReader:
    theirs, ours = gguf.GGUFReader(path), FastGGUFReader(path)
    assert list(ours.fields) == list(theirs.fields)
    for key, field in theirs.fields.items():
        mine = ours.fields[key]
        assert mine.types == field.types, key
        assert mine.contents() == field.contents(), key
        if field.types[0] == gguf.GGUFValueType.ARRAY and field.contents():
            n = len(field.contents())
            for index in (0, n - 1, -1, slice(1, 4), slice(None, None, -2)):
                assert mine.contents(index) == field.contents(index), (key, index)
    assert ours.data_offset == theirs.data_offset
    assert [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in ours.tensors] == \
        [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in theirs.tensors]
    for mine, t in zip(ours.tensors, theirs.tensors):
        assert np.array_equal(mine.data, t.data), t.name
    return ours


def test_the_packaged_smollm2_file_reads_as_gguf_py_reads_it() -> None:
    from convert.gguf_import import find_packaged_gguf
    ours = same_as_gguf_py(find_packaged_gguf())
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        assert isinstance(ours.fields[key], BulkArrayField), key      # the arrays that took seconds


@pytest.mark.parametrize("endian", ["little", "big"])
def test_every_kind_of_metadata_value(endian: str, tmp_path: Any) -> None:
    path = str(tmp_path / "m.gguf")
    w = gguf.GGUFWriter(path, "llama", endianess=gguf.GGUFEndian.BIG if endian == "big" else gguf.GGUFEndian.LITTLE)
    T = gguf.GGUFValueType
    w.add_array("a.strings", ["", "x", "ünïcödé 漢字 🙂", "a b\n", "y" * 300, "last"])
    w.add_array("a.one_string", ["only"])
    w.add_array("a.empty", [])
    w.add_key_value("a.i32", [-3, 0, 7, 2 ** 31 - 1], T.ARRAY, T.INT32)
    w.add_key_value("a.u8", [0, 255, 1], T.ARRAY, T.UINT8)
    w.add_key_value("a.f32", [0.5, -1.25, 3.0e38], T.ARRAY, T.FLOAT32)
    w.add_key_value("a.f64", [1 / 3, -2.0], T.ARRAY, T.FLOAT64)
    w.add_key_value("a.bool", [True, False, True], T.ARRAY, T.BOOL)
    w.add_key_value("a.i64", [-(2 ** 62), 5], T.ARRAY, T.INT64)
    w.add_key_value("a.nested", [[1, 2], [3]], T.ARRAY, T.ARRAY)
    w.add_string("s", "plain")
    w.add_uint32("u", 9)
    w.add_tensor("t", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = same_as_gguf_py(path)
    assert ours.fields["a.strings"].contents() == ["", "x", "ünïcödé 漢字 🙂", "a b\n", "y" * 300, "last"]
    assert ours.fields["a.f64"].contents(0) == 1 / 3
    # in bulk where this machine's byte order is the file's; a big-endian file as gguf-py reads it
    assert isinstance(ours.fields["a.strings"], BulkArrayField) == (endian == "little")
