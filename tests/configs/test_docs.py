"""The README's options table is the one generated from the config dataclasses."""
import os
import re

from configs.docs import options_table

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def test_readme_options_table_is_current() -> None:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"<!-- options:begin[^>]*-->\n(.*?)\n<!-- options:end -->", text, re.S)
    assert m, "README.md lacks the generated options block"
    assert m.group(1) == options_table(), "README options table is stale: run python -m configs.docs"


def test_every_field_has_help_and_env_var() -> None:
    table = options_table()
    rows = [r for r in table.splitlines()[2:] if not r.startswith("| **")]
    assert rows and all(r.split("|")[4].strip() for r in rows)
    assert all("`MOESERVE_" in r for r in rows)
