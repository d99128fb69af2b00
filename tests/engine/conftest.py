"""Shared fixtures for the engine tests."""
from __future__ import annotations

import pytest
import torch

# --- model-family parity fixtures (tests/engine/test_families.py) ----------------------------
from tests.engine.tiny_families import FamilyCheckpoint, make_family_checkpoint


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> FamilyCheckpoint:
    """family_checkpoint(name, dtype) -> directory of that tiny checkpoint, written once a session."""
    made: dict[tuple[str, torch.dtype], str] = {}

    def get(name: str, dtype: torch.dtype = torch.float32) -> str:
        if (name, dtype) not in made:
            path = str(tmp_path_factory.mktemp(f"{name}-{str(dtype).split('.')[-1]}"))
            made[(name, dtype)] = make_family_checkpoint(name, path, dtype)
        return made[(name, dtype)]
    return get
# --- end of model-family parity fixtures -----------------------------------------------------
