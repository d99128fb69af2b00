import json

import numpy as np
import pytest

from bench.policy_cost import Routing, main
from cache.policies import POLICY_NAMES


def test_synthetic_routing_is_top_k_distinct_skewed_and_reused():
    req = Routing(4, 32, 4, seed=3).requests(1)[0]
    toks = [req.token() for _ in range(200)]
    assert all(t.shape == (4, 4) and all(len(set(row)) == 4 for row in t) for t in toks)
    counts = np.zeros((4, 32))
    for t in toks:
        np.add.at(counts, (np.arange(4)[:, None], t), 1)
    share = np.sort(counts, axis=1)[:, -4:].sum(axis=1) / counts.sum(axis=1)
    assert (share > 2 * 4 / 32).all()                    # the top 4 of 32 take > 2x their share
    reuse = np.mean([len(set(a[0]) & set(b[0])) / 4 for a, b in zip(toks, toks[1:])])
    assert reuse > 0.3


def test_cli_writes_schema_table_and_plot(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert main(["--shapes", "4x8x2", "--batches", "1,2", "--tokens", "2", "--warmup", "1",
                 "--repeats", "3", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["results"]
    assert len(rows) == 2 * len(POLICY_NAMES)
    for r in rows:
        assert set(r) == {"policy", "layers", "experts", "top_k", "batch", "ms_per_layer", "ms_min",
                          "ms_max", "runs"}
        assert (r["layers"], r["experts"], r["top_k"]) == (4, 8, 2) and r["ms_per_layer"] > 0
        assert len(r["runs"]) == 3 and r["ms_per_layer"] == sorted(r["runs"])[1]
        assert r["ms_min"] == min(r["runs"]) and r["ms_max"] == max(r["runs"])
    assert {r["policy"] for r in rows} == set(POLICY_NAMES)
    assert (tmp_path / "cost.png").stat().st_size > 1000
    assert "| policy |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--shapes"):
        main(["--shapes", "4x8", "--json", str(out)])
