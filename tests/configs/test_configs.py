"""Config validation names the field and value; flags and env vars derive from the fields."""
from __future__ import annotations

import argparse

import pytest

from configs import CacheConfig, ConfigError, EngineConfig, ServerConfig, add_arguments, from_args
from configs.cache import parse_budget
from configs.base import parse_bytes


@pytest.mark.parametrize("cls,kwargs,field", [
    (EngineConfig, {"device": "tpu"}, "device"),
    (EngineConfig, {"max_batch": 0}, "max_batch"),
    (CacheConfig, {"expert_budget": "150%"}, "expert_budget"),
    (CacheConfig, {"expert_budget": "lots"}, "expert_budget"),
    (CacheConfig, {"policy": "random"}, "policy"),
    (ServerConfig, {"port": 70000}, "port"),
])
def test_invalid_values_name_field_and_value(cls: type, kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        cls(**kwargs)
    assert err.value.field == field and str(list(kwargs.values())[0]) in str(err.value)


def test_precedence_flag_over_env_over_default() -> None:
    p = argparse.ArgumentParser()
    add_arguments(p, ServerConfig)
    env = {"MOESERVE_PORT": "9001", "MOESERVE_HOST": "127.0.0.2"}
    cfg = from_args(ServerConfig, p.parse_args(["--port", "9002"]), env=env)
    assert (cfg.port, cfg.host, cfg.max_queue) == (9002, "127.0.0.2", 64)
    assert from_args(ServerConfig, p.parse_args([]), env={"MOESERVE_API_KEY": ""}).api_key is None


def test_env_values_are_typed_and_checked() -> None:
    assert from_args(CacheConfig, env={"MOESERVE_PREFETCH": "false"}).prefetch == "off"
    assert CacheConfig(prefetch=True).prefetch == "on"
    assert CacheConfig().prefetch_enabled("cpu") and CacheConfig().prefetch_enabled("cuda")
    assert not CacheConfig(prefetch="off").prefetch_enabled("cpu")
    with pytest.raises(ConfigError, match="prefetch"):
        CacheConfig(prefetch="sometimes")
    with pytest.raises(ConfigError, match="max_batch"):
        from_args(EngineConfig, env={"MOESERVE_MAX_BATCH": "many"})


def test_every_field_has_help() -> None:
    p = argparse.ArgumentParser()
    for cls in (EngineConfig, CacheConfig, ServerConfig):
        add_arguments(p, cls)
    helps = [a.help for a in p._actions if a.dest != "help"]
    assert helps and all(h and not h.startswith(" [env") for h in helps)


def test_byte_sizes_and_budgets() -> None:
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("500MB") == 500_000_000
    assert parse_budget("25%", 1000) == 250 and parse_budget("all", 1000) == 1000
    assert parse_budget("1KiB", 10**6) == 1024
