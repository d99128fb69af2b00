"""The end-to-end benchmark's pure parts: plan, same-sample bookkeeping, bounds, ratios with spread,
the below-floor flag, schema and report."""
from __future__ import annotations

import json
import os
import struct

import pytest

from bench.common import percentile
from bench.e2e_plan import (SYSTEMS, Ratio, cgroup_limit_bytes, parse_fraction, ratio_pairs, run_order,
                            scenarios)
from bench.e2e_report import (SCHEMA_KEYS, build, check_schema, common_prompts, floors, ratio_stats,
                              run_median, summarize)
from bench.e2e_sys import checkpoint_bytes

SIZES = {"none": (4_000_000_000, 100_000_000), "int8": (2_000_000_000, 100_000_000),
         "int4": (1_200_000_000, 100_000_000)}


def req(prompt: int, gaps: list[float], disk: float = 0.0, hits: float | None = None,
        misses: float | None = None, ttft: float = 200.0, **kw: float) -> dict:
    r = {"prompt": prompt, "prompt_tokens": 50, "ttft_ms": ttft, "decode_ms": gaps,
         "prefill_disk_bytes": 1e6, "decode_disk_bytes": disk}
    if hits is not None:
        r.update(decode_hits=hits, decode_misses=misses)
    r.update(kw)
    return r


def run(repeat: int, reqs: list[dict], conc: dict | None = None, **kw: object) -> dict:
    out = {"repeat": repeat, "requests": reqs, "concurrent": conc, "peak_rss_bytes": 1000, "error": None}
    out.update(kw)
    return out


def test_cgroup_limit_is_budget_plus_dense_plus_allowance_page_rounded() -> None:
    assert cgroup_limit_bytes(4096 * 400, 0.25, 4096 * 10, 4096) == 4096 * 111
    assert cgroup_limit_bytes(10_000, 0.25, 1, 0) == 4096      # rounds up to the next page
    with pytest.raises(ValueError, match="budget_fraction"):
        cgroup_limit_bytes(100, 0.0, 0, 0)
    assert parse_fraction("25%") == 0.25
    with pytest.raises(ValueError, match="percentage"):
        parse_fraction("2GiB")


def test_scenarios_cap_every_system_alike_and_give_moeserve_the_rest() -> None:
    plan = scenarios(SIZES, 1 << 20, {"bf16-25%": ("auto", "auto-int4", "llama.cpp-q4_k_m"),
                                      "int4-25%": ("auto-int4",)})
    ref, bf16, int4 = plan
    assert ref.memory_cap_bytes is None and ref.systems == ("resident", "resident-int4", "llama.cpp-q4_k_m")
    assert bf16.memory_cap_bytes == cgroup_limit_bytes(4_000_000_000, 0.25, 100_000_000, 1 << 20)
    # the byte budget is the cap less dense and allowance: at least the share of the experts
    assert bf16.expert_budget_bytes == bf16.memory_cap_bytes - 100_000_000 - (1 << 20) >= 1_000_000_000
    assert 300_000_000 <= int4.expert_budget_bytes < 300_004_096
    with pytest.raises(ValueError, match="scenario"):
        scenarios(SIZES, 0, {"fp8-25%": ("auto",)})


