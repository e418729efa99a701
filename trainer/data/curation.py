"""Data-curation scores used to filter training data inside recipes."""

from __future__ import annotations


def length_score(required: float, produced: float) -> float:
    """LongWriter output-length score S_l in [0, 100] (Bai et al. 2024, "LongWriter", Eq. 1).

    With l the required and l' the produced length (words for English, characters for Chinese):

        l' > l:  S_l = 100 * max(0, 1 - (l'/l - 1) / 3)
        l' <= l: S_l = 100 * max(0, 1 - (l/l' - 1) / 2)

    Both branches give 100 at l' = l. The score is asymmetric on purpose: it reaches 0 at four times
    the required length but already at one third of it, because writing too little fails a length
    request more than writing too much. So 2x gives 66.7, 0.5x gives 50, 1.5x gives 83.3.

    ``required`` must be positive. ``produced == 0`` is the l' -> 0 limit of the second branch, 0
    (evaluated directly it would divide by zero); a negative ``produced`` is a ValueError.
    """
    if required <= 0:
        raise ValueError(f"required length must be positive, got {required}")
    if produced < 0:
        raise ValueError(f"produced length must be non-negative, got {produced}")
    if produced == 0:
        return 0.0
    if produced > required:
        return 100.0 * max(0.0, 1.0 - (produced / required - 1.0) / 3.0)
    return 100.0 * max(0.0, 1.0 - (required / produced - 1.0) / 2.0)
