"""Token log-probabilities and the supervised fine-tuning loss.

Both are pure functions of tensors: no process groups, no device moves, no ``.item()``. The global
normaliser of the ``token`` reduction is computed by the stage (it needs a collective) and passed in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[b, t] | context) for every position, shape [B, T].

    ``labels`` are already aligned to ``logits`` (logits[:, t] predicts labels[:, t]). Computed as
    ``-cross_entropy`` in at least float32 (bf16 logits are upcast), which avoids keeping a second
    [B, T, V] log-softmax tensor.
    """
    b, t, v = logits.shape
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits.reshape(b * t, v), labels.reshape(b * t), reduction="none")
    return -nll.view(b, t)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                   average: bool = False) -> torch.Tensor:
    """Per-sequence log-probability of the masked (response) tokens, shape [B].

    Sum over masked tokens by default; ``average=True`` divides by each sequence's masked-token count
    (a sequence with no masked token gives 0 rather than NaN).
    """
    mask = loss_mask.to(torch.promote_types(logits.dtype, torch.float32))
    summed = (token_logps(logits, labels) * mask).sum(-1)
    if not average:
        return summed
    return summed / mask.sum(-1).clamp(min=1.0)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, reduction: str = "token",
             num_tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """Negative log-likelihood of the masked tokens, a scalar (see :func:`sft_loss_from_logps`)."""
    return sft_loss_from_logps(token_logps(logits, labels), loss_mask, reduction, num_tokens)


def sft_loss_from_logps(logps: torch.Tensor, loss_mask: torch.Tensor, reduction: str = "token",
                        num_tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """SFT loss from per-token log-probs [B, T] (as a strategy produces them, e.g. from vocab-parallel
    logits that are never gathered).

    ``token`` (LongWriter's long-ce, Bai et al. 2024, §3.3): ``sum_{b,t} m_bt * nll_bt / N`` where N is
    ``num_tokens``. The stage passes the number of target tokens in the whole GLOBAL batch (every
    micro-batch on every data-parallel rank), so each micro-batch's share is weighted by its tokens and
    the optimiser sees the same gradient however the batch was split; ``None`` uses this call's own count.

    ``sample``: ``mean_b( sum_t m_bt * nll_bt / sum_t m_bt )``, every sequence weighted equally whatever
    its length (the usual per-sequence mean, which LongWriter shows under-weights long outputs).
    """
    mask = loss_mask.to(logps.dtype)
    nll = -logps * mask
    if reduction == "token":
        denom = mask.sum() if num_tokens is None else num_tokens
        return nll.sum() / denom
    if reduction == "sample":
        return (nll.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    raise ValueError(f"reduction must be 'token' or 'sample', got {reduction!r}")
