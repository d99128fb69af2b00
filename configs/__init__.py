"""Frozen, validated configuration dataclasses. Standard library only."""
from configs.base import ConfigError, add_arguments, from_args, parse_bytes
from configs.cache import CacheConfig
from configs.engine import EngineConfig
from configs.server import ServerConfig

__all__ = ["ConfigError", "add_arguments", "from_args", "parse_bytes",
           "CacheConfig", "EngineConfig", "ServerConfig"]
