import json
import os

import pytest

from bench.replay import main, run_replay
from cache.trace import load_trace

HEADER = {"format": "moe-trace", "version": 1, "model": "hand", "num_layers": 2,
          "num_experts": 2, "top_k": 1, "note": ""}
# one decode-only request; accesses (layer, expert): (0,0) (1,0) (0,1) (1,1) (0,0) (1,0)
TOKENS = [[[0], [0]], [[1], [1]], [[0], [0]]]


def results(caps, link, policies, tokens=TOKENS, prefill=0):
    reqs = [{"id": "a", "prefill": prefill, "tokens": tokens}]
    return {r["policy"]: r for r in run_replay(HEADER, reqs, caps, link, policies)}


def test_demand_only_policies_by_hand():
    r = results([0.5], float("inf"), ["lru", "lfu", "belady"])   # 2 slots
    assert r["lru"]["hit_rate"] == 0.0 and r["lfu"]["hit_rate"] == 0.0
    # Belady: 3rd access evicts (1,0) (needed last), 4th evicts (0,1) (never again): (0,0) hits
    assert r["belady"]["hit_rate"] == pytest.approx(1 / 6)
    assert r["belady"]["loads_per_token"] == pytest.approx(5 / 3)
    assert r["lru"]["stalls_per_token"] == 0.0 and r["lru"]["prefetch_precision"] is None


def test_link_limits_stalls_and_oracle_by_hand():
    r = results([0.5], 1.0, ["lru", "oracle"])
    assert r["lru"]["stalls_per_token"] == pytest.approx(2.0)     # every miss waits one step
    o = r["oracle"]
    # only the first access misses; every later expert is prefetched a layer ahead
    assert o["hit_rate"] == pytest.approx(5 / 6)
    assert o["stalls_per_token"] == pytest.approx(1 / 3)
    assert o["loads_per_token"] == pytest.approx(2.0)
    assert o["prefetch_precision"] == 1.0 and o["prefetch_recall"] == pytest.approx(5 / 6)


def test_prompt_pass_warms_but_is_not_scored():
    # prompt of 2 tokens uses (0,0),(0,1),(1,0); the decode token needs (0,1),(1,1)
    tokens = [[[0], [0]], [[1], [0]], [[1], [1]]]
    r = results([1.0], float("inf"), ["lru"], tokens, prefill=2)["lru"]
    assert r["hit_rate"] == pytest.approx(0.5) and r["loads_per_token"] == pytest.approx(1.0)


def test_policies_with_prediction_run_and_stay_in_bounds():
    tokens = [[[t % 2], [(t // 2) % 2]] for t in range(12)]
    r = results([0.5], 1.0, ["moe-infinity", "auto"], tokens)
    for m in r.values():
        assert 0.0 <= m["hit_rate"] <= 1.0 and m["loads_per_token"] >= 0.0


def test_cli_writes_json_and_plot(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps(HEADER) + "\n" + json.dumps({"id": "a", "prefill": 0,
                                                               "tokens": TOKENS}) + "\n")
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    assert main([str(trace), "--capacity", "0.5,1", "--link", "inf", "--policies", "lru,oracle",
                 "--json", str(out), "--plot", str(png)]) == 0
    doc = json.loads(out.read_text())
    assert doc["trace"] == str(trace) and len(doc["results"]) == 4
    assert set(doc["results"][0]) == {"capacity", "link", "policy", "hit_rate", "stalls_per_token",
                                      "loads_per_token", "prefetch_precision", "prefetch_recall",
                                      "bytes_per_token", "ms_per_token"}
    assert doc["results"][0]["ms_per_token"] is None
    assert doc["results"][0]["link"] is None
    assert png.stat().st_size > 1000 and "oracle" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown fifo"):
        main([str(trace), "--policies", "fifo"])


REAL = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "traces",
                    "mixtral-8x7b-instruct.jsonl")


@pytest.mark.skipif(not os.path.exists(REAL), reason="shared Mixtral trace not present")
def test_reproduces_reference_demand_hit_rates_on_real_trace():
    header, reqs = load_trace(REAL)
    r = {x["policy"]: x["hit_rate"]
         for x in run_replay(header, reqs, [0.25], float("inf"), ["lru", "lfu", "belady"])}
    assert r["lru"] == pytest.approx(0.332, abs=0.001)
    assert r["lfu"] == pytest.approx(0.301, abs=0.001)
    assert r["belady"] == pytest.approx(0.604, abs=0.001)


def test_time_model_derives_link_and_reports_bytes_and_ms():
    from bench.replay import TimeModel
    tm = TimeModel(compute_ms=2.0, bandwidth=1e6, expert_bytes=2000)   # 1 expert per layer step
    assert tm.link() == pytest.approx(1.0)
    reqs = [{"id": "a", "prefill": 0, "tokens": TOKENS}]
    derived = run_replay(HEADER, reqs, [0.5], float("inf"), ["lru"], tm)[0]
    by_link = results([0.5], 1.0, ["lru"])["lru"]
    assert derived["link"] == pytest.approx(1.0)
    assert derived["stalls_per_token"] == pytest.approx(by_link["stalls_per_token"])
    assert derived["bytes_per_token"] == pytest.approx(by_link["loads_per_token"] * 2000)
    # 2 layers + 2 stall steps per token, 2 ms each
    assert derived["ms_per_token"] == pytest.approx((2 + by_link["stalls_per_token"]) * 2.0)
    with pytest.raises(ValueError, match="TimeModel.bandwidth"):
        TimeModel(1.0, 0.0, 10)


def test_lookahead_of_a_v2_trace_reaches_the_policy():
    # layer 1 alternates between experts 0 and 1 with no pattern the statistics can learn
    # at 4 experts; the look-ahead names it exactly, so auto prefetches it in time
    header = {**HEADER, "version": 2, "num_experts": 4}
    seq = "0110100110010110"
    tokens = [[[2], [int(c)]] for c in seq]
    ahead = [[[int(c)]] for c in seq]
    plain = run_replay(header, [{"id": "a", "prefill": 0, "tokens": tokens}], [0.5], 1.0, ["auto"])
    v2 = run_replay(header, [{"id": "a", "prefill": 0, "tokens": tokens, "lookahead": ahead}],
                    [0.5], 1.0, ["auto"])
    assert v2[0]["hit_rate"] > plain[0]["hit_rate"]
    assert v2[0]["prefetch_precision"] is not None