def test_run_order_alternates() -> None:
    assert run_order(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert run_order(["a", "b", "c"], 1) == ["c", "b", "a"]
    assert run_order(["a", "b", "c"], 2) == ["a", "b", "c"]


def test_ratio_pairs_name_each_peer_lru_and_resident() -> None:
    plan = scenarios(SIZES, 0, {"bf16-25%": ("auto", "auto-int4", "lru-int4", "llama.cpp-q4_k_m")})
    labels = {r.label: r for r in ratio_pairs(plan)}
    peer = labels["bf16-25%: auto-int4 speedup over llama.cpp-q4_k_m"]
    assert peer.num == ("bf16-25%", "llama.cpp-q4_k_m") and peer.den == ("bf16-25%", "auto-int4")
    assert labels["bf16-25%: auto-int4 speedup over lru-int4"].num[1] == "lru-int4"
    assert labels["bf16-25%: auto-int4 slowdown vs resident-int4 (uncapped)"].den == ("uncapped", "resident-int4")
    assert "uncapped: resident-int4 speedup over llama.cpp-q4_k_m" in labels
    assert SYSTEMS["lru-int4"].reference == "resident-int4" and SYSTEMS["llama.cpp-q8_0"].reference == "llama.cpp-q8_0"


def test_floors_are_max_and_sum_of_compute_and_io() -> None:
    assert floors(100.0, 50e6, 1e9) == (100.0, 150.0)          # 50 MB at 1 GB/s = 50 ms
    assert floors(10.0, 50e6, 1e9) == (50.0, 60.0)             # disk-bound: the floor is the I/O
    assert floors(None, 50e6, 1e9) == (None, None)


def test_summary_splits_decode_from_prefill_and_uses_the_reference_on_the_same_prompts() -> None:
    runs = [run(0, [req(0, [100.0, 110.0], disk=2e6, hits=30, misses=10, ttft=400.0),
                    req(1, [120.0, 130.0], disk=2e6, hits=30, misses=10, decode_prefetch_issued=8,
                        decode_prefetch_used=6)],
                conc={"requests": 4, "tokens": 40, "seconds": 8.0, "mode": "batched"}),
            run(1, [req(0, [90.0, 100.0], disk=0.0, hits=40, misses=0), req(1, [140.0, 150.0], disk=0.0,
                                                                           hits=40, misses=0)])]
    ref = [run(0, [req(0, [50.0, 50.0]), req(1, [70.0, 70.0])]), run(1, [req(0, [60.0]), req(1, [60.0])])]
    s = summarize("auto-int4", runs, ref, bandwidth=1e8)
    assert s["format"] == "int4" and s["runs"] == [115.0, 120.0] and s["decode_ms_median"] == 117.5
    assert s["decode_ms_p90"] == pytest.approx(percentile([100, 110, 120, 130, 90, 100, 140, 150], 90))
    assert s["decode_disk_bytes_per_token"] == pytest.approx(4e6 / 8)      # prefill bytes excluded
    assert s["decode_hit_rate"] == pytest.approx(140 / 160)
    assert s["prefetch_precision"] == 0.75 and s["prefetch_recall"] == pytest.approx(6 / 26)
    assert s["compute_ms"] == 60.0                                          # median of ref runs 60, 60
    assert s["floor_ms"] == pytest.approx(60.0) and s["no_overlap_ms"] == pytest.approx(65.0)
    assert s["tok_s_concurrent"] == 5.0 and s["concurrency"] == "4 batched"
    assert s["prompt_tok_s"] == pytest.approx(200 / ((400 + 200 + 200 + 200) / 1000))
    assert set(SCHEMA_KEYS) <= set(s)


def test_a_slow_system_is_compared_on_the_prompts_every_system_ran() -> None:
    fast = [run(r, [req(0, [10.0, 10.0]), req(1, [30.0, 30.0])]) for r in range(3)]
    slow = [run(r, [req(0, [100.0 * (r + 1), 100.0 * (r + 1)])]) for r in range(3)]
    fast2 = [run(r, [req(0, [20.0, 20.0]), req(1, [30.0, 30.0])]) for r in range(3)]
    raw = {"s": {"fast": fast, "slow": slow, "fast2": fast2}}
    assert common_prompts(raw) == {0}
    assert run_median(fast[0]) == 20.0 and run_median(fast[0], {0}) == 10.0
    st = ratio_stats(Ratio("x", ("s", "slow"), ("s", "fast")), raw)
    assert st["runs"] == [10.0, 20.0, 30.0] and (st["median"], st["min"], st["max"]) == (20.0, 10.0, 30.0)
    assert st["prompts"] == [0]
    # two systems that both ran every prompt are compared on all of them
    both = ratio_stats(Ratio("y", ("s", "fast2"), ("s", "fast")), raw)
    assert both["prompts"] == [0, 1] and both["median"] == pytest.approx(25.0 / 20.0)
    # a repeat one side lacks (a failed run) is left out, never paired with another repeat
    raw["s"]["slow"][1] = run(1, [], error="boom")
    assert ratio_stats(Ratio("x", ("s", "slow"), ("s", "fast")), raw)["runs"] == [10.0, 30.0]


def test_failed_runs_are_reported_and_a_measurement_below_its_floor_is_a_method_error() -> None:
    plan = scenarios(SIZES, 0, {"int4-25%": ("auto-int4", "llama.cpp-q4_k_m")})
    raw = {"uncapped": {"resident-int4": [run(r, [req(0, [100.0])]) for r in range(3)],
                        "llama.cpp-q4_k_m": [run(r, [req(0, [10.0])]) for r in range(3)]},
           "int4-25%": {"auto-int4": [run(r, [req(0, [80.0], disk=1e6, hits=1, misses=1)]) for r in range(3)],
                        "llama.cpp-q4_k_m": [run(0, [], error="worker exceeded 900s and was killed")] * 3}}
    body = build(plan, raw, ratio_pairs(plan), bandwidth=1e9)
    sc = {s["name"]: s for s in body["scenarios"]}
    assert sc["int4-25%"]["systems"]["llama.cpp-q4_k_m"]["error"].startswith("3 of 3 runs failed: worker exceeded")
    assert sc["int4-25%"]["systems"]["llama.cpp-q4_k_m"]["decode_ms_median"] is None
    assert len(body["method_errors"]) == 1 and "int4-25%/auto-int4" in body["method_errors"][0]
    assert sc["uncapped"]["ratios"]["uncapped: resident-int4 speedup over llama.cpp-q4_k_m"]["median"] == 0.1
    got = {t["target"]: t for t in body["targets"]}
    assert got["uncapped: resident-int4 speedup over llama.cpp-q4_k_m >= 1"]["met"] is False
    assert got["int4-25%: auto-int4 speedup over llama.cpp-q4_k_m >= 3"]["met"] is None


def test_schema_json_round_trip_and_report(tmp_path) -> None:
    from bench.e2e_render import render
    plan = scenarios(SIZES, 0, {"int4-25%": ("auto-int4",)})
    raw = {"uncapped": {"resident-int4": [run(r, [req(0, [50.0, 52.0])]) for r in range(3)]},
           "int4-25%": {"auto-int4": [run(r, [req(0, [60.0, 70.0], disk=1e5, hits=9, misses=1)],
                                          conc={"requests": 4, "tokens": 8, "seconds": 1.0, "mode": "batched"})
                                      for r in range(3)]}}
    result = {"machine": {"cpu": "x", "ram_gib": 24, "disk_bandwidth_bytes_per_s": 1e9}, "setup": "s"}
    result.update(build(plan, raw, ratio_pairs(plan), 1e9))
    check_schema(result)
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps(result))
    back = json.loads(path.read_text())
    check_schema(back)
    text = render(back)
    assert "### int4-25%" in text and "65 (65-65) | 65 |" in text and "90.0%" in text
    assert "int4-25%: auto-int4 slowdown vs resident-int4 (uncapped) | 1.27 | 1.27-1.27 | 3 | [0] |" in text
    del back["scenarios"][1]["systems"]["auto-int4"]["floor_ms"]
    with pytest.raises(ValueError, match="floor_ms"):
        check_schema(back)


