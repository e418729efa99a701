"""Loss functions: pure functions over logits / log-probs (contracts in DESIGN.md)."""

from trainer.losses.preference import (
    RPO_DISTANCES,
    dpo_loss,
    implicit_rewards,
    ipo_loss,
    preference_loss,
    preference_metrics,
    rpo_loss,
)
from trainer.losses.reward import HELPSTEER2_ATTRIBUTES, combine_attributes, reward_regression_loss
from trainer.losses.sft import sequence_logps, sft_loss, sft_loss_from_logps, token_logps

__all__ = [
    "HELPSTEER2_ATTRIBUTES", "RPO_DISTANCES", "combine_attributes", "dpo_loss", "implicit_rewards", "ipo_loss",
    "preference_loss", "preference_metrics", "reward_regression_loss", "rpo_loss", "sequence_logps", "sft_loss",
    "sft_loss_from_logps", "token_logps",
]
