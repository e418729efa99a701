"""One loop per algorithm. ``STAGES`` maps ``stage.type`` to its ``run(cfg, topology)``."""

from __future__ import annotations


def get_stage(stage_type: str):
    if stage_type == "sft":
        from trainer.stages import sft

        return sft.run
    raise ValueError(f"stage.type: unknown stage {stage_type!r}")
