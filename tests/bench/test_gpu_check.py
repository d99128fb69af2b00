"""bench.gpu_check runs end to end (on the CPU here: the same code a CUDA machine runs) and says
in one line that there is nothing to check where CUDA is missing."""
from __future__ import annotations

import json

import pytest
import torch

from bench.gpu_check import main


def test_gpu_check_without_cuda_says_so_and_succeeds(capsys: pytest.CaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA device" in out[0]


def test_gpu_check_dry_run_on_cpu_is_exact_in_every_case(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOESERVE_HOME", str(tmp_path / "home"))
    out = tmp_path / "gc.json"
    assert main(["--device", "cpu", "--shapes", "tiny", "--formats", "none,int4", "--tokens", "6",
                 "--workdir", str(tmp_path / "w"), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    runs = data["runs"]
    # 7 cases for bf16 experts; int4 (CUDA pack layout on a GPU) skips the 2 CPU-expert ones
    assert len(runs) == 12 and all(r["exact"] and r["decode_ms_per_token"] > 0 for r in runs)
    cpu = [r for r in runs if r["cpu_experts"] == "auto"]
    assert len(cpu) == 2 and all(r["cache"]["cpu_computed"] == 0 for r in cpu)   # no host tier on a CPU
    offloaded = [r for r in runs if r["expert_budget"] == "25%"]
    assert all(r["cache"]["misses"] > 0 for r in offloaded)      # the cache really was in the way
