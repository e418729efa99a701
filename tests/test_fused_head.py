"""The fused LM head (hand-written chunked backward) against the full logits' autograd.

``fused_token_logps(hidden, W, b, labels, c)`` must equal ``token_logps(F.linear(hidden, W, b), labels)``
in value and in every gradient (hidden, through an upstream embedding; head weight; bias; a weight tied to
the embedding), for chunks that do and do not divide the token count, one chunk (softmax kept from
forward), chunk 1, ignored labels (-100) and non-uniform upstream gradients; float64 to 1e-10, float32 to
1e-5, bf16 loosely; plus a gradcheck of the hand-written backward.
"""

from __future__ import annotations

import pytest
import torch

from trainer.losses import token_logps
from trainer.losses.chunked import fused_token_logps

VOCAB, WIDTH, B, T = 50, 16, 3, 11  # N = 33 tokens
CHUNKS = (1, 4, 7, 11, 33, 64, 0)  # 4, 7: do not divide 33; 11: does; 33, 64, 0: one chunk
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def _model(dtype, tied, bias):
    torch.manual_seed(1)
    embed = torch.nn.Embedding(VOCAB, WIDTH).to(dtype)
    head = torch.nn.Linear(WIDTH, VOCAB, bias=bias).to(dtype)
    if tied:
        head.weight = embed.weight
    ids = torch.randint(0, VOCAB, (B, T))
    labels = torch.roll(ids, -1, 1)
    labels[0, :3] = -100
    labels[2, -1] = -100
    return embed, head, ids, labels


def _grads(embed, head, ids, labels, weights, chunk):
    """Log-probs and the gradients of sum(weights * logps); chunk None is the full-logits reference."""
    embed.zero_grad(), head.zero_grad()
    hidden = torch.tanh(embed(ids))
    if chunk is None:
        logps = token_logps(head(hidden), labels)
    else:
        logps = fused_token_logps(hidden, head.weight, head.bias, labels, chunk)
    (logps * weights).sum().backward()
    grads = [head.weight.grad, embed.weight.grad] + ([head.bias.grad] if head.bias is not None else [])
    return [logps.detach()] + [None if g is None else g.clone() for g in grads]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tied,bias", [(False, False), (True, False), (False, True), (True, True)])
def test_fused_head_equals_full_logits(dtype, tied, bias):
    """An SFT-like masked mean and a DPO-like upstream gradient (a random weight per token, either sign)."""
    embed, head, ids, labels = _model(dtype, tied, bias)
    mask = (torch.rand(B, T) > 0.3).to(dtype)
    for weights in (-mask / mask.sum(), torch.randn(B, T, dtype=dtype)):
        want = _grads(embed, head, ids, labels, weights, None)
        assert torch.all(want[0][0, :3] == 0) and want[0][2, -1] == 0
        for chunk in CHUNKS:
            got = _grads(embed, head, ids, labels, weights, chunk)
            assert got[0].dtype == dtype and torch.all(got[0][0, :3] == 0) and got[0][2, -1] == 0
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, **TOL[dtype])


def test_ignored_labels_get_no_gradient():
    """A row whose label is ignored contributes nothing to any gradient, even with a non-zero upstream
    gradient at that position (cross_entropy's ignore_index)."""
    torch.manual_seed(0)
    hidden = torch.randn(1, 4, WIDTH, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(VOCAB, WIDTH, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[-100, 3, -100, 7]])
    for chunk in (1, 0):
        logps = fused_token_logps(hidden, weight, None, labels, chunk)
        gh, gw = torch.autograd.grad(logps.sum(), (hidden, weight))
        assert logps[0, 0] == 0 and logps[0, 2] == 0
        assert torch.all(gh[0, 0] == 0) and torch.all(gh[0, 2] == 0)
        kept = fused_token_logps(hidden[:, [1, 3]], weight, None, labels[:, [1, 3]], chunk)
        torch.testing.assert_close(gw, torch.autograd.grad(kept.sum(), weight)[0], rtol=1e-12, atol=1e-12)


def test_only_the_gradients_asked_for():
    """Hidden alone requires grad (a frozen head): its gradient matches; the weight's is not formed."""
    embed, head, ids, labels = _model(torch.float64, tied=False, bias=True)
    head.requires_grad_(False)
    weights = torch.randn(B, T, dtype=torch.float64)
    want = _grads(embed, head, ids, labels, weights, None)
    for chunk in (4, 0):
        got = _grads(embed, head, ids, labels, weights, chunk)
        assert head.weight.grad is None and head.bias.grad is None
        torch.testing.assert_close(got[0], want[0], **TOL[torch.float64])
        torch.testing.assert_close(got[2], want[2], **TOL[torch.float64])


def test_no_grad_and_retain_graph():
    """Under no_grad (reference log-probs) the values are the same; with retain_graph a second backward
    through the one-chunk path (whose kept softmax the first overwrote) gives the same gradients."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, WIDTH, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(VOCAB, WIDTH, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 5))
    logps = fused_token_logps(hidden, weight, None, labels, 0)
    with torch.no_grad():
        torch.testing.assert_close(fused_token_logps(hidden, weight, None, labels, 0), logps, rtol=0, atol=0)
    first = torch.autograd.grad(logps.sum(), (hidden, weight), retain_graph=True)
    second = torch.autograd.grad(logps.sum(), (hidden, weight))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tied", [False, True])
def test_bf16_close_to_full_logits(tied):
    """bf16 inputs: fp32 log-probs and bf16 gradients, close to token_logps on the bf16 logits (loosely:
    the paths round differently, and the weight gradient is accumulated over chunks in fp32)."""
    embed, head, ids, labels = _model(torch.bfloat16, tied, bias=True)
    weights = torch.randn(B, T, dtype=torch.float32)
    want = _grads(embed, head, ids, labels, weights, None)
    for chunk in (4, 0):
        got = _grads(embed, head, ids, labels, weights, chunk)
        assert got[0].dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in got[1:])
        for a, b in zip(got, want):
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("chunk", [2, 0])
def test_gradcheck(chunk):
    """Finite differences against the hand-written backward, chunked and one-chunk, with an ignored label."""
    torch.manual_seed(0)
    hidden = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, -100, 6, 0, 3]])
    assert torch.autograd.gradcheck(lambda h, w, b: fused_token_logps(h, w, b, labels, chunk), (hidden, weight, bias))
