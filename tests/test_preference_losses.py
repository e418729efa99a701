"""Preference, reward-regression and curation contracts: closed forms, an independent float reference,
hand-derived gradients, and identities."""

import math
from decimal import Decimal, localcontext
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from trainer.data.curation import length_score
from trainer.losses.preference import (
    dpo_loss,
    implicit_rewards,
    ipo_loss,
    preference_loss,
    preference_metrics,
    rpo_loss,
)
from trainer.losses.reward import HELPSTEER2_ATTRIBUTES, combine_attributes, reward_regression_loss

DISTANCES = ("bwd_kl", "fwd_kl", "sq")


def _pairs(n=8, scale=1.0, seed=0, requires_grad=False):
    """Four [n] float64 log-prob tensors (pi_c, pi_r, ref_c, ref_r) and two rewards, ~N(0, scale)."""
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(n, generator=g, dtype=torch.float64)).requires_grad_(requires_grad)
            for _ in range(6)]


# ---- an independent reference: Python floats and the math module, one pair at a time ----------------

def _log_sigmoid(x):
    # log(1 / (1 + e^-x)), split by sign so exp never overflows.
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sigmoid(x):
    return math.exp(_log_sigmoid(x))


def _ref_dpo(pc, pr, rc, rr, beta):
    return -_log_sigmoid(beta * ((pc - rc) - (pr - rr)))


