"""Reference-free paired preference losses: ORPO and the CPO family (CPO, SimPO, AlphaPO, IPO/hinge variants).

Each takes the policy's summed completion log-probs ℓ(y) and completion lengths n(y) (all (B,)) and plain floats,
and returns the unreduced per-pair loss (B,) plus detached metrics. Notation: a(y) = ℓ(y)/n(y), the per-token
average log-prob. Every CPO-family loss takes the same keyword-only arguments, so `CPO_LOSSES[name](**terms)`
dispatches without special cases.

Not here: the NLL term on the chosen completion that ORPO and CPO add (weighted by 1 resp. `cpo_alpha`; the
trainer computes it from the token log-probs and adds it), the forward pass, the reduction (`losses/reduce.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Metrics = dict[str, Tensor]


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, accurate at both ends (Mächler 2012: expm1 near 0, log1p far from it)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo(*, policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, beta,
         **_) -> tuple[Tensor, Metrics]:
    """ORPO odds-ratio term (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", Eqs. 4–7) with λ = β: with a = ℓ/n and odds(y) = p̄/(1 − p̄), p̄ = exp(a),
    LOR = log odds(y_w) − log odds(y_l) = (a_w − a_l) − (log(1 − e^{a_w}) − log(1 − e^{a_l})); loss = −β·logσ(LOR).

    Computed in at least float32 (as TRL). The averages are clamped to ≤ −tiny so that a completion with average
    log-prob exactly 0 gives a finite odds ratio instead of inf/nan; it changes nothing for any a < −1e-38.
    The trainer adds NLL(y_w): TRL (and the paper's code) takes it over prompt + chosen; see the trainer.

    Returns: loss (B,), {"log_odds_ratio": mean logσ(LOR), "log_odds_chosen": mean LOR} (TRL's names).
    """
    dtype = torch.promote_types(policy_chosen_logps.dtype, torch.float32)
    tiny = torch.finfo(dtype).tiny
    chosen = (policy_chosen_logps.to(dtype) / chosen_lengths.to(dtype)).clamp(max=-tiny)
    rejected = (policy_rejected_logps.to(dtype) / rejected_lengths.to(dtype)).clamp(max=-tiny)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    log_sigmoid = F.logsigmoid(log_odds)
    metrics = {"log_odds_ratio": log_sigmoid.detach().mean(), "log_odds_chosen": log_odds.detach().mean()}
    return -beta * log_sigmoid, metrics


# ---- CPO family ---------------------------------------------------------------------------------------------


def _scores(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, average: bool,
            alpha: float) -> tuple[Tensor, Tensor]:
    """s(y): summed (average=False) or per-token-average log-prob; with alpha ≠ 0 the AlphaPO reward shape
    s ← (1 − p^{−α})/α, p = exp(s), i.e. −expm1(−α·s)/α (→ s as α → 0)."""
    chosen, rejected = policy_chosen_logps, policy_rejected_logps
    if average:
        chosen, rejected = chosen / chosen_lengths, rejected / rejected_lengths
    if alpha:
        chosen, rejected = -torch.expm1(-alpha * chosen) / alpha, -torch.expm1(-alpha * rejected) / alpha
    return chosen, rejected


def _reward_metrics(chosen: Tensor, rejected: Tensor, beta: float) -> Metrics:
    """TRL's CPO rewards: β·s(y); logged from here because only the loss knows which s it used."""
    chosen, rejected = beta * chosen.detach(), beta * rejected.detach()
    return {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/accuracies": (chosen > rejected).to(chosen.dtype).mean(),
            "rewards/margins": (chosen - rejected).mean()}


def _smoothed_logistic(z: Tensor, epsilon: float) -> Tensor:
    return -(1.0 - epsilon) * F.logsigmoid(z) - epsilon * F.logsigmoid(-z)


def cpo_sigmoid(*, policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, beta,
                label_smoothing=0.0, simpo_gamma=0.5, alpha=0.0, **_) -> tuple[Tensor, Metrics]:
    """CPO (Xu et al. 2024, "Contrastive Preference Optimization", Eq. 3 preference term) on summed log-probs,
    z = s_w − s_l: −(1−ε)logσ(βz) − ε·logσ(−βz). Returns: loss (B,), rewards metrics."""
    chosen, rejected = _scores(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths,
                               False, alpha)
    return _smoothed_logistic(beta * (chosen - rejected), label_smoothing), _reward_metrics(chosen, rejected, beta)


def cpo_hinge(*, policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, beta,
              label_smoothing=0.0, simpo_gamma=0.5, alpha=0.0, **_) -> tuple[Tensor, Metrics]:
    """SLiC-style hinge on summed log-probs: max(0, 1 − βz). Returns: loss (B,), rewards metrics."""
    chosen, rejected = _scores(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths,
                               False, alpha)
    return torch.relu(1.0 - beta * (chosen - rejected)), _reward_metrics(chosen, rejected, beta)


def cpo_ipo(*, policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, beta,
            label_smoothing=0.0, simpo_gamma=0.5, alpha=0.0, **_) -> tuple[Tensor, Metrics]:
    """IPO-style square loss on per-token-average log-probs, reference-free: (z − 1/(2β))².
    Returns: loss (B,), rewards metrics."""
    chosen, rejected = _scores(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths,
                               True, alpha)
    return (chosen - rejected - 1.0 / (2.0 * beta)) ** 2, _reward_metrics(chosen, rejected, beta)


def simpo(*, policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, beta,
          label_smoothing=0.0, simpo_gamma=0.5, alpha=0.0, **_) -> tuple[Tensor, Metrics]:
    """SimPO (Meng et al. 2024, Eq. 6) on per-token averages, z = a_w − a_l, with target margin γ:
    −(1−ε)logσ(βz − γ) − ε·logσ(−(βz − γ)) (ε = 0: the paper's loss). Returns: loss (B,), rewards metrics."""
    chosen, rejected = _scores(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths,
                               True, alpha)
    logits = beta * (chosen - rejected) - simpo_gamma
    return _smoothed_logistic(logits, label_smoothing), _reward_metrics(chosen, rejected, beta)


def alphapo(*, policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, beta,
            label_smoothing=0.0, simpo_gamma=0.5, alpha=0.0, **_) -> tuple[Tensor, Metrics]:
    """AlphaPO (Gupta et al. 2025, "AlphaPO: Reward Shape Matters for LLM Alignment", Eq. 7): SimPO with the
    reward r(y) = (1 − p̄(y)^{−α})/α, p̄ = exp(a(y)), i.e. `simpo` with `alpha`. As in TRL, it is exactly SimPO's
    loss (TRL maps loss_type="alphapo" to "simpo" with cpo_alpha = 0); alpha = 0 reduces to SimPO.
    Returns: loss (B,), rewards metrics."""
    return simpo(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                 chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, beta=beta,
                 label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, alpha=alpha)


CPO_LOSSES: dict[str, Callable[..., tuple[Tensor, Metrics]]] = {
    "sigmoid": cpo_sigmoid,
    "hinge": cpo_hinge,
    "ipo": cpo_ipo,
    "simpo": simpo,
    "alphapo": alphapo,
}
