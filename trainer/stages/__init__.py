"""One loop per algorithm; ``get_stage(stage.type)`` returns its ``run(cfg, topology) -> result``.
The stage types themselves are listed once, in trainer/stages/registry.py."""

from trainer.stages.registry import STAGE_TYPES, get_stage, stage_type

__all__ = ["STAGE_TYPES", "get_stage", "stage_type"]
