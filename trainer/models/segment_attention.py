"""Attention per segment for packed and prompt-shared rows: causal SDPA calls instead of one [R, 1, L, L] mask.

Why. A packed row holds several sequences, and a prompt-shared row several pairs (trainer.data.packing,
trainer.data.prefix_sharing). With one masked SDPA call per layer, every query is scored against every
key of its row: the cost is L² per row whatever the blocks, the causal half is not skipped (an
explicit mask turns the kernels' causal path off), and the [R, 1, L, L] mask is built and kept. Here
each segment is its own ``is_causal`` call, so the work is the sum of the segments' causal triangles.
Measured on a 2-core CPU (docs/performance.md): the decoder's forward + backward on 8 multi-turn pairs
laid out prompt-shared in 3 rows of 2,034 positions took 1.95 s instead of 3.2 s with the mask (the
first version of this file; the rejected parts' small masks then took another 9 % off).

A row is cut into consecutive segments covering it, of two kinds:

    (a, b)              positions [a, b) attend causally within [a, b)
    (p0, p1, r0, r1)    positions [r0, r1) attend to the prefix [p0, p1) and causally within [r0, r1)

A packed row is a run of ``(a, b)``, one per sequence (a new one wherever the position id does not go
up by one, as transformers' own packed-sequence detection cuts it), padding a trailing run of its own.
A prompt-shared pair ``[prefix | chosen | rejected]`` is ``(p0, c1)`` for the prefix and the chosen part
(the chosen part follows the prefix in the row, exactly its unshared causal context) and
``(p0, p1, c1, r1)`` for the rejected part. The second kind is one call of the part's queries over the
prefix's and the part's keys concatenated, with a small [r, p + r] mask (the whole prefix, then causal
within the part): a rejected query sees the prefix and the earlier rejected positions, as in its
unshared row. (Scoring the prefix's queries again in one causal call over both, the other way to get
this, measured 9 % slower for the decoder on the multi-turn pairs below.) Padding of a shared row
(block -1) gets zeros; no real position attends to it and its loss weight is 0.

How it reaches the model. transformers looks the attention function up by name on every call
(``ALL_ATTENTION_FUNCTIONS``) and passes the forward's extra keyword arguments down to it. :func:`register`
puts :func:`attention` under the name "sdpa"; without a ``segments`` argument it hands the call to
transformers' own sdpa function unchanged, so padded rows, generation and every other caller see plain
sdpa. The caller passes ``segments`` and :data:`NO_MASK`, a 4D mask that transformers passes through as
it is (``masking_utils._preprocess_mask_arguments``), so no [R, 1, L, L] mask is built.

Only for models whose attention is full causal attention: :func:`supported` refuses sliding windows and
logit soft-capping (the strategy then keeps the mask), and :func:`attention` raises if it meets them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from trainer.data.prefix_sharing import CHOSEN, REJECTED, SHARED

# A 4D "mask" transformers passes through untouched, so it builds none; ignored by :func:`attention`.
NO_MASK = torch.zeros(1, 1, 1, 1)

Segment = tuple[int, ...]


def supported(config) -> bool:
    """True when every layer is full causal attention: no sliding window in use, no soft-capping."""
    if getattr(config, "_attn_implementation", "sdpa") != "sdpa":
        return False
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return False
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return False
    return getattr(config, "attn_logit_softcapping", None) is None


def packed_segments(position_ids: torch.Tensor) -> list[list[Segment]]:
    """Segments of packed rows: a new sequence wherever the position does not go up by exactly one."""
    rows = []
    for pos in position_ids:  # the cuts found on the device; only they come back to Python
        bounds = [0, *(torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1).tolist(), len(pos)]
        rows.append(list(zip(bounds, bounds[1:])))
    return rows


def shared_segments(block: torch.Tensor, branch: torch.Tensor) -> list[list[Segment]]:
    """Segments of prompt-shared rows (trainer.data.prefix_sharing): per pair block, prefix + chosen
    causally, rejected over the prefix; padding (block -1) as zero-output runs ``(a, a, a, b)``."""
    rows = []
    for blocks, branches in zip(block.tolist(), branch.tolist()):
        segments, i, length = [], 0, len(blocks)
        while i < length:
            j = i
            while j < length and blocks[j] == blocks[i]:
                j += 1
            if blocks[i] < 0:
                segments.append((i, i, i, j))  # no keys: zeros
            else:
                parts = branches[i:j]
                p1 = i + parts.count(SHARED)
                r0 = p1 + parts.count(CHOSEN)
                if parts != [SHARED] * (p1 - i) + [CHOSEN] * (r0 - p1) + [REJECTED] * (j - r0):
                    raise ValueError(f"prompt-shared row: pair block at {i} is not [shared | chosen | rejected]")
                segments += [(i, r0), (i, p1, r0, j)]
            i = j
        rows.append(segments)
    return rows


def one_row(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Packed or prompt-shared rows as ONE row of their real positions, padding dropped.

    Returns ``real`` ([R, L] bool: the positions kept, in row-major order), the row's ``input_ids`` and
    ``labels`` [1, N], and the decoder's other inputs for it: ``position_ids`` [1, N], its segments
    (:func:`packed_segments`, :func:`shared_segments`) and :data:`NO_MASK`. :func:`spread` puts
    per-position results back into the [R, L] layout.

    Why one row: rows are cut at ``max_length`` and right-padded to the longest, and every padding position
    goes through every linear layer and the head like a real one (17 % of the positions of the SFT
    benchmark's first-fit rows of 512: benchmarks/micro.py padding). Attention per segment does not care
    how long a row is, so the real positions can simply be laid end to end. Segments are found per row: a shared row's
    pair slots restart at 0 in each row, so they are keyed by row before the rows are joined.
    """
    real = batch["block"] >= 0 if "branch" in batch else batch["seq_id"] >= 0
    positions = batch["position_ids"][real][None]
    if "branch" in batch:
        rows = torch.arange(real.shape[0], device=real.device)[:, None]
        keys = (batch["block"] + rows * real.shape[1])[real]
        segments = shared_segments(keys[None], batch["branch"][real][None])
    else:
        segments = packed_segments(positions)
    inputs = {"position_ids": positions, "segments": segments, "attention_mask": NO_MASK}
    return real, batch["input_ids"][real][None], batch["labels"][real][None], inputs


