"""The README's options table, generated from the config dataclasses (so it cannot drift).

    python -m configs.docs        # prints the markdown table
"""
from __future__ import annotations

import dataclasses

from configs.base import env_name, field_default, flag_name
from configs.cache import CacheConfig
from configs.engine import EngineConfig
from configs.server import ServerConfig

SECTIONS = (("server", ServerConfig), ("engine", EngineConfig), ("expert cache", CacheConfig))


def _default(f: dataclasses.Field) -> str:
    value = field_default(f)
    if value is None or value == "" or value == ():
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def options_table() -> str:
    rows = ["| flag | env var | default | what it does |", "|---|---|---|---|"]
    for section, cls in SECTIONS:
        rows.append(f"| **{section}** | | | |")
        for f in dataclasses.fields(cls):
            help_ = " ".join(str(f.metadata.get("help", "")).split()).replace("|", "\\|")
            choices = f.metadata.get("choices")
            if choices:
                help_ += " (" + ", ".join(map(str, choices)) + ")"
            rows.append(f"| `{flag_name(f)}` | `{env_name(f)}` | `{_default(f)}` | {help_} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(options_table())
