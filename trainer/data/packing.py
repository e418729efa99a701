"""Sequence packing: several sequences in one row, each attending only to itself.

Why: preference and SFT sequences vary a lot in length, and right padding to the longest wastes the
rest of every row. Packing concatenates sequences along a row; what keeps them independent is the
position ids, which restart at 0 for every sequence, with NO attention_mask passed.

How transformers (5.x) turns that into a block-diagonal causal mask: `masking_utils.create_causal_mask`
calls `find_packed_sequence_indices(position_ids)` when `attention_mask is None` and
`past_key_values is None`; every place where the position does not go up by exactly 1 starts a new
sequence, and the causal mask is AND-ed with "same sequence" (positions are remapped per sequence).
That mask is built for "sdpa", "eager" and "flex_attention". "flash_attention_2/3" instead reads
`position_ids` directly (`_is_packed_sequence`), but only when the batch dimension is 1, so packed
rows must be flattened into one row for it. Two ways to silently lose the separation, tested in
tests/test_preference_data.py: passing an attention_mask (even all ones), and a KV cache: with
`config.use_cache=True` (the Llama default) the model creates a DynamicCache and detection is skipped,
so call the model with `use_cache=False` (build_model sets `config.use_cache=False`).

Each row's padding gets positions 0, 1, ... of its own, so it forms a separate trailing segment that
no real token attends to; its labels are `pad_id`, its loss_mask 0 and its seq_id -1.
"""

from __future__ import annotations

import torch

from trainer.data.preference import pair_scalars


def pack(lengths: list[int], max_length: int) -> list[list[int]]:
    """Bins of sequence indices, each with total length <= max_length; first-fit decreasing.

    Sequences are placed longest first (ties by index, so the result is deterministic) into the first
    bin with room, a new bin when none has. Each bin lists its indices in ascending order. First-fit
    decreasing needs at most about 11/9 of the optimal number of rows, fewer than first-fit in input
    order on mixed lengths (which the order of a shuffled batch gives). `lengths` are the positions
    each sequence occupies in a row: for `collate_packed` that is `len(input_ids) - 1` (the shift
    drops one token).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    for i, length in enumerate(lengths):
        if length < 1:
            raise ValueError(f"sequence {i} has length {length}; lengths must be positive")
        if length > max_length:
            raise ValueError(f"sequence {i} has length {length} > max_length={max_length}; it fits no row")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_length - lengths[i])
    return [sorted(b) for b in bins]


def collate_packed(sequences: list[dict], bins: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate each bin's sequences into one row, right-padded to the longest row L.

    Per sequence exactly `chat.collate`'s shift: inputs `tokens[:-1]`, labels `tokens[1:]`, loss_mask
    `assistant_mask[1:]`. Returns [R, L] tensors input_ids, labels, loss_mask (float), position_ids
    (restarting at 0 for each sequence and for the padding) and seq_id (source index, -1 on padding).
    There is deliberately no attention_mask: passing one disables transformers' packed detection.
    """
    if not bins:
        raise ValueError("collate_packed needs at least one bin")
    placed = sorted(i for b in bins for i in b)
    if placed != list(range(len(sequences))):
        raise ValueError(f"bins must hold every sequence index 0..{len(sequences) - 1} exactly once")
    for i, seq in enumerate(sequences):
        if len(seq["input_ids"]) < 2:
            raise ValueError(f"sequence {i} has fewer than 2 tokens, so no (input, label) pair")
        if len(seq["assistant_mask"]) != len(seq["input_ids"]):
            raise ValueError(f"sequence {i}: input_ids and assistant_mask lengths differ")
    row_lengths = [sum(len(sequences[i]["input_ids"]) - 1 for i in b) for b in bins]
    shape = (len(bins), max(row_lengths))
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, pad_id, dtype=torch.long)
    loss_mask = torch.zeros(shape, dtype=torch.float32)
    position_ids = torch.zeros(shape, dtype=torch.long)
    seq_id = torch.full(shape, -1, dtype=torch.long)
    for r, b in enumerate(bins):
        at = 0
        for i in b:
            tokens = torch.tensor(sequences[i]["input_ids"], dtype=torch.long)
            n = len(tokens) - 1
            input_ids[r, at:at + n] = tokens[:-1]
            labels[r, at:at + n] = tokens[1:]
            loss_mask[r, at:at + n] = torch.tensor(sequences[i]["assistant_mask"][1:], dtype=torch.float32)
            position_ids[r, at:at + n] = torch.arange(n)
            seq_id[r, at:at + n] = i
            at += n
        position_ids[r, at:] = torch.arange(shape[1] - at)
    return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask,
            "position_ids": position_ids, "seq_id": seq_id}


def segment_sum(values: torch.Tensor, seq_id: torch.Tensor, num_sequences: int | torch.Tensor) -> torch.Tensor:
    """Per-sequence sums [num_sequences] of packed [R, L] values; positions with seq_id -1 are ignored.

    Differentiable in `values` (index_add). With values = token_logps * loss_mask it gives each
    sequence's response log-probability, the packed equivalent of `(token_logps * loss_mask).sum(-1)`.
    `torch.where`, not a product with the mask, so a non-finite value on padding cannot leak in.
    """
    valid = seq_id >= 0
    flat = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device)).reshape(-1)
    out = torch.zeros(int(num_sequences), dtype=values.dtype, device=values.device)
    return out.index_add(0, seq_id.clamp(min=0).reshape(-1), flat)


def pack_pairs(pairs: list[dict], max_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pack the 2n sequences of n tokenized pairs (chosen i -> sequence i, rejected i -> n + i).

    Rows are at most `max_length` positions, so pairs tokenized with the same `max_length` always fit.
    Returns `collate_packed`'s keys, `pair_scalars`' [n] tensors (rewards, reference logps) and
    `num_sequences` (0-dim long tensor, 2n): `segment_sum(v, batch["seq_id"], 2n)[:n]` is the chosen
    side, `[n:]` the rejected side, in the row order of `collate_pairs`.
    """
    if not pairs:
        raise ValueError("pack_pairs needs at least one pair")
    sequences = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    bins = pack([len(s["input_ids"]) - 1 for s in sequences], max_length)
    batch = collate_packed(sequences, bins, pad_id)
    return {**batch, **pair_scalars(pairs), "num_sequences": torch.tensor(len(sequences), dtype=torch.long)}


def pack_examples(examples: list[dict], max_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pack tokenized chat examples (SFT) into rows of at most ``max_length`` positions; adds
    ``num_sequences`` so per-sequence sums are ``segment_sum(v, batch["seq_id"], num_sequences)``."""
    bins = pack([len(e["input_ids"]) - 1 for e in examples], max_length)
    return {**collate_packed(examples, bins, pad_id), "num_sequences": torch.tensor(len(examples), dtype=torch.long)}
