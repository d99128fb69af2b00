"""--model as a Hugging Face repo id: found offline in the local Hugging Face cache (the layout
`hf download` writes), named after the repo, and a clear error when it is not there."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bench.common import REPO
from configs.models import model_name, storage_name
from moeserve.model_ref import resolve_model
from tests.engine.tiny_families import make_family_checkpoint

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A Hugging Face cache holding org/tiny-moe at one revision, as `hf download` leaves it."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny-moe"
    snapshot = repo / "snapshots" / REVISION
    make_family_checkpoint("mixtral", str(snapshot), torch.bfloat16)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return str(cache)


def test_a_repo_id_resolves_to_its_cached_snapshot(hub_cache: str) -> None:
    path = resolve_model("org/tiny-moe")
    assert os.path.samefile(path, os.path.join(hub_cache, "models--org--tiny-moe", "snapshots", REVISION))
    assert model_name(path) == "org/tiny-moe"          # served under the id the user gives
    assert storage_name(path) == "org--tiny-moe-01234567"
    other = os.path.join(hub_cache, "models--else--tiny-moe", "snapshots", REVISION)
    assert storage_name(other) != storage_name(path)   # conversions of two orgs' repos never collide
    with pytest.raises(FileNotFoundError, match="hf download org/other"):
        resolve_model("org/other")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve_model("./not/here")
    with pytest.raises(FileNotFoundError, match="nor a valid Hugging Face repo id"):
        resolve_model("org/bad..name")


def test_a_gguf_file_is_read_as_one_even_where_its_path_looks_like_a_repo_id(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from convert.model_store import BuildError
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model-Q4_K_M.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)          # models/x.gguf is also shaped like a repo id
    monkeypatch.setenv("MOESERVE_HOME", str(tmp_path / "home"))
    for arg in ("models/model-Q4_K_M.gguf", str(tmp_path / "models" / "model-Q4_K_M.gguf")):
        with pytest.raises(BuildError, match="model-Q4_K_M.gguf: not a readable GGUF file"):
            resolve_model(arg)


def test_quantize_cli_takes_a_repo_id(hub_cache: str, tmp_path) -> None:
    out = str(tmp_path / "home")
    env = {**os.environ, "HF_HUB_CACHE": hub_cache, "MOESERVE_HOME": out, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-m", "moeserve.cli", "quantize", "--model", "org/tiny-moe",
                           "--quantize", "int8", "--no-progress"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    made = proc.stdout.strip().splitlines()[-1]
    assert os.path.basename(made) == "org--tiny-moe-01234567-int8"
    assert os.path.isfile(os.path.join(made, "config.json"))
    bad = subprocess.run([sys.executable, "-m", "moeserve.cli", "quantize", "--model", "org/missing",
                          "--quantize", "int8"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not in the local Hugging Face cache" in bad.stderr
