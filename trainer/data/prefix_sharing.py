"""Prompt sharing for preference pairs: prompt, chosen and rejected in one row, the prompt computed once.

Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix Sharing". A pair whose two
sequences are ``prompt + chosen`` and ``prompt + rejected`` is laid out as

    [ shared prefix (s positions) | chosen part | rejected part ]

with position ids ``0..s-1``, then ``s, s+1, ...`` for the chosen part and AGAIN ``s, s+1, ...`` for the
rejected part, and an attention mask in which every position attends causally to the shared prefix and
to earlier positions of its own part, never to the other response. Each response token then sees exactly
the keys, values and rotary positions it sees in its own unshared row, so its log-prob is the same (up to
float reordering); the prompt's s positions are computed once instead of twice. Several pairs are packed
per row, each pair a block that attends only within itself.

Where the shared prefix ends. After the usual shift (inputs ``tokens[:-1]``, labels ``tokens[1:]``) the
input at position j predicts ``tokens[j+1]``. A shared position must have the same input AND the same
label on both sides, and no loss weight (its one log-prob cannot be counted for both sequences), so with
``lcp`` the longest common prefix of the two token lists and ``k`` the index of a side's first response
token, ``s = min(lcp - 1, k_c - 1, k_r - 1)``, kept below each side's length so each part has a position.

Batch keys (rows R, length L): input_ids, labels, loss_mask, position_ids, seq_id (chosen i -> i,
rejected i -> n + i, shared prefix and padding -1: ``segment_sum`` and ``reference.pair_logps`` read it as
for ``pack_pairs``), ``num_sequences``, and the mask's two inputs ``block`` (pair slot in the row, -1 on
padding) and ``branch`` (0 shared, 1 chosen, 2 rejected). :func:`attention_bias` builds the [R, 1, L, L]
additive mask from them on the device, in the model's dtype; transformers passes a 4D mask through as it
is (``masking_utils._preprocess_mask_arguments``) to sdpa and eager attention, which add it to the scores.
"""

from __future__ import annotations

import torch

from trainer.data.packing import pack as first_fit
from trainer.data.preference import pair_scalars

SHARED, CHOSEN, REJECTED = 0, 1, 2


def shared_length(chosen: dict, rejected: dict) -> int:
    """The number of input positions the two sides of a pair can share (see the module docstring)."""
    a, b = chosen["input_ids"], rejected["input_ids"]
    lcp = 0
    while lcp < min(len(a), len(b)) and a[lcp] == b[lcp]:
        lcp += 1

    def first_response(side: dict) -> int:
        mask = side["assistant_mask"]
        return mask.index(1) if 1 in mask else len(mask)

    return max(0, min(lcp - 1, first_response(chosen) - 1, first_response(rejected) - 1, len(a) - 2, len(b) - 2))


def pair_length(pair: dict) -> int:
    """Positions the pair occupies in a prefix-shared row."""
    s = shared_length(pair["chosen"], pair["rejected"])
    return s + (len(pair["chosen"]["input_ids"]) - 1 - s) + (len(pair["rejected"]["input_ids"]) - 1 - s)


def share_pairs(pairs: list[dict], max_length: int, pad_id: int, pack: bool = True) -> dict[str, torch.Tensor]:
    """Lay out n tokenized pairs, prompt shared, in rows of at most ``2 * max_length`` positions.

    ``max_length`` is the one each side was tokenized with (``len(input_ids) - 1 <= max_length``), so a
    pair (at most ``2 * max_length`` positions, fewer by its shared prefix) always fits a row.
    ``pack``: several pairs per row (first-fit decreasing, as ``packing.pack``); false: one pair a row.
    """
    if not pairs:
        raise ValueError("share_pairs needs at least one pair")
    n = len(pairs)
    bins = (first_fit([pair_length(p) for p in pairs], 2 * max_length) if pack else [[i] for i in range(n)])
    shape = (len(bins), max(sum(pair_length(pairs[i]) for i in b) for b in bins))
    batch = {"input_ids": torch.full(shape, pad_id, dtype=torch.long),
             "labels": torch.full(shape, pad_id, dtype=torch.long),
             "loss_mask": torch.zeros(shape, dtype=torch.float32),
             "position_ids": torch.zeros(shape, dtype=torch.long),
             "seq_id": torch.full(shape, -1, dtype=torch.long),
             "block": torch.full(shape, -1, dtype=torch.long),
             "branch": torch.zeros(shape, dtype=torch.long)}
    for r, b in enumerate(bins):
        at = 0
        for slot, i in enumerate(b):
            chosen, rejected = pairs[i]["chosen"], pairs[i]["rejected"]
            s = shared_length(chosen, rejected)
            # (branch, seq_id, tokens, mask, first input index) of each part of this pair's block
            parts = [(SHARED, -1, chosen, 0), (CHOSEN, i, chosen, s), (REJECTED, n + i, rejected, s)]
            for branch, seq, side, start in parts:
                stop = s if branch == SHARED else len(side["input_ids"]) - 1
                width = stop - start
                tokens = torch.tensor(side["input_ids"], dtype=torch.long)
                cols = slice(at, at + width)
                batch["input_ids"][r, cols] = tokens[start:stop]
                batch["labels"][r, cols] = tokens[start + 1:stop + 1]
                if branch != SHARED:
                    batch["loss_mask"][r, cols] = torch.tensor(side["assistant_mask"][start + 1:stop + 1],
                                                               dtype=torch.float32)
                batch["position_ids"][r, cols] = torch.arange(start, stop)
                batch["seq_id"][r, cols] = seq
                batch["block"][r, cols] = slot
                batch["branch"][r, cols] = branch
                at += width
    return {**batch, **pair_scalars(pairs), "num_sequences": torch.tensor(2 * n, dtype=torch.long)}


def allowed(block: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """[R, L, L] bool, True where query q may attend key k: same pair block, k not after q in the row,
    and k in the shared prefix or in q's own part. A padding position (block -1) attends only to itself,
    so no softmax row is empty (an all-masked row would be NaN) and padding reaches no real token."""
    same_block = block[:, :, None] == block[:, None, :]
    causal = torch.ones(block.shape[1], block.shape[1], dtype=torch.bool, device=block.device).tril()
    visible = (branch[:, None, :] == SHARED) | (branch[:, :, None] == branch[:, None, :])
    real = (block >= 0)[:, :, None]
    eye = torch.eye(block.shape[1], dtype=torch.bool, device=block.device)
    return torch.where(real, same_block & causal & visible, eye)


def attention_bias(block: torch.Tensor, branch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive [R, 1, L, L] mask transformers' eager and sdpa attention take: 0 where
    :func:`allowed`, the dtype's most negative finite value elsewhere (finite: -inf * 0 in a kernel is NaN)."""
    zero = torch.zeros((), dtype=dtype, device=block.device)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=block.device)
    return torch.where(allowed(block, branch), zero, blocked)[:, None]
