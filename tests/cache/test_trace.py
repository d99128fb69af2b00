import json
import os

import pytest
import torch

from cache.provider import StepRows
from cache.trace import ActivationTracer, TraceFormatError, load_trace


def run_two_requests(tracer):
    # step 1: "a" prompt of 2 tokens and "b" prompt of 1 token in one batch
    tracer.begin_step(StepRows(("a", "b"), (2, 1), (True, True)))
    r0 = tracer.record(0, torch.tensor([[0, 1], [1, 2], [3, 0]]))
    r1 = tracer.record(1, [[2, 3], [2, 0], [1, 1]])
    # step 2: both decode one token
    tracer.begin_step(StepRows(("b", "a"), (1, 1), (False, False)))
    r2 = tracer.record(0, torch.tensor([[3, 2], [0, 1]]))
    tracer.record(1, torch.tensor([[0, 1], [2, 3]]))
    return r0, r1, r2


def test_record_maps_rows_to_sequences_and_splits_prompt_decode():
    t = ActivationTracer(2, 4, 2)
    r0, r1, r2 = run_two_requests(t)
    assert r0 == {"a": [0, 1, 1, 2], "b": [3, 0]}
    assert r1 == {"a": [2, 3, 2, 0], "b": [1, 1]}
    assert r2 == {"b": [3, 2], "a": [0, 1]}
    a = t.end_request("a")
    assert a.prefill == 2
    assert a.tokens == [[[0, 1], [2, 3]], [[1, 2], [2, 0]], [[0, 1], [2, 3]]]
    assert a.prompt_matrix.tolist() == [[1, 2, 1, 0], [1, 0, 2, 1]]
    assert a.decode_matrix.tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]
    b = t.end_request("b")
    assert b.prefill == 1 and b.tokens == [[[3, 0], [1, 1]], [[3, 2], [0, 1]]]
    assert b.decode_matrix.tolist() == [[0, 0, 1, 1], [1, 1, 0, 0]]
    assert t.in_flight() == 0 and t.end_request("a") is None


def test_record_rejects_row_count_mismatch():
    t = ActivationTracer(2, 4, 2)
    t.begin_step(StepRows(("a",), (2,), (True,)))
    with pytest.raises(ValueError, match="3 rows"):
        t.record(0, [[0, 1], [1, 2], [2, 3]])
    with pytest.raises(ValueError, match="layer 5"):
        t.record(5, [[0, 1], [1, 2]])


def test_aborted_request_drops_incomplete_tokens(tmp_path):
    t = ActivationTracer(2, 4, 2, record_path=str(tmp_path / "t.jsonl"))
    t.begin_step(StepRows(("a",), (1,), (True,)))
    t.record(0, [[0, 1]])
    t.record(1, [[1, 2]])
    t.begin_step(StepRows(("a",), (1,), (False,)))
    t.record(0, [[3, 2]])                          # aborted before layer 1
    tr = t.end_request("a", aborted=True)
    assert tr.aborted and tr.tokens == [[[0, 1], [1, 2]]] and tr.prefill == 1


def test_file_round_trip_and_header_once(tmp_path):
    path = tmp_path / "t.jsonl"
    t = ActivationTracer(2, 4, 2, record_path=str(path), model="tiny", note="test")
    run_two_requests(t)
    t.end_request("a")
    t2 = ActivationTracer(2, 4, 2, record_path=str(path), model="tiny")
    t2.begin_step(StepRows(("c",), (1,), (False,)))
    t2.record(0, [[1, 3]])
    t2.record(1, [[0, 2]])
    t2.end_request("c")
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["format"] == "moe-trace"
    header, reqs = load_trace(str(path))
    assert header["model"] == "tiny" and header["num_layers"] == 2 and header["top_k"] == 2
    assert [r["id"] for r in reqs] == ["a", "c"]
    assert reqs[0]["prefill"] == 2 and reqs[0]["tokens"][2] == [[0, 1], [2, 3]]
    assert reqs[1] == {"id": "c", "prefill": 0, "tokens": [[[1, 3], [0, 2]]]}


def test_refuses_to_append_to_other_model(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"format": "moe-trace", "version": 1, "model": "x",
                                "num_layers": 3, "num_experts": 4, "top_k": 2, "note": ""}) + "\n")
    with pytest.raises(TraceFormatError, match="num_layers=3"):
        ActivationTracer(2, 4, 2, record_path=str(path))


HEADER = json.dumps({"format": "moe-trace", "version": 1, "model": "m", "num_layers": 2,
                     "num_experts": 4, "top_k": 2, "note": ""})


