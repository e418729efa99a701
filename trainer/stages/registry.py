"""Every stage type in one place: its config schema, its loop, what it consumes and what it produces.

The schema registration (Hydra's ConfigStore), start-up validation, the recipe planner, the synthetic
data a stage falls back to and the CLI all read this table; adding a stage type is one entry here
plus its module under ``trainer/stages/``.

Artifacts are what a stage hands to later stages of a recipe (trainer/recipe/plan.py):
- ``policy``: an HF CausalLM directory (``hf/``) a later stage can start from or use as reference;
- ``reward_model``: an HF reward-model directory (backbone + head + reward_config.json) that an
  annotate stage scores with;
- ``dataset``: JSONL records in the format of the stage's input (annotated preference pairs, SFT data
  a curation tool kept).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from omegaconf import DictConfig

from trainer.config.schema import (AnnotateStageConfig, BenchmarkStageConfig, CurateStageConfig,
                                   PreferenceStageConfig, RewardStageConfig, StageConfig)

POLICY, REWARD_MODEL, DATASET = "policy", "reward_model", "dataset"


def _check_preference(cfg: DictConfig) -> None:
    from trainer.config.validate import choice, positive

    choice(cfg, "stage.loss", ("dpo", "ipo", "rpo"))
    choice(cfg, "stage.rpo_distance", ("bwd_kl", "fwd_kl", "sq"))
    choice(cfg, "stage.reference_mode", ("cached", "online"))
    for key in ("stage.beta", "stage.eta"):
        positive(cfg, key)
    for key in ("stage.preference_weight", "stage.sft_weight"):
        positive(cfg, key, allow_zero=True)


def _check_reward(cfg: DictConfig) -> None:
    from trainer.config.validate import ConfigError

    if len(cfg.stage.attributes) == 0:
        raise ConfigError("stage.attributes: name at least one attribute")
    if len(cfg.stage.attribute_weights) != len(cfg.stage.attributes):
        raise ConfigError(f"stage.attribute_weights: {len(cfg.stage.attribute_weights)} weights for "
                          f"{len(cfg.stage.attributes)} stage.attributes")


def _check_annotate(cfg: DictConfig) -> None:
    from trainer.config.validate import ConfigError

    if cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp > 1:
        raise ConfigError("parallel.tp: annotate runs a whole reward-model replica per rank; use tp=pp=cp=1")
    if not cfg.stage.reward_model:
        raise ConfigError("stage.reward_model: the annotate step needs a reward model directory "
                          "(a reward stage's hf/ export; in a recipe, the name of a reward stage)")


def _check_curate(cfg: DictConfig) -> None:
    from trainer.config.validate import ConfigError
    from trainer.curation import TOOLS

    if cfg.stage.tool not in TOOLS or cfg.stage.tool == "stats":
        raise ConfigError(f"stage.tool: must be one of {', '.join(t for t in TOOLS if t != 'stats')} (a tool "
                          f"that keeps records); got {cfg.stage.tool!r}")


def _check_benchmark(cfg: DictConfig) -> None:
    from trainer.config.validate import positive

    for key in ("stage.seq_length", "stage.vocab_size", "stage.timed_steps", "stage.peak_tflops"):
        positive(cfg, key)
    positive(cfg, "stage.untimed_steps", allow_zero=True)


@dataclass(frozen=True)
class StageType:
    name: str
    schema: type  # the dataclass its config is merged onto
    module: str  # trainer.stages.<module>.run(cfg, topology) -> result
    consumes: str | None  # record format of its data: sft | preference | reward (None: any, or none)
    produces: str | None  # the artifact it hands on (None: nothing a later stage can use)
    check: Callable[[DictConfig], None] | None = None  # its own config rules; errors name the stage.* key
    optimizer_steps: bool = True  # trains with global batches (the batch arithmetic applies)


STAGE_TYPES: dict[str, StageType] = {t.name: t for t in (
    StageType("sft", StageConfig, "sft", consumes="sft", produces=POLICY),
    StageType("preference", PreferenceStageConfig, "preference", consumes="preference", produces=POLICY,
              check=_check_preference),
    StageType("reward", RewardStageConfig, "reward", consumes="reward", produces=REWARD_MODEL,
              check=_check_reward),
    StageType("annotate", AnnotateStageConfig, "annotate", consumes="preference", produces=DATASET,
              check=_check_annotate, optimizer_steps=False),
    StageType("curate", CurateStageConfig, "curate", consumes=None, produces=DATASET, check=_check_curate,
              optimizer_steps=False),
    StageType("benchmark", BenchmarkStageConfig, "benchmark", consumes=None, produces=None,
              check=_check_benchmark),
)}


def stage_type(name: str, key: str = "stage.type") -> StageType:
    if name not in STAGE_TYPES:
        from trainer.config.validate import ConfigError

        raise ConfigError(f"{key}: unknown stage type {name!r}; known: {', '.join(STAGE_TYPES)}")
    return STAGE_TYPES[name]


def get_stage(name: str):
    """The ``run(cfg, topology) -> result`` of stage type ``name`` (its module imported on demand:
    each pulls in its own dependencies)."""
    return importlib.import_module(f"trainer.stages.{stage_type(name).module}").run
