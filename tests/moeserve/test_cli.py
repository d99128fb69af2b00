"""`moeserve --help` and each command's --help work and explain every flag."""
from __future__ import annotations

import dataclasses
import os

import pytest

from configs import CacheConfig, EngineConfig, ServerConfig
from configs.base import flag_name
from moeserve.cli import build_parser


@pytest.mark.parametrize("command,configs", [("serve", (EngineConfig, CacheConfig, ServerConfig)),
                                             ("generate", (EngineConfig, CacheConfig)),
                                             ("build-default", ())])
def test_help_lists_every_flag(command: str, configs: tuple, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for cls in configs:
        for f in dataclasses.fields(cls):
            assert flag_name(f) in text
            assert f"MOESERVE_{f.name.upper()}" in text.replace("\n", "").replace(" ", "")
    assert "25%" in text or command == "build-default"


def test_top_level_help(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--help"])
    assert exit_.value.code == 0 and "serve" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_missing_model_dir_is_a_clear_error(command: str, tmp_path, capsys: pytest.CaptureFixture) -> None:
    from moeserve.cli import main
    args = [command, "--model", str(tmp_path / "nope")] + (["--prompt", "hi"] if command == "generate" else [])
    assert main(args) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main([command, "--model", str(tmp_path)] + args[3:]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_compute_threads_wait_passively_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    from moeserve.cli import main
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"        # inherited by the engine process
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"         # numpy's BLAS beside torch's threads
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
