"""Multi-attribute reward-model regression (HelpSteer2 style) and the scalar reward it produces.

Pure functions of tensors: no process groups, no device moves, no ``.item()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# The HelpSteer2 attribute names (Wang et al. 2024), in the order the reward head's outputs use.
HELPSTEER2_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")


def reward_regression_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean squared error over every (sample, attribute) entry, a scalar.

    ``sum(mask * (pred - target)**2) / sum(mask)`` with pred, target, mask all [B, A]. This is the
    regression objective of the multi-attribute reward models (SteerLM / HelpSteer2, Wang et al. 2024;
    Nemotron-4 340B Reward, NVIDIA 2024): one linear output per attribute, trained by MSE on the
    annotated 0-4 scores. ``mask`` is 1 where an attribute was annotated (it may also hold fractional
    weights); the mean is over annotated entries, not over B*A, so a missing attribute neither counts
    as a zero target nor dilutes the others.

    Masked targets are replaced by 0 before the subtraction, so an absent label stored as NaN changes
    neither the value nor the gradient (``0 * NaN`` would be NaN). An all-zero mask gives 0 rather than
    0/0 = NaN; the denominator is swapped for 1 there instead of dropping the expression, so the result
    still depends on ``pred`` and backward yields zero gradients instead of failing.
    """
    weights = mask.to(pred.dtype)
    annotated = weights != 0
    target = torch.where(annotated, target.to(pred.dtype), torch.zeros_like(pred))
    sq_err = weights * (pred - target) ** 2
    total = weights.sum()
    denom = torch.where(total > 0, total, torch.ones_like(total))
    return sq_err.sum() / denom


def combine_attributes(scores: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """One scalar reward per sample from attribute scores: ``sum_i weights[i] * scores[..., i]``.

    scores [..., A] -> [...]. Nemotron-4 340B Reward and HelpSteer2 (Wang et al. 2024) rank responses by
    a weighted sum of the predicted attributes (helpfulness alone, or helpfulness mixed with the others);
    ``weights`` follows the order of the last axis (:data:`HELPSTEER2_ATTRIBUTES`).
    """
    if scores.shape[-1] != len(weights):
        raise ValueError(f"got {len(weights)} weights for {scores.shape[-1]} attributes (last axis of scores)")
    # Built with the scores' dtype and device so the weights follow the data; the scores are not moved.
    w = torch.as_tensor(list(weights), dtype=scores.dtype, device=scores.device)
    return (scores * w).sum(-1)
