"""Presets of the built-in default model and the `build-default` flags. Standard library only,
so the HTTP process can parse its command line without importing torch."""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")
DEFAULT_PRESET = "smollm2-moe-8x"


def preset_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".json"))


def load_preset(name: str) -> dict[str, Any]:
    """The preset's build parameters; ValueError naming the choices for an unknown name."""
    path = os.path.join(PRESET_DIR, f"{name}.json")
    if not os.path.isfile(path):
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(preset_names())}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=preset_names(),
                        help=f"model preset (default {DEFAULT_PRESET})")
    parser.add_argument("--experts", type=int, default=None, metavar="E",
                        help="experts per layer (overrides the preset)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K",
                        help="experts routed per token (overrides the preset)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output directory (default: $MOESERVE_HOME/models/<preset>, "
                             "MOESERVE_HOME defaults to ~/.cache/moeserve)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
