"""Model construction (no parallelism: strategies apply it from outside)."""

from trainer.models.hf import build_model, count_parameters
from trainer.models.neftune import NEFTune
from trainer.models.reward import RewardModel, build_reward_model, load_reward_model

__all__ = ["NEFTune", "RewardModel", "build_model", "build_reward_model", "count_parameters", "load_reward_model"]
