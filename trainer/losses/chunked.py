"""Per-token log-probs from final hidden states without full-vocabulary logits for the whole batch.

For N = B·T tokens, hidden size H and vocabulary V, the plain path materialises logits [N, V] (plus
their fp32 copy, the log-softmax cross_entropy keeps for backward, and the gradient of the same size):
at N = 8,192 and V = 32,000 that is 1 GiB per fp32 copy, more than a small model's weights. Here

    logp[n] = z_n[y_n] - logsumexp_v z_n[v],    z_n = h_n · W^T + b,

is computed chunk by chunk over tokens, keeping O(N) state between chunks and O(c·V) within one. Its
gradient is all a chunk needs to recompute:

    d logp_n / d z_n = onehot(y_n) - softmax(z_n),    softmax(z_n) = exp(z_n - m_n) / s_n,

with m_n = max_v z_n[v] and s_n = sum_v exp(z_n[v] - m_n) (so logsumexp = m_n + log s_n), both kept
from forward. With upstream gradient g_n, ``G = g · onehot(y) - (g / s) · exp(z - m)`` [c, V] gives
``dL/dh = G · W``, ``dL/dW = G^T · h`` and ``dL/db = sum_n G_n``.

Two implementations, chosen by the caller (trainer/parallel/deepspeed.py):

- :func:`fused_token_logps` takes the head's weight and bias as tensors and writes that backward by
  hand (an ``autograd.Function``). Forward keeps the [N] log-probs, m and s; backward recomputes one
  chunk's logits, turns them into G in place (subtract m, exp, scale by -g/s, add g at the label:
  three passes over [c, V]), and adds its three products before freeing the chunk. Against
  ``cross_entropy`` under checkpoint this drops the [c, V] log-softmax cross_entropy saves, its backward
  (``_log_softmax_backward_data``), NLL's zero-filled [c, V] gradient and scatter, and checkpoint's
  re-entry, which reruns the whole forward (log-softmax included) for each chunk. A micro-batch that
  fits one chunk keeps its exp(z - m) from forward instead of recomputing the matmul: the same memory
  as the plain path's saved log-softmax.
- :func:`chunked_token_logps` calls ``head`` as a module under ``torch.utils.checkpoint``, so whatever
  wraps its forward keeps working: ZeRO-3's pre-forward hook gathers the partitioned weight for each
  call, in forward and in the recomputation, and releases it after. The fused path reads
  ``head.weight`` directly, which under ZeRO-3 is an empty partition.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from trainer.losses.sft import token_logps

IGNORE_INDEX = -100  # cross_entropy's default ignore_index: log-prob 0, zero gradient


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


def _chunks(n: int, chunk_tokens: int) -> list[slice]:
    """Token slices of at most ``chunk_tokens``; one slice (possibly empty) when it is <= 0 or >= n."""
    step = n if chunk_tokens <= 0 or chunk_tokens >= n else chunk_tokens
    return [slice(s, min(s + step, n)) for s in range(0, max(n, 1), max(step, 1))]


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """z = h · W^T + b in the inputs' dtype (as ``F.linear``), then upcast to at least fp32 (as
    ``token_logps``): bf16 logits round exactly as on the plain path, the softmax is taken in fp32."""
    z = torch.mm(hidden, weight.t()) if bias is None else torch.addmm(bias, hidden, weight.t())
    return z.to(torch.promote_types(z.dtype, torch.float32))


def _accumulate(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc + a · b, with acc in at least fp32: bf16 chunk products summed in bf16 would round at each
    addition. fp32 and wider accumulate in place (``addmm_``); bf16 products are added to the fp32 sum."""
    if acc is None:
        part = torch.mm(a, b)
        return part.to(torch.promote_types(part.dtype, torch.float32))
    return acc.addmm_(a, b) if acc.dtype == a.dtype else acc.add_(torch.mm(a, b))


