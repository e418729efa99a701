"""Structured config schema, its registration in Hydra's ConfigStore, and start-up validation."""

from trainer.config.schema import Config, register_configs
from trainer.config.validate import ConfigError, data_parallel_size, validate

__all__ = ["Config", "ConfigError", "data_parallel_size", "register_configs", "validate"]
