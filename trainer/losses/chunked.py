"""Per-token log-probs from final hidden states without full-vocabulary logits for the whole batch.

For N = B·T tokens, hidden size H and vocabulary V, the plain path materialises logits [N, V] (plus
their fp32 copy, the log-softmax cross_entropy keeps for backward, and the gradient of the same size):
at N = 8,192 and V = 32,000 that is 1 GiB per fp32 copy, more than a small model's weights. Here

    logp[n] = (h_n · W^T + b)[y_n] - logsumexp_v (h_n · W^T + b)[v]

is computed chunk by chunk over tokens, each chunk under ``torch.utils.checkpoint`` (non-reentrant):
forward keeps only the chunk's [c] log-probs, and backward recomputes one chunk's logits at a time,
forms its softmax gradient ``g_n · (onehot(y_n) - softmax_n)`` and drops it before the next chunk. Peak
head memory is O(c·V) instead of O(N·V); the price is one extra head matmul per chunk in backward.

``head`` is called as a module (the model's ``lm_head``, tied or not), so whatever wraps its forward
keeps working: ZeRO-3's pre-forward hook gathers the partitioned weight for each call, in forward and
in the recomputation, and releases it after.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer.losses.sft import token_logps


def _chunk_logps(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)
    return -F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels, reduction="none")


def chunked_token_logps(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                        chunk_tokens: int, num_chunks: int = 0) -> torch.Tensor:
    """log p(labels[b, t] | context), [B, T], from final hidden states [B, T, H] and the LM head.

    Equal to ``token_logps(head(hidden), labels)`` in value and gradient (the same float ops per row).
    ``chunk_tokens <= 0``, or a batch of at most ``chunk_tokens`` tokens, takes that plain path: one
    chunk would only add the recomputation. ``num_chunks``: call the head at least this many times
    (trailing chunks empty). Under ZeRO-3 every head call all-gathers the partitioned weight, a
    collective, so every data-parallel rank must make the same number of calls whatever its own
    token count; the caller passes ``ceil(max tokens over ranks / chunk_tokens)``.
    """
    b, t, h = hidden.shape
    if chunk_tokens <= 0 or (b * t <= chunk_tokens and num_chunks <= 1):
        return token_logps(head(hidden), labels)
    flat_hidden, flat_labels = hidden.reshape(b * t, h), labels.reshape(b * t)
    count = max(num_chunks, -(-b * t // chunk_tokens))
    parts = [checkpoint(_chunk_logps, head, flat_hidden[k * chunk_tokens:(k + 1) * chunk_tokens],
                        flat_labels[k * chunk_tokens:(k + 1) * chunk_tokens], use_reentrant=False)
             for k in range(count)]
    return torch.cat(parts).view(b, t)
