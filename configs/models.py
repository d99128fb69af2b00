"""How a model is named: the served name of a checkpoint directory, the file-safe name of its
conversions, and the shape of a Hugging Face repo id (``org/name``) that --model may give instead
of a directory. Standard library only."""
from __future__ import annotations

import json
import os
import re
from typing import Optional

REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}")


def _snapshot(model_dir: str) -> Optional[tuple[str, str]]:
    """(repo id, revision) of a snapshot in the Hugging Face cache
    (``.../models--org--name/snapshots/<revision>``), else None."""
    path = os.path.normpath(model_dir)
    revision, parent = os.path.basename(path), os.path.dirname(path)
    repo = os.path.basename(os.path.dirname(parent))
    if os.path.basename(parent) != "snapshots" or not repo.startswith("models--"):
        return None
    return repo[len("models--"):].replace("--", "/", 1), revision


SERVED_NAME_KEY = "moeserve_served_name"     # config.json of a conversion: the source's own name


def model_name(model_dir: str) -> str:
    """The served name: a cache snapshot's repo id (``org/name``, as the user asks for it), the
    name a conversion recorded (a GGUF's file name, an Ollama model's name:tag), else the
    directory's name."""
    snap = _snapshot(model_dir)
    if snap:
        return snap[0]
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            recorded = json.load(f).get(SERVED_NAME_KEY)
    except (OSError, ValueError, AttributeError):
        recorded = None
    return recorded if isinstance(recorded, str) and recorded else os.path.basename(os.path.normpath(model_dir))


def storage_name(model_dir: str) -> str:
    """A file name for the checkpoint's conversions, distinct per source: ``org--name-<revision>``
    for a cache snapshot (two orgs' repos of one name, or two revisions, never share one)."""
    snap = _snapshot(model_dir)
    return f"{snap[0].replace('/', '--')}-{snap[1][:8]}" if snap else os.path.basename(os.path.normpath(model_dir))