def test_checkpoint_bytes_splits_experts_from_dense(tmp_path) -> None:
    header = {"model.layers.0.block_sparse_moe.experts.0.w1.weight": {"dtype": "BF16", "shape": [4, 8],
                                                                       "data_offsets": [0, 64]},
              "model.embed_tokens.weight": {"dtype": "F32", "shape": [3, 2], "data_offsets": [64, 88]},
              "__metadata__": {"format": "pt"}}
    blob = json.dumps(header).encode()
    with open(os.path.join(tmp_path, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + bytes(88))
    assert checkpoint_bytes(str(tmp_path)) == (64, 24)


def test_a_system_that_never_ran_says_so_and_the_run_is_marked_incomplete() -> None:
    plan = scenarios(SIZES, 0, {"int4-25%": ("auto-int4",)})
    raw = {"uncapped": {"resident-int4": [run(0, [req(0, [50.0])])]}, "int4-25%": {"auto-int4": []}}
    body = build(plan, raw, ratio_pairs(plan), 1e9)
    entry = body["scenarios"][1]["systems"]["auto-int4"]
    assert entry["error"].startswith("not run") and entry["decode_ms_median"] is None
    assert body["incomplete"] == ["int4-25%/auto-int4: 0 of 1 runs"]


def test_cli_help_prints_every_flag(capsys: pytest.CaptureFixture) -> None:
    from bench.e2e import parse_args
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--scenario" in out and "bf16-25%" in out and "--report-only" in out
