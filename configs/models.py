"""How a model is named: the served name of a checkpoint directory, and the shape of a Hugging
Face repo id (``org/name``) that --model may give instead of a directory. Standard library only."""
from __future__ import annotations

import os
import re

REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}")


def model_name(model_dir: str) -> str:
    """The checkpoint's name: its directory's, or for a snapshot in the Hugging Face cache
    (``.../models--org--name/snapshots/<revision>``) the repo's name."""
    path = os.path.normpath(model_dir)
    parent, grand = os.path.basename(os.path.dirname(path)), os.path.basename(os.path.dirname(os.path.dirname(path)))
    if parent == "snapshots" and grand.startswith("models--"):
        return grand.split("--")[-1]
    return os.path.basename(path)
