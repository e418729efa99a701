"""Model construction (no parallelism: strategies apply it from outside)."""

from trainer.models.hf import build_model, count_parameters
from trainer.models.neftune import NEFTune

__all__ = ["NEFTune", "build_model", "count_parameters"]
