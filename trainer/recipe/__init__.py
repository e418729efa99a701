"""Multi-stage recipes: plan (stage graph), data (sources and mixes), runner, per-stage evaluation."""

from trainer.recipe.plan import PlannedStage, plan
from trainer.recipe.runner import run_recipe

__all__ = ["PlannedStage", "plan", "run_recipe"]
