"""Shared machinery: CLI flags and env vars derived from dataclass fields.

A field's metadata carries its help text (``help``), optional ``choices`` and an
optional ``flag`` override. The flag is ``--field-name``; the env var is
``MOESERVE_FIELD_NAME``. Precedence: CLI flag > env var > default.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import typing
from typing import Any, TypeVar

T = TypeVar("T")
ENV_PREFIX = "MOESERVE_"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""

    def __init__(self, field: str, value: Any, why: str) -> None:
        super().__init__(f"invalid {field}={value!r}: {why}")
        self.field = field
        self.value = value


def field_default(field: dataclasses.Field) -> Any:
    """The field's default value (from ``default`` or ``default_factory``); None without one."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag", "--" + field.name.replace("_", "-"))


def env_name(field: dataclasses.Field) -> str:
    return ENV_PREFIX + field.name.upper()


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2,
          "gib": 1024**3, "tib": 1024**4}


def parse_bytes(text: str, field: str = "size") -> int:
    """'2GiB' -> 2147483648, '500MB' -> 500000000, '1234' -> 1234."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(field, text, "expected a byte size such as 2GiB, 512MB or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _base_type(tp: Any) -> Any:
    """Optional[X] -> X; bool/int/float/str/tuple pass through."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        return _base_type(args[0])
    return tp


def _convert(cls: type, field: dataclasses.Field, raw: str) -> Any:
    hints = typing.get_type_hints(cls)
    tp = _base_type(hints[field.name])
    if raw is None:
        return None
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        low = str(raw).strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(field.name, raw, "expected a boolean (true/false)")
    if typing.get_origin(tp) is tuple:
        items = raw if isinstance(raw, (list, tuple)) else [s for s in str(raw).split(",") if s]
        return tuple(str(s).strip() for s in items)
    try:
        return tp(raw)
    except (TypeError, ValueError):
        raise ConfigError(field.name, raw, f"expected {getattr(tp, '__name__', tp)}") from None


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of dataclass ``cls`` (help text, env var and default shown)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        tp = _base_type(hints[f.name])
        default = field_default(f)
        # argparse %-formats help strings: a literal '%' (as in '25%') must be doubled
        help_text = (f"{f.metadata.get('help', '')} [env {env_name(f)}; default {default!r}]"
                     .replace('%', '%%'))
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is tuple:
            kwargs["nargs"] = "*"
        else:
            kwargs["metavar"] = f.metadata.get("metavar", f.name.upper())
        group.add_argument(flag_name(f), **kwargs)


def from_args(cls: type[T], args: argparse.Namespace | None = None,
              env: typing.Mapping[str, str] | None = None, **overrides: Any) -> T:
    """Build ``cls`` from CLI args, then env vars, then defaults; validation runs in __post_init__."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif args is not None and hasattr(args, f.name):
            values[f.name] = _convert(cls, f, getattr(args, f.name))
        elif env_name(f) in env:
            values[f.name] = _convert(cls, f, env[env_name(f)])
    return cls(**values)