def last_token_row(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Right-padded rows (``collate_reward``: ``attention_mask``, ``last_index``) as ONE padding-free row,
    for a model that reads one position per sequence (a reward model's last token).

    Returns the row's ``input_ids`` [1, N], each sequence's last position in it [B] and the decoder's
    other inputs (position ids restarting at 0 per sequence, :func:`packed_segments`, :data:`NO_MASK`).
    Each sequence keeps its positions and attends only to itself, as in its padded row."""
    real = batch["attention_mask"].bool()
    lengths = real.sum(1)
    steps = torch.arange(real.shape[1], device=real.device)
    if not torch.equal(real, steps < lengths[:, None]) or not torch.equal(batch["last_index"], lengths - 1):
        raise ValueError("last_token_row: rows must be right-padded with last_index at each row's last real token")
    positions = steps.expand_as(real)[real][None]
    inputs = {"position_ids": positions, "segments": packed_segments(positions), "attention_mask": NO_MASK}
    return batch["input_ids"][real][None], lengths.cumsum(0) - 1, inputs


def spread(values: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """[1, N] values of :func:`one_row`'s row back in the [R, L] layout, zeros on padding; differentiable."""
    return values.new_zeros(real.shape).masked_scatter(real, values[0])


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              segments: list[list[Segment]] | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature (query/key/value [B, H, L, D]); returns [B, L, H, D].

    The rows are viewed head-major as one run of B·L positions ([H, B·L, D]: a view when B = 1, as
    :func:`one_row` makes it) and cut with one ``split`` at the segments' query ranges, which partition
    each row in order. Autograd's backward of a split is one ``cat`` of the pieces' gradients; indexing
    each row and slicing each segment instead would back-propagate every slice through a zero-filled
    copy of the whole row (measured: 7 % of an SFT step in ``fill_``). The outputs are joined by one
    ``cat`` in the same order."""
    if segments is None:
        return _SDPA(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise NotImplementedError("segment attention: this model uses a sliding window or soft-capping; "
                                  "set parallel.segment_attention=false")
    rows, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    q, k, v = (t.transpose(0, 1).reshape(t.shape[1], rows * length, dim) for t in (query, key, value))
    if groups > 1:
        k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    flat = [tuple(x + r * length for x in seg) for r, row in enumerate(segments) for seg in row]
    sizes = [seg[1] - seg[0] if len(seg) == 2 else seg[3] - seg[2] for seg in flat]
    if sum(sizes) != rows * length:
        raise ValueError(f"segment attention: the segments cover {sum(sizes)} of {rows * length} positions")
    qs, ks, vs = (torch.split(t, sizes, 1) for t in (q, k, v))
    starts = {seg[0]: i for i, seg in enumerate(flat) if len(seg) == 2}
    pieces = []
    for i, seg in enumerate(flat):
        if len(seg) == 2:
            pieces.append(_sdpa(qs[i], ks[i], vs[i], None, dropout, scaling))
        elif seg[0] == seg[1] == seg[2]:
            pieces.append(q.new_zeros(heads, sizes[i], dim))
        else:
            # the part's queries over the prefix (the head of the causal piece the pair's block starts
            # with) and the part's own keys: query i sees the whole prefix and the part's keys 0..i
            p0, p1, r0, r1 = seg
            prefix = starts[p0]
            keys, values = (torch.cat([t[prefix][:, :p1 - p0], t[i]], 1) for t in (ks, vs))
            mask = torch.ones(r1 - r0, p1 - p0 + r1 - r0, dtype=torch.bool, device=q.device).tril(p1 - p0)
            pieces.append(_sdpa(qs[i], keys, values, mask, dropout, scaling))
    out = torch.cat(pieces, 1) if len(pieces) > 1 else pieces[0]
    return out.view(heads, rows, length, dim).permute(1, 2, 0, 3).contiguous(), None


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout: float,
          scaling: float | None) -> torch.Tensor:
    """One SDPA call on [H, n, D] pieces: causal without a mask, else the given boolean mask."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, dropout_p=dropout,
                                          is_causal=mask is None, scale=scaling)[0]


_SDPA = None


def register() -> None:
    """Put :func:`attention` under transformers' "sdpa" name (idempotent); the original handles every
    call without ``segments``."""
    global _SDPA
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _SDPA is None:
        _SDPA = sdpa_attention_forward
        AttentionInterface.register("sdpa", attention)
