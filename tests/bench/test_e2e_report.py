"""The end-to-end benchmark's pure parts: limits, summaries, bounds, targets, schema and table."""
from __future__ import annotations

import json
import os
import struct

import pytest

from bench.common import percentile
from bench.e2e_report import (SCHEMA_KEYS, SYSTEMS, cgroup_limit_bytes, check_schema, error_entry,
                              parse_fraction, physical_bounds, render, summarize, targets)
from bench.e2e_sys import checkpoint_bytes


def raw(ms: list[float], **kw: object) -> dict:
    base = {"decode_ms": ms, "ttft_ms": [100.0, 300.0, 200.0], "c4_tokens": 256, "c4_seconds": 8.0,
            "generated_tokens": 100, "disk_read_bytes": 5_000_000, "peak_rss_bytes": 123456,
            "tokens_per_request": 64, "prompts_c1": 3, "prompts_c4": 4, "error": None}
    base.update(kw)
    return base


def test_cgroup_limit_is_budget_plus_dense_plus_allowance_page_rounded() -> None:
    assert cgroup_limit_bytes(4096 * 400, 0.25, 4096 * 10, 4096) == 4096 * 111
    # a share that is not a whole page rounds the total up to the next page
    assert cgroup_limit_bytes(10_000, 0.25, 1, 0) == 4096
    with pytest.raises(ValueError, match="budget_fraction"):
        cgroup_limit_bytes(100, 0.0, 0, 0)
    assert parse_fraction("25%") == 0.25
    with pytest.raises(ValueError, match="percentage"):
        parse_fraction("2GiB")


def test_percentile_interpolates_between_ranks() -> None:
    xs = [float(x) for x in range(1, 11)]       # 1..10
    assert percentile(xs, 90) == pytest.approx(9.1)
    assert percentile(xs, 50) == pytest.approx(5.5)
    assert percentile([7.0], 90) == 7.0


def test_summarize_computes_the_issue_fields() -> None:
    s = summarize(raw([10.0, 20.0, 30.0, 40.0, 50.0], hits=30, misses=10))
    assert s["per_token_ms_median"] == 30.0
    assert s["per_token_ms_p90"] == pytest.approx(46.0)
    assert s["ttft_ms_median"] == 200.0
    assert s["tokens_per_s_concurrent4"] == 32.0
    assert s["disk_bytes_per_token"] == 50_000.0
    assert s["hit_rate"] == 0.75
    assert s["peak_rss_bytes"] == 123456 and s["error"] is None
    assert summarize(raw([1.0]))["hit_rate"] is None        # baselines know no hit rate


def test_bounds_add_miss_bytes_at_disk_bandwidth_to_resident_latency() -> None:
    systems = {"resident": summarize(raw([10.0])),
               "lru": summarize(raw([50.0], cache_disk_bytes=2e9, generated_tokens=100)),
               "auto": error_entry("boom")}
    b = physical_bounds(systems, bandwidth=1e9)
    assert b["compute_bound_ms"] == 10.0
    assert b["lru_io_bound_ms"] == pytest.approx(10.0 + 20.0)    # 20 MB/token at 1 GB/s
    assert b["auto_io_bound_ms"] is None


def test_targets_compare_auto_with_each_reference() -> None:
    sys_ = {"resident": {"per_token_ms_median": 10.0}, "auto": {"per_token_ms_median": 14.0},
            "accelerate": {"per_token_ms_median": 140.0}, "lru": {"per_token_ms_median": 15.0},
            "llama.cpp": error_entry("could not build")}
    got = {t["target"]: t for t in targets(sys_)}
    assert got["auto <= 1.5x resident"]["met"] is True
    assert got["auto >= 5x faster than accelerate"]["ratio"] == pytest.approx(10.0)
    assert got["auto >= 1.3x faster than lru (no prefetch)"]["met"] is False
    assert got["auto faster than llama.cpp (same memory cap)"]["met"] is None


def test_schema_json_round_trip_and_table(tmp_path) -> None:
    systems = {n: summarize(raw([5.0, 6.0], hits=1, misses=1)) for n in SYSTEMS if n != "llama.cpp"}
    systems["llama.cpp"] = error_entry("convert_hf_to_gguf.py failed")
    result = {"machine": "test box", "systems": systems, "bounds": physical_bounds(systems, 1e9),
              "targets": targets(systems)}
    check_schema(result)
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps(result))
    back = json.loads(path.read_text())
    check_schema(back)
    assert set(back["systems"]) == set(SYSTEMS)
    assert all(set(SCHEMA_KEYS) <= set(s) for s in back["systems"].values())
    text = render(back)
    assert "| resident |" in text and "| llama.cpp | error (below) |" in text
    assert "llama.cpp error: convert_hf_to_gguf.py failed" in text
    assert "3 prompts x 64 tokens" in text
    bad = json.loads(path.read_text())
    bad["systems"]["lru"]["peak_rss_bytes"] = 1.5
    with pytest.raises(ValueError, match="peak_rss_bytes"):
        check_schema(bad)
    bad = json.loads(path.read_text())
    del bad["systems"]["auto"]["hit_rate"]
    with pytest.raises(ValueError, match="hit_rate"):
        check_schema(bad)


def test_checkpoint_bytes_splits_experts_from_dense(tmp_path) -> None:
    header = {"model.layers.0.block_sparse_moe.experts.0.w1.weight": {"dtype": "BF16", "shape": [4, 8],
                                                                       "data_offsets": [0, 64]},
              "model.embed_tokens.weight": {"dtype": "F32", "shape": [3, 2], "data_offsets": [64, 88]},
              "__metadata__": {"format": "pt"}}
    blob = json.dumps(header).encode()
    with open(os.path.join(tmp_path, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + bytes(88))
    assert checkpoint_bytes(str(tmp_path)) == (64, 24)


def test_quantized_rows_have_their_format_and_targets() -> None:
    from bench.e2e_report import system_format
    assert [system_format(n) for n in ("auto", "auto-int4", "resident-int8", "llama.cpp",
                                       "llama.cpp-q4_k_m-resident", "llama.cpp-q8_0")] == \
        ["none", "int4", "int8", "none", "q4_k_m", "q8_0"]
    sys_ = {"auto": {"per_token_ms_median": 400.0}, "auto-int4": {"per_token_ms_median": 80.0},
            "resident-int4": {"per_token_ms_median": 50.0},
            "llama.cpp-q4_k_m-resident": {"per_token_ms_median": 40.0},
            "llama.cpp-q4_k_m": {"per_token_ms_median": 200.0}}
    got = {t["target"]: t for t in targets(sys_)}
    assert got["auto-int4 >= 4x faster than auto (bf16)"]["ratio"] == pytest.approx(5.0)
    assert got["auto-int4 >= 3x faster than llama.cpp Q4_K_M (same cap)"]["met"] is False
    assert got["resident-int4 at least as fast as llama.cpp Q4_K_M resident (uncapped)"]["met"] is False
