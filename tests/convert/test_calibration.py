"""The shipped calibration answers (convert/data/calibration_answers.json) and plain progress lines.

That the shipped answers equal freshly generated ones is checked by
``python -m convert.calibration --check`` (~2-4 min on 2 cores, so not here); here: the file is
found for exactly the key a default build computes, and never for another key."""
from __future__ import annotations

import logging
import os

from configs.presets import load_preset, preset_names
from convert.calibration import ANSWERS_FILE, answers_key, load_answers
from convert.default_model import CALIBRATION_THREADS
from convert.gguf_import import find_packaged_gguf
from convert.mtbench import calibration_questions
from convert.progress import PlainProgress


def _key(**over: object) -> dict:
    gguf = find_packaged_gguf()
    params = load_preset("smollm2-moe-8x")
    key = answers_key(os.path.basename(gguf), os.path.getsize(gguf), calibration_questions(),
                      params["calibration_max_new_tokens"], params["calibration_turns"],
                      CALIBRATION_THREADS)
    key.update(over)
    return key


def test_every_preset_finds_the_shipped_answers() -> None:
    questions = calibration_questions()
    for name in preset_names():
        p = load_preset(name)
        gguf = find_packaged_gguf()
        key = answers_key(os.path.basename(gguf), os.path.getsize(gguf), questions,
                          p["calibration_max_new_tokens"], p["calibration_turns"], CALIBRATION_THREADS)
        chats = load_answers(key, questions)
        assert chats is not None, name
        assert len(chats) == len(questions) == 40
        for q, chat in zip(questions, chats):
            assert [m["role"] for m in chat] == ["user", "assistant"]
            assert chat[0]["content"] == q.turns[0]
            assert chat[1]["content"].strip()  # a real answer, never empty


def test_another_key_or_a_missing_file_generates(tmp_path) -> None:
    questions = calibration_questions()
    assert load_answers(_key(max_new_tokens=64), questions) is None
    assert load_answers(_key(threads=4), questions) is None
    assert load_answers(_key(), questions, path=str(tmp_path / "absent.json")) is None
    assert os.path.isfile(ANSWERS_FILE)


def test_plain_progress_logs_the_end_once(caplog) -> None:
    caplog.set_level(logging.INFO, logger="moeserve.progress")
    bar = PlainProgress(total=3, desc="step", unit="x", every_s=0.0)
    for _ in range(3):
        bar.update(1)
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-1].startswith("step: 100% (3/3 x") and lines[-1].endswith("done")
    assert sum("100%" in line for line in lines) == 1
