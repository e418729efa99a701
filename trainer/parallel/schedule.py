"""Learning-rate schedules as multipliers of the base LR, a pure function of the optimizer step."""

from __future__ import annotations

import math


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Linear warmup from lr/warmup to lr over ``warmup_steps``, then constant or cosine to lr*min_lr_ratio.

    ``step`` counts optimizer steps already taken, so step 0 is the LR of the first update.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
