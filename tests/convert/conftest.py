"""Fixtures of the conversion tests: the engine tests' family checkpoints, the SmolLM2 tokenizer
metadata the tiny GGUFs carry, and tiny GGUFs written once per module."""
from __future__ import annotations

from typing import Any, Callable

import pytest

from tests.convert.gguf_cases import FAMILIES, OVERRIDES
from tests.convert.gguf_writer import smollm2_tokenizer, write_gguf
from tests.engine.conftest import family_checkpoint  # noqa: F401
from tests.engine.tiny_families import make_family_checkpoint


@pytest.fixture(scope="module")
def tokenizer() -> dict[str, Any]:
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tokenizer: dict[str, Any]) -> Callable[..., tuple[str, str]]:
    """tiny(family, qtype, expert_qtype) -> (HF checkpoint dir, GGUF path), written once."""
    made: dict[tuple[str, str, Any], tuple[str, str]] = {}

    def get(name: str, qtype: str = "F32", expert_qtype: Any = None) -> tuple[str, str]:
        key = (name, qtype, expert_qtype)
        if key not in made:
            base = tmp_path_factory.mktemp(f"{name}-{qtype}-{expert_qtype}")
            hf = make_family_checkpoint(name, str(base / "hf"), overrides={**OVERRIDES, **FAMILIES[name]})
            made[key] = (hf, write_gguf(hf, str(base / f"{name}.gguf"), tokenizer, qtype, expert_qtype))
        return made[key]
    return get
