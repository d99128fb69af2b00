"""The MT-Bench questions shipped in convert/data: calibration (ids 81-120) and held-out (121-160) splits."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

DATA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mt_bench_questions.jsonl")
CALIBRATION_IDS = range(81, 121)
HELDOUT_IDS = range(121, 161)


@dataclass(frozen=True)
class Question:
    question_id: int
    category: str
    turns: tuple[str, ...]


def load_questions(path: str = DATA_FILE) -> list[Question]:
    """All questions in file order; a malformed line raises ValueError naming file and line."""
    out: list[Question] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                out.append(Question(int(d["question_id"]), str(d["category"]),
                                    tuple(str(t) for t in d["turns"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: malformed MT-Bench question ({e})") from None
    return out


def calibration_questions(path: str = DATA_FILE) -> list[Question]:
    """Ids 81-120, sorted by id: the only text the default model's routers are fitted on."""
    qs = [q for q in load_questions(path) if q.question_id in CALIBRATION_IDS]
    return sorted(qs, key=lambda q: q.question_id)


def heldout_texts(path: str = DATA_FILE) -> list[str]:
    """Every turn of ids 121-160 as plain text, one sequence per turn (never calibration text)."""
    qs = sorted((q for q in load_questions(path) if q.question_id in HELDOUT_IDS),
                key=lambda q: q.question_id)
    return [t for q in qs for t in q.turns]