class _FusedTokenLogps(torch.autograd.Function):
    """Flat [N, H] hidden and [N] labels to [N] log-probs; see :func:`fused_token_logps`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_tokens, differentiable):
        ignored = labels == IGNORE_INDEX
        safe = labels.masked_fill(ignored, 0)  # any in-range column; the row is masked below
        chunks = _chunks(hidden.shape[0], chunk_tokens)
        out = hidden.new_empty(hidden.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32))
        top, total = torch.empty_like(out), torch.empty_like(out)
        # One chunk: keep its exp(z - m) (the size of the plain path's saved log-softmax) so backward
        # skips the matmul; not under no_grad (a reference model's log-probs), where no backward comes.
        # Held on ctx, not saved, so backward can take it and a second backward (retain_graph) finds
        # None and recomputes the same floats instead of reusing a buffer the first one overwrote.
        keep = differentiable and len(chunks) == 1
        ctx.exps = None
        for sl in chunks:
            z = _logits(hidden[sl], weight, bias)
            picked = z.gather(1, safe[sl, None]).squeeze(1)
            # lse = m + log s, s = sum_v exp(z_v - m), m the row max; the exponentials are formed in place
            # over the logits (torch.logsumexp would allocate a second [c, V] for z - m).
            torch.amax(z, -1, out=top[sl])
            torch.sum(z.sub_(top[sl, None]).exp_(), -1, out=total[sl])
            torch.sub(picked, top[sl] + total[sl].log(), out=out[sl])
            if keep:
                ctx.exps = z
            del z  # before the next chunk's logits are allocated: one [c, V] at a time
        out.masked_fill_(ignored, 0.0)
        ctx.chunk_tokens = chunk_tokens
        ctx.save_for_backward(hidden, weight, bias, safe, ignored, top, total)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, safe, ignored, top, total = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        exps, ctx.exps = ctx.exps, None
        g = grad_out.masked_fill(ignored, 0.0)  # an ignored token's whole row of G is zero
        grad_h = hidden.new_empty(hidden.shape) if need_h else None
        grad_w = grad_b = None
        for sl in _chunks(hidden.shape[0], ctx.chunk_tokens):
            if exps is None:
                exps = _logits(hidden[sl], weight, bias).sub_(top[sl, None]).exp_()
            # G = g · onehot(y) - (g / s) · exp(z - m): the softmax's 1/s and the -g in one pass.
            g_c = g[sl]
            grad_z = exps.mul_((-g_c / total[sl])[:, None]).scatter_add_(1, safe[sl, None], g_c[:, None])
            exps = None
            if need_b:
                grad_b = grad_z.sum(0) if grad_b is None else grad_b.add_(grad_z.sum(0))
            grad_z = grad_z.to(hidden.dtype)  # bf16: as autograd casts back at the plain path's upcast
            if need_h:
                torch.mm(grad_z, weight, out=grad_h[sl])
            if need_w:
                grad_w = _accumulate(grad_w, grad_z.t(), hidden[sl])
            del grad_z
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None


def fused_token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                      chunk_tokens: int) -> torch.Tensor:
    """log p(labels[b, t] | context), [B, T], from final hidden states [B, T, H] and a linear LM head
    (``weight`` [V, H], ``bias`` [V] or None), with a hand-written chunked backward.

    Equal to ``token_logps(F.linear(hidden, weight, bias), labels)`` in value and gradient, for
    ``IGNORE_INDEX`` labels too (log-prob 0, no gradient), to rounding: the log-sum-exp and softmax are
    formed from ``exp(z - m)`` (module docstring) rather than through ``log_softmax``. Logits are
    computed in the inputs' dtype and upcast to at least fp32; the output has that fp32-or-wider dtype,
    the gradients the inputs'. ``chunk_tokens <= 0`` or >= B·T is one chunk, whose exponentials are kept
    from forward. Repeated backward (retain_graph) gives bitwise the same gradients.

    Peak head memory is O(c·V) for c = ``chunk_tokens``: one chunk's logits (turned into their
    exponentials and gradient in place; bf16 logits add their fp32 copy), plus the [V, H]
    weight-gradient accumulator (fp32 for a bf16 weight). A weight tied to the input embedding needs
    nothing special: autograd adds this gradient to the embedding's.
    """
    b, t, h = hidden.shape
    differentiable = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    flat = _FusedTokenLogps.apply(hidden.reshape(b * t, h), weight, bias, labels.reshape(b * t), chunk_tokens,
                                  differentiable)
    return flat.view(b, t)
