"""Preference losses (DPO, IPO, RPO), their SFT mix, and the implicit-reward metrics.

Every function takes per-sequence log-probabilities, shape [B]: ``pi_c``/``pi_r`` from the policy for
the chosen/rejected response and ``ref_c``/``ref_r`` from the frozen reference model (sums over response
tokens unless the caller built them with ``sequence_logps(average=True)``). Per-pair losses come back
as [B]; the reduction to a scalar is :func:`preference_loss`. Pure functions: no process groups, no
device moves, no ``.item()``.

Notation shared by the docstrings: the log-ratio margin

    h = (pi_c - ref_c) - (pi_r - ref_r) = log [pi(y_c) ref(y_r)] / [pi(y_r) ref(y_c)],

and ``z = beta * h``, the difference of the DPO implicit rewards.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _log_ratio_margin(pi_c: Tensor, pi_r: Tensor, ref_c: Tensor, ref_r: Tensor) -> Tensor:
    # Grouped as (policy - reference) per response so that equal reference and policy values cancel
    # exactly, whatever the magnitude of the summed log-probs (often -1e3 or lower for long responses).
    return (pi_c - ref_c) - (pi_r - ref_r)


def implicit_rewards(pi_c: Tensor, pi_r: Tensor, ref_c: Tensor, ref_r: Tensor,
                     beta: float) -> tuple[Tensor, Tensor]:
    """DPO's implicit rewards ``(beta*(pi_c-ref_c), beta*(pi_r-ref_r))``, each [B].

    Rafailov et al. 2023, Eq. 5: the optimum of the KL-regularised objective satisfies
    ``r(x, y) = beta * log pi(y|x)/ref(y|x) + beta * log Z(x)``; ``Z(x)`` is the same for both responses
    to one prompt, so it cancels in every comparison and is dropped here.
    """
    return beta * (pi_c - ref_c), beta * (pi_r - ref_r)


def dpo_loss(pi_c: Tensor, pi_r: Tensor, ref_c: Tensor, ref_r: Tensor, beta: float) -> Tensor:
    """Direct Preference Optimization, per pair [B]: ``-log sigma(beta * h)``.

    Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7: the Bradley-Terry likelihood of the
    preference under the implicit rewards of :func:`implicit_rewards`.

    ``-log sigma(z)`` is computed as ``-logsigmoid(z)``, which is finite for any finite z; the naive
    ``log(sigmoid(z))`` gives ``-inf`` once sigma(z) underflows (z below about -100 in float32).
    Gradient: ``d/dz [-log sigma(z)] = -(1 - sigma(z)) = -sigma(-z)``, so ``d loss / d pi_c =
    -beta * sigma(-z)``: pairs the policy already ranks correctly by a wide margin stop contributing.
    At ``h = 0`` (or ``beta = 0``) the loss is ``log 2``.
    """
    z = beta * _log_ratio_margin(pi_c, pi_r, ref_c, ref_r)
    return -F.logsigmoid(z)


def ipo_loss(pi_c: Tensor, pi_r: Tensor, ref_c: Tensor, ref_r: Tensor, beta: float) -> Tensor:
    """Identity Preference Optimisation, per pair [B]: ``(h - 1/(2*beta))**2``.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    Eq. 17 (their tau is our beta). DPO's loss keeps decreasing as h grows, so with deterministic
    preferences it drives h to infinity and ignores the KL anchor; IPO instead regresses h onto the
    finite target ``1/(2*beta)``, so a smaller beta means a larger allowed margin. At ``h = 0`` the loss
    is ``1/(4*beta**2)``.

    The paper's h uses summed log-probs (the contract default); TRL feeds token-averaged log-probs,
    which the caller can do with ``sequence_logps(average=True)`` -- beta then has a different scale.
    """
    h = _log_ratio_margin(pi_c, pi_r, ref_c, ref_r)
    return (h - 1.0 / (2.0 * beta)) ** 2


def _bernoulli_kl(p_logit: Tensor, q_logit: Tensor) -> Tensor:
    """KL(Bern(sigma(p)) || Bern(sigma(q))) from logits, finite and >= 0 for any finite logits.

    ``sigma(p) log(sigma(p)/sigma(q)) + (1 - sigma(p)) log((1 - sigma(p))/(1 - sigma(q)))`` with
    ``log sigma(x) = logsigmoid(x)`` and ``log(1 - sigma(x)) = log sigma(-x) = logsigmoid(-x)``. The
    weights are ``exp(logsigmoid(+-p))`` rather than ``sigmoid(p)`` and ``1 - sigmoid(p)``: the latter
    rounds to 0 for p > 37 in float64, losing the small weight that multiplies a large log-ratio. When a
    weight underflows to 0 it multiplies a finite log-difference, so no ``0 * inf`` NaN can appear.
    """
    log_p, log_not_p = F.logsigmoid(p_logit), F.logsigmoid(-p_logit)
    log_q, log_not_q = F.logsigmoid(q_logit), F.logsigmoid(-q_logit)
    return log_p.exp() * (log_p - log_q) + log_not_p.exp() * (log_not_p - log_not_q)


def _rpo_bwd_kl(a: Tensor, b: Tensor) -> Tensor:
    # Nemotron-4's D[a || b]: the reward-model preference probability sigma(b) is the target
    # distribution, the policy's sigma(a) the approximation. d/da = sigma(a) - sigma(b) (see rpo_loss).
    return _bernoulli_kl(b, a)


def _rpo_fwd_kl(a: Tensor, b: Tensor) -> Tensor:
    # Roles swapped: KL(sigma(a) || sigma(b)); d/da = sigma'(a) * (a - b).
    return _bernoulli_kl(a, b)


def _rpo_sq(a: Tensor, b: Tensor) -> Tensor:
    return (a - b) ** 2


RPO_DISTANCES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "bwd_kl": _rpo_bwd_kl,
    "fwd_kl": _rpo_fwd_kl,
    "sq": _rpo_sq,
}


def rpo_loss(pi_c: Tensor, pi_r: Tensor, ref_c: Tensor, ref_r: Tensor, reward_c: Tensor, reward_r: Tensor,
             beta: float, eta: float, distance: str = "bwd_kl") -> Tensor:
    """Reward-aware Preference Optimization, per pair [B]: ``D[a || b]``.

    NVIDIA 2024, "Nemotron-4 340B Technical Report", §3.4.2, with ``a = beta * h`` (the policy's
    implicit reward gap) and ``b = eta * (reward_c - reward_r)`` (the reward model's gap). DPO pushes
    every pair's gap up regardless of how much better the chosen response is; RPO instead matches the
    policy's preference strength to the reward model's, so near-ties are not over-separated.

    ``distance``:
      - ``bwd_kl`` (the paper's D): ``sigma(b) log(sigma(b)/sigma(a)) + (1-sigma(b)) log((1-sigma(b))/(1-sigma(a)))``,
        the KL between Bernoulli preference probabilities. Differentiating with ``d/da log sigma(a) =
        1 - sigma(a)`` and ``d/da log(1 - sigma(a)) = -sigma(a)``:
        ``d/da = -sigma(b)(1 - sigma(a)) + (1 - sigma(b)) sigma(a) = sigma(a) - sigma(b)``,
        so ``d loss / d pi_c = beta * (sigma(a) - sigma(b))``: a logistic regression of sigma(a) onto
        the soft label sigma(b). With ``sigma(b) = 1`` it is DPO's gradient.
      - ``fwd_kl``: the same with a and b swapped.
      - ``sq``: ``(a - b)**2``.
    All are 0 exactly when a == b, and finite for |a|, |b| up to 1e3 (see :func:`_bernoulli_kl`).
    Gradients flow into the rewards too if they require grad; pass detached rewards for the usual
    fixed reward model.
    """
    if distance not in RPO_DISTANCES:
        raise ValueError(f"distance must be one of {sorted(RPO_DISTANCES)}, got {distance!r}")
    a = beta * _log_ratio_margin(pi_c, pi_r, ref_c, ref_r)
    b = eta * (reward_c - reward_r)
    return RPO_DISTANCES[distance](a, b)


def preference_loss(per_pair_pref: Tensor, sft_nll_chosen: Tensor, preference_weight: float,
                    sft_weight: float) -> Tensor:
    """Scalar ``preference_weight * mean(per_pair_pref) + sft_weight * mean(sft_nll_chosen)``.

    The NeMo-RL/NeMo-Aligner mix ``L = w_p * L_pref + w_s * L_sft``. DPO-style losses only see the
    chosen-minus-rejected margin, and can raise it while pushing both log-probs down; the SFT term on the
    chosen response keeps the likelihood of good responses from falling (Nemotron-4 340B, §3.4.2, adds it
    for this reason; Pang et al. 2024, iterative reasoning preference optimisation, do the same).

    ``sft_nll_chosen`` is one NLL per pair [B]; whether it is a token sum (``-pi_c``) or a token average
    (``-sequence_logps(..., average=True)``) is the caller's choice and sets the scale of ``sft_weight``.
    Both means are over this call's B pairs: the stage must weight micro-batches by their pair count
    (or use equal-sized micro-batches) for gradient accumulation to reproduce the full-batch loss.
    With ``preference_weight = 0`` the result equals ``sft_weight * mean(sft_nll_chosen)`` exactly
    (``0 * x + y == y`` for finite x); both terms stay in the graph so every input gets a gradient.
    """
    return preference_weight * per_pair_pref.mean() + sft_weight * sft_nll_chosen.mean()


@torch.no_grad()
def preference_metrics(pi_c: Tensor, pi_r: Tensor, ref_c: Tensor, ref_r: Tensor,
                       beta: float) -> dict[str, Tensor]:
    """Per-pair [B] logging tensors, detached: ``reward_chosen``, ``reward_rejected``, ``margin``
    (``reward_chosen - reward_rejected`` = beta * h) and ``accuracy`` (1.0 where margin > 0, ties
    count as wrong, as in TRL). Left per pair so the stage can reduce across data-parallel ranks.
    """
    reward_chosen, reward_rejected = implicit_rewards(pi_c, pi_r, ref_c, ref_r, beta)
    margin = reward_chosen - reward_rejected
    return {
        "reward_chosen": reward_chosen,
        "reward_rejected": reward_rejected,
        "margin": margin,
        "accuracy": (margin > 0).to(margin.dtype),
    }