def _ref_ipo(pc, pr, rc, rr, beta):
    return ((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2


def _ref_kl(p, q):
    """KL(Bern(sigma(p)) || Bern(sigma(q))) = sum over outcomes of P log(P/Q), logs in log-sigmoid form."""
    return (_sigmoid(p) * (_log_sigmoid(p) - _log_sigmoid(q))
            + _sigmoid(-p) * (_log_sigmoid(-p) - _log_sigmoid(-q)))


def _ref_rpo(pc, pr, rc, rr, wc, wr, beta, eta, distance):
    a, b = beta * ((pc - rc) - (pr - rr)), eta * (wc - wr)
    return {"bwd_kl": _ref_kl(b, a), "fwd_kl": _ref_kl(a, b), "sq": (a - b) ** 2}[distance]


def _decimal_bwd_kl(a, b):
    """Nemotron-4's D[a||b] exactly as written, sigma(b) log(sigma(b)/sigma(a)) + ..., in 1000-digit
    decimals: no log-sigmoid rewriting, so it checks the stable form at |a|, |b| ~ 1e3 where floats
    cannot (1 - sigma(1e3) ~ 1e-435 survives the subtraction only with that many digits)."""
    with localcontext() as ctx:
        ctx.prec = 1000
        sig = lambda x: 1 / (1 + (-Decimal(x)).exp())  # noqa: E731
        sa, sb = sig(a), sig(b)
        return float(sb * (sb / sa).ln() + (1 - sb) * ((1 - sb) / (1 - sa)).ln())


def _per_pair(fn, tensors, *args):
    return torch.tensor([fn(*(t[i].item() for t in tensors), *args) for i in range(len(tensors[0]))],
                        dtype=torch.float64)


# ---- closed forms ------------------------------------------------------------------------------------

def test_dpo_is_log2_at_zero_beta_or_equal_margins():
    pi_c, pi_r, ref_c, ref_r, gain, _ = _pairs()
    assert torch.allclose(dpo_loss(pi_c, pi_r, ref_c, ref_r, 0.0), torch.full((8,), math.log(2), dtype=torch.float64))
    # Same policy-minus-reference gain on both responses: h = 0 whatever beta and the log-prob scale.
    pi_c = pi_c - 1e3
    for beta in (0.01, 0.1, 5.0):
        loss = dpo_loss(pi_c, pi_r, pi_c - gain, pi_r - gain, beta)
        assert torch.allclose(loss, torch.full_like(loss, math.log(2)), rtol=1e-12)


def test_dpo_tails_are_zero_and_linear_not_inf():
    z = torch.tensor([200.0, -200.0])  # float32: sigmoid(-200) underflows, logsigmoid must not
    loss = dpo_loss(z, torch.zeros(2), torch.zeros(2), torch.zeros(2), 1.0)
    assert loss[0].item() == pytest.approx(0.0, abs=1e-30) and loss[1].item() == pytest.approx(200.0, rel=1e-6)


@pytest.mark.parametrize("beta", [0.05, 0.5, 2.0])
def test_ipo_closed_forms(beta):
    zero = torch.zeros(3, dtype=torch.float64)
    assert torch.allclose(ipo_loss(zero, zero, zero, zero, beta), torch.full((3,), 1 / (4 * beta ** 2),
                                                                                dtype=torch.float64))
    target = torch.full((3,), 1 / (2 * beta), dtype=torch.float64)
    assert torch.allclose(ipo_loss(target, zero, zero, zero, beta), zero, atol=1e-12)


@pytest.mark.parametrize("distance", DISTANCES)
def test_rpo_is_zero_when_policy_gap_equals_reward_gap(distance):
    # a = beta*h = eta*(reward_c - reward_r) = b for every pair, including |a| = 1e3.
    h = torch.tensor([-1e3, -50.0, -1.0, 0.0, 0.3, 50.0, 1e3], dtype=torch.float64)
    zero = torch.zeros_like(h)
    beta, eta = 0.5, 2.0
    loss = rpo_loss(h, zero, zero, zero, h * beta / eta, zero, beta, eta, distance)
    assert torch.equal(loss, torch.zeros_like(h))


def test_rpo_kl_distances_are_nonnegative_and_sq_is_squared_gap():
    pi_c, pi_r, ref_c, ref_r, w_c, w_r = _pairs(256, scale=10.0, seed=1)
    beta, eta = 0.3, 1.7
    for distance in ("bwd_kl", "fwd_kl"):  # Gibbs' inequality
        assert (rpo_loss(pi_c, pi_r, ref_c, ref_r, w_c, w_r, beta, eta, distance) >= 0).all()
    a, b = beta * ((pi_c - ref_c) - (pi_r - ref_r)), eta * (w_c - w_r)
    assert torch.allclose(rpo_loss(pi_c, pi_r, ref_c, ref_r, w_c, w_r, beta, eta, "sq"), (a - b) ** 2, rtol=1e-12)


def test_rpo_rejects_unknown_distance_and_names_the_allowed_ones():
    t = torch.zeros(2)
    with pytest.raises(ValueError, match=r"bwd_kl.*fwd_kl.*sq.*'kl'"):
        rpo_loss(t, t, t, t, t, t, 0.1, 1.0, "kl")


def test_implicit_rewards_and_metrics():
    pi_c = torch.tensor([-3.0, -5.0, -2.0])
    pi_r = torch.tensor([-4.0, -4.0, -2.0])
    ref = torch.tensor([-3.5, -4.5, -2.0])
    rc, rr = implicit_rewards(pi_c, pi_r, ref, ref, 0.1)
    assert torch.allclose(rc, torch.tensor([0.05, -0.05, 0.0])) and torch.allclose(rr, torch.tensor([-0.05, 0.05, 0.0]))
    m = preference_metrics(pi_c.requires_grad_(), pi_r, ref, ref, 0.1)
    assert set(m) == {"reward_chosen", "reward_rejected", "margin", "accuracy"}
    assert torch.allclose(m["margin"], torch.tensor([0.1, -0.1, 0.0]))
    assert torch.equal(m["accuracy"], torch.tensor([1.0, 0.0, 0.0]))  # a tie is not a correct ranking
    assert all(v.shape == (3,) and not v.requires_grad for v in m.values())


# ---- parity with the independent reference -----------------------------------------------------------

@pytest.mark.parametrize("scale", [1.0, 50.0])
def test_parity_with_float_reference(scale):
    # scale 50 puts |a|, |b| in the hundreds: naive log(sigmoid) would give inf there.
    tensors = _pairs(32, scale=scale, seed=2)
    lp, rewards = tensors[:4], tensors[4:]
    beta, eta = 0.7, 1.3
    checks = [(dpo_loss(*lp, beta), _per_pair(_ref_dpo, lp, beta)),
              (ipo_loss(*lp, beta), _per_pair(_ref_ipo, lp, beta))]
    for d in DISTANCES:
        checks.append((rpo_loss(*lp, *rewards, beta, eta, d), _per_pair(_ref_rpo, tensors, beta, eta, d)))
    for got, expected in checks:
        assert torch.isfinite(got).all()
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rpo_bwd_kl_matches_exact_decimal_formula_at_extremes(dtype):
    a = [1e3, 1e3, -1e3, -1e3, 50.0, -50.0, 999.0, 3.0]
    b = [-1e3, 1e3 - 1, 1e3, -999.0, -50.0, 40.0, 1e3, -2.5]
    a_t = torch.tensor(a, dtype=dtype, requires_grad=True)
    zero = torch.zeros(len(a), dtype=dtype)
    loss = rpo_loss(a_t, zero, zero, zero, torch.tensor(b, dtype=dtype), zero, 1.0, 1.0, "bwd_kl")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(a_t.grad).all()
    expected = torch.tensor([_decimal_bwd_kl(x, y) for x, y in zip(a, b)], dtype=torch.float64)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-12)
    assert torch.allclose(loss.double(), expected, **tol)
    for distance in ("fwd_kl", "sq"):
        other = rpo_loss(a_t, zero, zero, zero, torch.tensor(b, dtype=dtype), zero, 1.0, 1.0, distance)
        assert torch.isfinite(other).all()


# ---- gradients ---------------------------------------------------------------------------------------

def test_gradcheck_preference_losses():
    tensors = _pairs(5, scale=2.0, seed=3, requires_grad=True)
    assert torch.autograd.gradcheck(partial(dpo_loss, beta=0.6), tensors[:4])
    assert torch.autograd.gradcheck(partial(ipo_loss, beta=0.6), tensors[:4])
    for d in DISTANCES:
        assert torch.autograd.gradcheck(partial(rpo_loss, beta=0.6, eta=1.4, distance=d), tensors)


def test_gradcheck_reward_regression():
    g = torch.Generator().manual_seed(4)
    pred = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(4, 5, generator=g, dtype=torch.float64)
    mask = (torch.rand(4, 5, generator=g) > 0.3).double()
    assert torch.autograd.gradcheck(lambda p: reward_regression_loss(p, target, mask), (pred,))


def test_dpo_gradient_matches_hand_derivation():
    pi_c, pi_r, ref_c, ref_r, _, _ = _pairs(16, scale=3.0, seed=5, requires_grad=True)
    beta = 0.4
    dpo_loss(pi_c, pi_r, ref_c, ref_r, beta).sum().backward()
    z = beta * ((pi_c - ref_c) - (pi_r - ref_r)).detach()
    # d/dz -log sigma(z) = -sigma(-z); dz/dpi_c = beta, dz/dpi_r = -beta, dz/dref_c = -beta.
    expected = -beta * torch.sigmoid(-z)
    assert torch.allclose(pi_c.grad, expected, rtol=1e-12)
    assert torch.allclose(pi_r.grad, -expected, rtol=1e-12)
    assert torch.allclose(ref_c.grad, -expected, rtol=1e-12)


def test_rpo_gradients_match_hand_derivation():
    pi_c, pi_r, ref_c, ref_r, w_c, w_r = _pairs(16, scale=3.0, seed=6, requires_grad=True)
    beta, eta = 0.4, 1.5
    a = beta * ((pi_c - ref_c) - (pi_r - ref_r)).detach()
    b = eta * (w_c - w_r).detach()
    sig_prime = lambda x: torch.sigmoid(x) * torch.sigmoid(-x)  # noqa: E731
    # bwd_kl: d/da = sigma(a) - sigma(b); d/db = sigma'(b) * (b - a).  fwd_kl: d/da = sigma'(a) * (a - b).
    expected = {"bwd_kl": (torch.sigmoid(a) - torch.sigmoid(b), sig_prime(b) * (b - a)),
                "fwd_kl": (sig_prime(a) * (a - b), torch.sigmoid(b) - torch.sigmoid(a)),
                "sq": (2 * (a - b), 2 * (b - a))}
    for distance, (d_a, d_b) in expected.items():
        for t in (pi_c, w_c):
            t.grad = None
        rpo_loss(pi_c, pi_r, ref_c, ref_r, w_c, w_r, beta, eta, distance).sum().backward()
        assert torch.allclose(pi_c.grad, beta * d_a, rtol=1e-10, atol=1e-14), distance
        assert torch.allclose(w_c.grad, eta * d_b, rtol=1e-10, atol=1e-14), distance


def test_rpo_bwd_kl_with_certain_reward_has_dpo_gradient():
    # sigma(b) -> 1 makes the soft label hard: d/da = sigma(a) - 1 = -sigma(-a), DPO's gradient.
    pi_c, pi_r, ref_c, ref_r, _, _ = _pairs(8, seed=7, requires_grad=True)
    big, zero = torch.full((8,), 1e3, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    g_rpo = torch.autograd.grad(rpo_loss(pi_c, pi_r, ref_c, ref_r, big, zero, 0.3, 1.0).sum(), pi_c)[0]
    g_dpo = torch.autograd.grad(dpo_loss(pi_c, pi_r, ref_c, ref_r, 0.3).sum(), pi_c)[0]
    assert torch.allclose(g_rpo, g_dpo, rtol=1e-12)


# ---- the SFT mix -------------------------------------------------------------------------------------

def test_preference_loss_identities():
    pi_c, pi_r, ref_c, ref_r, _, _ = _pairs(8, seed=8, requires_grad=True)
    pref = dpo_loss(pi_c, pi_r, ref_c, ref_r, 0.1)
    nll = -pi_c
    assert torch.equal(preference_loss(pref, nll, 0.0, 0.7), 0.7 * nll.mean())
    assert torch.equal(preference_loss(pref, nll, 1.0, 0.0), pref.mean())
    mixed = preference_loss(pref, nll, 0.5, 0.2)
    expected = 0.5 * sum(pref.tolist()) / 8 + 0.2 * sum(nll.tolist()) / 8
    assert mixed.dim() == 0 and mixed.item() == pytest.approx(expected, rel=1e-12)
    # SFT-only still reaches pi_c (through the NLL) with exactly the NLL gradient, -w_s / B.
    (grad,) = torch.autograd.grad(preference_loss(pref, nll, 0.0, 0.7), pi_c)
    assert torch.allclose(grad, torch.full((8,), -0.7 / 8, dtype=torch.float64), rtol=1e-12)


# ---- reward regression -------------------------------------------------------------------------------

def test_reward_regression_ignores_masked_entries():
    g = torch.Generator().manual_seed(9)
    pred = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float64)
    loss = reward_regression_loss(pred, target, mask)
    (grad,) = torch.autograd.grad(loss, pred)
    for fill in (1e6, float("nan")):  # a missing label stored as NaN must not leak either
        changed = torch.where(mask.bool(), target, torch.full_like(target, fill))
        loss2 = reward_regression_loss(pred, changed, mask)
        (grad2,) = torch.autograd.grad(loss2, pred)
        assert torch.equal(loss, loss2) and torch.equal(grad, grad2)
    assert torch.equal(grad[mask == 0], torch.zeros(int((mask == 0).sum()), dtype=torch.float64))
    hand = sum((p - t) ** 2 for p, t, m in zip(pred.flatten().tolist(), target.flatten().tolist(),
                                                mask.flatten().tolist()) if m) / mask.sum().item()
    assert loss.item() == pytest.approx(hand, rel=1e-12)


def test_reward_regression_full_mask_is_mse_and_empty_mask_is_zero():
    g = torch.Generator().manual_seed(10)
    pred = torch.randn(4, 5, generator=g, requires_grad=True)
    target = torch.randn(4, 5, generator=g)
    assert torch.allclose(reward_regression_loss(pred, target, torch.ones(4, 5)), F.mse_loss(pred, target))
    empty = reward_regression_loss(pred, target, torch.zeros(4, 5))
    assert empty.item() == 0.0 and empty.requires_grad
    empty.backward()
    assert torch.equal(pred.grad, torch.zeros(4, 5))


def test_combine_attributes_is_a_weighted_sum():
    assert len(HELPSTEER2_ATTRIBUTES) == 5 and HELPSTEER2_ATTRIBUTES[0] == "helpfulness"
    scores = torch.tensor([[[4.0, 3.0, 4.0, 2.0, 1.0], [0.0, 1.0, 2.0, 3.0, 4.0]]])  # [1, 2, 5]
    weights = [0.65, 0.8, 0.45, 0.55, -0.4]
    out = combine_attributes(scores, weights)
    assert out.shape == (1, 2)
    for j, row in enumerate(scores[0].tolist()):
        assert out[0, j].item() == pytest.approx(sum(w * s for w, s in zip(weights, row)), rel=1e-6)
    assert torch.equal(combine_attributes(scores, [1, 0, 0, 0, 0]), scores[..., 0])
    with pytest.raises(ValueError, match="4 weights for 5 attributes"):
        combine_attributes(scores, weights[:4])


# ---- LongWriter length score -------------------------------------------------------------------------

@pytest.mark.parametrize("required, produced, expected", [
    (1000, 1000, 100.0),
    (1000, 4000, 0.0),          # 1 - 3/3
    (1000, 9000, 0.0),          # clipped at 0
    (1000, 2000, 100 * 2 / 3),  # 1 - 1/3
    (1000, 1600, 80.0),         # 1 - 0.6/3
    (1000, 500, 50.0),          # 1 - (2 - 1)/2
    (1000, 800, 87.5),          # 1 - 0.25/2
    (900, 300, 0.0),            # 1 - (3 - 1)/2
    (1000, 10, 0.0),
    (1000, 0, 0.0),
])
def test_length_score_examples(required, produced, expected):
    assert length_score(required, produced) == pytest.approx(expected, abs=1e-9)


def test_length_score_is_continuous_at_the_target_and_rejects_bad_lengths():
    assert length_score(500, 500 * (1 + 1e-12)) == pytest.approx(100.0)
    assert length_score(500, 500 * (1 - 1e-12)) == pytest.approx(100.0)
    for required in (0, -5):
        with pytest.raises(ValueError, match="required"):
            length_score(required, 10)
    with pytest.raises(ValueError, match="produced"):
        length_score(10, -1)
