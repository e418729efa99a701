"""SFT loss and log-prob contracts: closed forms, an independent reference, and the reductions."""

import math

import pytest
import torch

from trainer.losses import sequence_logps, sft_loss, token_logps


def _batch(lengths, vocab=7, seed=0):
    """Random logits, labels, and a mask whose row b has ``lengths[b]`` target tokens."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths) + 2
    logits = torch.randn(b, t, vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.zeros(b, t)
    for i, n in enumerate(lengths):
        mask[i, 1:1 + n] = 1
    return logits, labels, mask


def _reference_nll(logits, labels, mask):
    """Per-token NLL written from the definition -log softmax(z)_y, one position at a time."""
    out = []
    for b in range(logits.shape[0]):
        row = []
        for t in range(logits.shape[1]):
            if mask[b, t]:
                z = logits[b, t]
                row.append(-(z[labels[b, t]] - torch.log(torch.exp(z).sum())).item())
        out.append(row)
    return out


def test_uniform_logits_give_log_vocab():
    logits = torch.zeros(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    mask = torch.ones(2, 5)
    for reduction in ("token", "sample"):
        assert sft_loss(logits, labels, mask, reduction).item() == pytest.approx(math.log(11), rel=1e-6)
    assert torch.allclose(sequence_logps(logits, labels, mask), torch.full((2,), -5 * math.log(11)))


def test_certain_prediction_gives_zero_loss():
    labels = torch.tensor([[1, 2, 3]])
    logits = torch.full((1, 3, 4), -1e4)
    logits[0, torch.arange(3), labels[0]] = 0.0
    assert sft_loss(logits, labels, torch.ones(1, 3)).item() == pytest.approx(0.0, abs=1e-6)


def test_against_independent_reference():
    logits, labels, mask = _batch([3, 6, 1])
    ref = _reference_nll(logits, labels, mask)
    flat = [x for row in ref for x in row]
    assert sft_loss(logits, labels, mask, "token").item() == pytest.approx(sum(flat) / len(flat), rel=1e-9)
    per_seq = [sum(r) / len(r) for r in ref]
    assert sft_loss(logits, labels, mask, "sample").item() == pytest.approx(sum(per_seq) / 3, rel=1e-9)
    expected_sum = torch.tensor([-sum(r) for r in ref], dtype=torch.float64)
    assert torch.allclose(sequence_logps(logits, labels, mask).double(), expected_sum, rtol=1e-6)
    expected_avg = torch.tensor([-sum(r) / len(r) for r in ref], dtype=torch.float64)
    assert torch.allclose(sequence_logps(logits, labels, mask, average=True).double(), expected_avg, rtol=1e-6)


def test_token_and_sample_differ_on_unequal_lengths_and_agree_on_equal():
    # Two sequences: one target token with NLL a, three with NLL b each.
    # token  = (a + 3b) / 4;  sample = (a + b) / 2.
    vocab = 3
    logits = torch.zeros(2, 3, vocab)
    labels = torch.zeros(2, 3, dtype=torch.long)
    logits[0, 0, 0] = 2.0  # row 0, token 0: NLL a
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    a = -torch.log_softmax(torch.tensor([2.0, 0, 0]), 0)[0].item()
    b = math.log(3)
    assert sft_loss(logits, labels, mask, "token").item() == pytest.approx((a + 3 * b) / 4, rel=1e-6)
    assert sft_loss(logits, labels, mask, "sample").item() == pytest.approx((a + b) / 2, rel=1e-6)
    equal = torch.ones(2, 3)
    assert sft_loss(logits, labels, equal, "token").item() == pytest.approx(
        sft_loss(logits, labels, equal, "sample").item(), rel=1e-6)


def test_global_token_normaliser_makes_shards_sum_to_the_whole():
    logits, labels, mask = _batch([2, 5, 3, 7], seed=3)
    whole = sft_loss(logits, labels, mask, "token")
    n = mask.sum()
    parts = [sft_loss(logits[i:i + 1], labels[i:i + 1], mask[i:i + 1], "token", num_tokens=n) for i in range(4)]
    assert sum(parts).item() == pytest.approx(whole.item(), rel=1e-9)
    naive = sum(sft_loss(logits[i:i + 1], labels[i:i + 1], mask[i:i + 1], "token") for i in range(4)) / 4
    assert abs(naive.item() - whole.item()) > 1e-3  # the per-shard mean is a different loss


def test_gradient_matches_reference_and_masked_positions_get_none():
    logits, labels, mask = _batch([2, 4], seed=5)
    logits.requires_grad_(True)
    sft_loss(logits, labels, mask, "token").backward()
    # d/dz of mean NLL = (softmax(z) - onehot(y)) / N on masked positions.
    expected = (torch.softmax(logits.detach(), -1) - torch.nn.functional.one_hot(labels, 7)) / mask.sum()
    expected = expected * mask.unsqueeze(-1)
    assert torch.allclose(logits.grad, expected, atol=1e-12)


def test_token_logps_shape_and_empty_mask():
    logits, labels, mask = _batch([0, 3])
    assert token_logps(logits, labels).shape == labels.shape
    assert sequence_logps(logits, labels, mask, average=True)[0].item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        sft_loss(logits, labels, mask, "mean")
