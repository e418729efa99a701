"""One loop per algorithm; ``get_stage(stage.type)`` returns its ``run(cfg, topology) -> result``."""

from __future__ import annotations

import importlib

# stage.type -> module under trainer.stages (imported on demand: each pulls in its own dependencies).
STAGE_MODULES = {"sft": "sft", "preference": "preference", "reward": "reward", "annotate": "annotate",
                 "benchmark": "benchmark"}


def get_stage(stage_type: str):
    if stage_type not in STAGE_MODULES:
        raise ValueError(f"stage.type: unknown stage {stage_type!r}; known: {', '.join(STAGE_MODULES)}")
    return importlib.import_module(f"trainer.stages.{STAGE_MODULES[stage_type]}").run