@pytest.mark.parametrize("body, message", [
    ("", "empty file"),
    ("[1]\n", "not a moe-trace header"),
    (HEADER.replace('"version": 1', '"version": 3') + "\n", "version 3"),
    (HEADER.replace('"version": 1', '"version": 2, "expert_bytes": 0') + "\n", "expert_bytes"),
    (HEADER.replace('"version": 1', '"version": 2') + "\n{\"id\": \"a\", \"prefill\": 0, \"tokens\": "
     "[[[0, 1], [1, 2]]], \"lookahead\": [[[1], [2]]]}\n", "lookahead[0] must list 1 layers"),
    (HEADER.replace('"version": 1', '"version": 2') + "\n{\"id\": \"a\", \"prefill\": 0, \"tokens\": "
     "[[[0, 1], [1, 2]]], \"lookahead\": [[[7]]]}\n", "lookahead[0][0]"),
    (HEADER + "\n{\"id\": \"a\", \"prefill\": 0}\n", ":2: request lacks field 'tokens'"),
    (HEADER + "\n{\"id\": \"a\", \"prefill\": 0, \"tokens\": [[[0, 1]]]}\n", "must list 2 layers"),
    (HEADER + "\n{\"id\": \"a\", \"prefill\": 0, \"tokens\": [[[0, 9], [1, 2]]]}\n", "0..3"),
    (HEADER + "\n{\"id\": \"a\", \"prefill\": 3, \"tokens\": [[[0, 1], [1, 2]]]}\n", "'prefill' 3"),
    (HEADER + "\n{\"id\": \"a\", \"pre", ":2: request line is not JSON"),
])
def test_load_trace_errors_name_the_problem(tmp_path, body, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(body)
    with pytest.raises(TraceFormatError, match=message.replace("[", r"\[")) as info:
        load_trace(str(path))
    assert str(path) in str(info.value)


def test_load_trace_missing_file(tmp_path):
    with pytest.raises(TraceFormatError, match="cannot open"):
        load_trace(str(tmp_path / "none.jsonl"))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_is_logged_and_serving_goes_on(caplog):
    t = ActivationTracer(2, 4, 2, record_path="/dev/full", model="tiny")
    run_two_requests(t)
    with caplog.at_level("WARNING", logger="moeserve.cache"):
        trace = t.end_request("a")            # ENOSPC: logged, not raised
    assert trace is not None and trace.prefill == 2
    assert "could not record request a in /dev/full" in caplog.text
    assert t.end_request("b") is not None and t.in_flight() == 0


def test_failed_write_leaves_no_partial_line(tmp_path, monkeypatch):
    path = tmp_path / "t.jsonl"
    t = ActivationTracer(2, 4, 2, record_path=str(path), model="tiny")
    run_two_requests(t)
    t.end_request("a")
    before = path.read_bytes()
    real_open = open

    class HalfWriter:
        """A file whose write lands half the text, then fails as a full disk does."""
        def __init__(self, f):
            self.f = f
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.f.close()
        def tell(self):
            return self.f.tell()
        def truncate(self, n):
            return self.f.truncate(n)
        def flush(self):
            self.f.flush()
        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError(28, "No space left on device")

    monkeypatch.setattr("builtins.open", lambda *a, **k: HalfWriter(real_open(*a, **k)))
    t.end_request("b")
    monkeypatch.undo()
    assert path.read_bytes() == before


def test_v2_records_lookahead_and_v1_files_stay_v1(tmp_path):
    path = tmp_path / "t.jsonl"
    t = ActivationTracer(3, 4, 2, record_path=str(path), model="tiny", expert_bytes=1024)
    t.begin_step(StepRows(("a",), (2,), (True,)))
    for layer in range(3):
        t.record(layer, [[0, 1], [2, 3]])
        if layer < 2:
            t.record_lookahead(layer, [[layer, 3], [1, 2]])
    t.begin_step(StepRows(("a",), (1,), (False,)))
    for layer in range(3):
        t.record(layer, [[1, 2]])
    t.record_lookahead(0, [[0, 2]])                 # only layer 0 looked ahead this token
    with pytest.raises(ValueError, match="layer 2 outside 0..1"):
        t.record_lookahead(2, [[0, 1]])
    t.end_request("a")
    header, reqs = load_trace(str(path))
    assert header["version"] == 2 and header["expert_bytes"] == 1024
    assert reqs[0]["lookahead"] == [[[0, 3], [1, 3]], [[1, 2], [1, 2]], [[0, 2], []]]
    # a v1 file is appended to as v1: no look-ahead field, still loads as v1
    old = tmp_path / "v1.jsonl"
    old.write_text(HEADER + "\n")
    t1 = ActivationTracer(2, 4, 2, record_path=str(old))
    t1.begin_step(StepRows(("b",), (1,), (False,)))
    t1.record(0, [[0, 1]])
    t1.record_lookahead(0, [[2, 3]])
    t1.record(1, [[1, 2]])
    t1.end_request("b")
    header, reqs = load_trace(str(old))
    assert header["version"] == 1 and reqs == [{"id": "b", "prefill": 0, "tokens": [[[0, 1], [1, 2]]]}]
