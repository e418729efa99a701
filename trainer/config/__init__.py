"""Structured config schema, its registration in Hydra's ConfigStore, and start-up validation."""

import os
from pathlib import Path

from trainer.config.schema import Config, register_configs
from trainer.config.validate import ConfigError, data_parallel_size, validate

# The Hydra config tree (configs/ beside the package in a source checkout).
CONFIG_DIR = os.environ.get("STAGECRAFT_CONFIG_DIR", str(Path(__file__).resolve().parents[2] / "configs"))

__all__ = ["CONFIG_DIR", "Config", "ConfigError", "data_parallel_size", "register_configs",
           "validate"]
