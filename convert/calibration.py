"""The default model's calibration conversations, shipped as package data.

The routers are fitted on the dense model's greedy answers to MT-Bench ids 81-120. Generating them
took most of a first start (~100 s of ~4 min on 2 cores), yet they are deterministic (fixed batches,
fixed thread count, greedy), so they ship in convert/data/calibration_answers.json, keyed by
everything that determines them. A build whose key matches uses the file and yields byte-identical
weights (same sha256 as a build that generates them); any other key generates them as before.

``python -m convert.calibration --check`` regenerates the answers and compares them with the file;
``--write`` rewrites it (after a change of the dense model, the questions or the recipe).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from typing import Any, Optional

from convert.mtbench import DATA_FILE, Question

log = logging.getLogger(__name__)
ANSWERS_FILE = os.path.join(os.path.dirname(DATA_FILE), "calibration_answers.json")
Chat = list[dict[str, str]]
# what generate_calibration_chats is called with in the build (convert/default_model.py)
BATCH_SIZE = 40


def answers_key(source: str, source_bytes: int, questions: list[Question], max_new_tokens: int,
                turns: int, threads: int) -> dict[str, Any]:
    """Everything the greedy answers depend on: the dense model's GGUF, the questions (hashed),
    the generation length, turns, batch size and compute threads."""
    text = json.dumps([[q.question_id, list(q.turns)] for q in questions], ensure_ascii=False)
    return {"source": source, "source_bytes": source_bytes,
            "questions_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "max_new_tokens": max_new_tokens, "turns": turns, "batch_size": BATCH_SIZE,
            "threads": threads}


def load_answers(key: dict[str, Any], questions: list[Question],
                 path: str = ANSWERS_FILE) -> Optional[list[Chat]]:
    """The shipped conversations for ``key``, or None when the file is missing or made for
    another key (the build then generates them)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if data.get("key") != key:
        return None
    answers: dict[str, list[str]] = data["answers"]
    chats: list[Chat] = []
    for q in questions:
        chat: Chat = []
        for question, answer in zip(q.turns, answers[str(q.question_id)]):
            chat += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        chats.append(chat)
    return chats


def save_answers(key: dict[str, Any], questions: list[Question], chats: list[Chat],
                 path: str = ANSWERS_FILE) -> None:
    answers = {str(q.question_id): [m["content"] for m in c if m["role"] == "assistant"]
               for q, c in zip(questions, chats)}
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"note": "greedy answers of SmolLM2-135M-Instruct (fp32, CPU) to MT-Bench "
                   "ids 81-120; written by python -m convert.calibration --write",
                   "key": key, "answers": answers}, f, indent=1, ensure_ascii=False)
        f.write("\n")


def generate(preset: str, home: Optional[str], progress: bool) -> tuple[dict[str, Any],
                                                                         list[Question], list[Chat]]:
    """Generate the answers exactly as a build without the shipped file does."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from convert.default_model import CALIBRATION_THREADS, ensure_dense_model, load_preset
    from convert.gguf_import import find_packaged_gguf
    from convert.mtbench import calibration_questions
    from convert.upcycle import generate_calibration_chats

    params = load_preset(preset)
    dense_dir = ensure_dense_model(home)
    torch.set_num_threads(CALIBRATION_THREADS)
    tok = AutoTokenizer.from_pretrained(dense_dir)
    model = LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    questions = calibration_questions()
    gguf = find_packaged_gguf()
    key = answers_key(os.path.basename(gguf), os.path.getsize(gguf), questions,
                      params["calibration_max_new_tokens"], params["calibration_turns"],
                      CALIBRATION_THREADS)
    chats = generate_calibration_chats(model, tok, questions, params["calibration_max_new_tokens"],
                                       turns=params["calibration_turns"], batch_size=BATCH_SIZE,
                                       progress=progress)
    return key, questions, chats


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert.calibration", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="regenerate and compare with the file")
    mode.add_argument("--write", action="store_true", help="regenerate and rewrite the file")
    p.add_argument("--preset", default="smollm2-moe-8x")
    p.add_argument("--path", default=ANSWERS_FILE)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    key, questions, chats = generate(args.preset, None, progress=True)
    if args.write:
        save_answers(key, questions, chats, args.path)
        log.info("wrote %s", args.path)
        return 0
    shipped = load_answers(key, questions, args.path)
    if shipped == chats:
        log.info("%s matches the regenerated answers", args.path)
        return 0
    log.error("%s differs from the regenerated answers (or has another key)", args.path)
    return 1


if __name__ == "__main__":
    sys.exit(main())
