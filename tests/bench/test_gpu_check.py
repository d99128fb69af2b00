"""bench.gpu_check runs end to end (on the CPU here: the same code a CUDA machine runs) and says
in one line that there is nothing to check where CUDA is missing."""
from __future__ import annotations

import json

import pytest
import torch

from bench.common import REPO
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
    # the goals table: no GPU copies on a CPU (no H2D row); the exactness goal counts all 10 runs
    # without CPU experts
    goals = {g["goal"]: g for g in data["goals"]}
    assert goals["exact tokens in every run without CPU experts"] == {
        "goal": "exact tokens in every run without CPU experts", "value": "10 of 10 (0 skipped)", "met": True}
    assert not any("H2D" in g for g in goals)
    ratios = [g for g in goals if "/ all in VRAM" in g]
    assert ratios == []                                  # only the default-64x shape has that goal


def test_gpu_check_time_limit_skips_cases_and_still_writes_its_json(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MOESERVE_HOME", str(tmp_path / "home"))
    out = tmp_path / "gc.json"
    assert main(["--device", "cpu", "--shapes", "tiny", "--formats", "none", "--time-limit", "0",
                 "--workdir", str(tmp_path / "w"), "--json", str(out)]) == 1
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 7 and all(r["error"] == "skipped: --time-limit reached" for r in runs)
    assert not (tmp_path / "w" / "tiny").exists()        # nothing built for a skipped shape


def test_gpu_check_json_holds_every_finished_case_when_the_run_is_killed(tmp_path, monkeypatch) -> None:
    import bench.gpu_check as gc
    monkeypatch.setenv("MOESERVE_HOME", str(tmp_path / "home"))
    real, calls = gc.decode, []

    def decode(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt                      # as a command limit's kill would
        return real(*a, **k)

    monkeypatch.setattr(gc, "decode", decode)
    out = tmp_path / "gc.json"
    with pytest.raises(KeyboardInterrupt):
        main(["--device", "cpu", "--shapes", "tiny", "--formats", "none", "--tokens", "4",
              "--workdir", str(tmp_path / "w"), "--json", str(out)])
    runs = json.loads(out.read_text())["runs"]
    assert [r["case"] for r in runs] == [c[0] for c in gc.CASES[:2]] and all(r["exact"] for r in runs)


# the project's dependencies that the lent CUDA machines lack (they reach no network): the check
# and its tests must run without them (KINDS.md of the device tool lists what those machines have)
NOT_ON_THE_GPU_MACHINES = ("fastapi", "starlette", "uvicorn", "sse_starlette", "llguidance", "gguf",
                           "pydantic", "openai", "schemathesis", "playwright", "llama_cpp")


def test_gpu_check_and_its_tests_need_nothing_the_gpu_machines_lack(tmp_path) -> None:
    import os
    import subprocess
    import sys
    from bench.gpu_check import GPU_TESTS
    (tmp_path / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        f"BLOCKED = {NOT_ON_THE_GPU_MACHINES!r}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'{name} is not on the GPU machines')\n"
        "sys.meta_path.insert(0, Block())\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}", MOESERVE_HOME=str(tmp_path / "home"))
    probe = subprocess.run([sys.executable, "-c", "import fastapi"], env=env, capture_output=True, text=True)
    assert "not on the GPU machines" in probe.stderr           # the blocker is in force
    run = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--shapes", "tiny",
                          "--formats", "none,int4", "--tokens", "3", "--workdir", str(tmp_path / "w"),
                          "--json", str(tmp_path / "gc.json")], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    runs = json.loads((tmp_path / "gc.json").read_text())["runs"]
    assert len(runs) == 12 and not any("error" in r for r in runs)
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-m", "gpu", *GPU_TESTS],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert tests.returncode == 0 and "error" not in tests.stdout.lower(), tests.stdout[-2000:]
    assert "tests collected" in tests.stdout or "selected" in tests.stdout
