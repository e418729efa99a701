"""Loss functions: pure functions over logits / log-probs (contracts in DESIGN.md)."""

from trainer.losses.sft import sequence_logps, sft_loss, sft_loss_from_logps, token_logps

__all__ = ["sequence_logps", "sft_loss", "sft_loss_from_logps", "token_logps"]
